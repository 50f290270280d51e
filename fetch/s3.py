"""Files of a model under an S3 prefix: `s3://bucket/prefix` holds `prefix/tokenizer.json`.

Through boto3 (the `s3` extra, which the image installs), with its usual configuration from
the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (from the Secret the Model's env
names), AWS_REGION, and AWS_ENDPOINT_URL(_S3) for an S3-compatible store.

A weights snapshot lists every object under `prefix/` (ListObjectsV2) and asks each its size,
ETag and, where it was uploaded with one, its SHA-256 (HeadObject with ChecksumMode): the
revision is a digest of that listing, and a resumed read asks for the same ETag (If-Match),
so an object replaced meanwhile fails rather than splicing two versions. The ETag is an MD5
of the content only for an object uploaded in one part and not encrypted with KMS or a
customer key; only then is it checked as one.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from infergw.fetch.snapshot import RemoteFile, Snapshot, checked_files, listing_digest
from infergw.fetch.source import Denied, FetchError, NotFound, Opened, TransferFailed

MISSING = ("NoSuchKey", "404", "NotFound", "NoSuchBucket")
DENIED = (
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
)
CHANGED = ("PreconditionFailed", "412", "InvalidRange", "416")
# Where an S3-compatible store other than AWS is (boto3's variables); obs:// needs one.
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_MD5_ETAG = re.compile(r'"?([0-9a-f]{32})"?')
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/\d+")


def bucket_source(uri: str, timeout: float) -> S3:
    """The S3 source of an `s3://BUCKET/PREFIX` or `obs://BUCKET/PREFIX` URI (OBS read
    through its S3 API, so only with an endpoint set); ValueError for anything else."""
    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.strip("/").partition("/")
    if scheme not in ("s3", "obs") or not bucket:
        raise ValueError(f"{uri!r}: not s3://BUCKET/PREFIX or obs://BUCKET/PREFIX")
    if scheme == "obs" and not any(os.environ.get(e) for e in ENDPOINT_ENVS):
        raise ValueError(f"{uri!r}: obs:// is read through OBS's S3 API: set AWS_ENDPOINT_URL")
    return S3(bucket, prefix, timeout=timeout)


class _Stream:
    """A botocore body read as bytes arrive, so the caller's deadline is checked often."""

    def __init__(self, body: Any) -> None:
        self.body = body
        raw = getattr(body, "_raw_stream", None)
        self._read = getattr(raw, "read1", None) or body.read

    def read(self, n: int) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return self._read(n)
        except (BotoCoreError, OSError) as exc:  # cut off, timed out, or a checksum mismatch
            raise TransferFailed(f"interrupted: {exc}") from None

    def close(self) -> None:
        self.body.close()


@dataclass(slots=True)
class S3:
    bucket: str
    prefix: str
    timeout: float = 30.0
    _client: Any = field(default=None, repr=False)

    def _s3(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise FetchError(
                    "s3:// needs boto3: pip install 'infergw[s3]' (the infergate image has it)"
                ) from None
            config = Config(
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            self._client = boto3.client("s3", config=config)
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix.strip('/')}/{name}" if self.prefix.strip("/") else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One S3 call, its errors as ours."""
        client = self._s3()  # FetchError without boto3, before its exceptions are imported
        with _errors(what):
            return getattr(client, method)(**kwargs)

    def open(self, name: str) -> Opened | None:
        try:
            answer = self._call(
                self.describe(name), "get_object", Bucket=self.bucket, Key=self.key(name)
            )
        except NotFound as exc:
            if "NoSuchBucket" in str(exc):
                raise FetchError(str(exc)) from None  # the tokenizer fetch names it so
            return None
        return Opened(_Stream(answer["Body"]), answer.get("ContentLength"))

    # ---- a weights snapshot ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        root = f"s3://{self.bucket}/{self.prefix.strip('/')}"
        folder = self.key("")  # "prefix/": not "prefix-other/"
        client = self._s3()
        files = []
        with _errors(root):
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder
            )
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for key in keys:
            if key.endswith("/"):
                continue  # a folder marker, as consoles create them
            head = self._call(
                f"s3://{self.bucket}/{key}",
                "head_object",
                Bucket=self.bucket,
                Key=key,
                ChecksumMode="ENABLED",
            )
            files.append(_remote_file(key.removeprefix(folder), head))
        if not files:
            raise NotFound(f"{root}/: no objects under this prefix")
        checked = checked_files(files, root)
        return Snapshot(root, listing_digest(checked), checked)

    def open_at(self, file: RemoteFile, offset: int) -> Opened:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(file.path)}
        if file.version:
            kwargs["IfMatch"] = file.version
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        answer = self._call(self.describe(file.path), "get_object", **kwargs)
        start = 0
        if offset and (match := _CONTENT_RANGE.fullmatch(answer.get("ContentRange", ""))):
            start = int(match.group(1))
        return Opened(_Stream(answer["Body"]), answer.get("ContentLength"), start)


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """botocore's errors as NotFound, Denied, TransferFailed (changed meanwhile) or
    FetchError, each naming `what`."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in MISSING:
            raise NotFound(f"{what}: {code}") from None
        if code in DENIED:
            raise Denied(f"{what}: {code} (the credentials or their permissions)") from None
        if code in CHANGED:
            raise TransferFailed(f"{what}: {code} (the object changed meanwhile)") from None
        raise FetchError(f"{what}: {code or exc}") from None
    except NoCredentialsError:
        raise Denied(f"{what}: no credentials (set AWS_ACCESS_KEY_ID)") from None
    except BotoCoreError as exc:
        raise FetchError(f"{what}: {exc}") from None


def _remote_file(name: str, head: dict) -> RemoteFile:
    """An object as HeadObject describes it."""
    etag = head.get("ETag")
    # KMS or a customer's key make the ETag something other than the content's MD5.
    encrypted = head.get("ServerSideEncryption") not in (None, "AES256")
    encrypted = encrypted or bool(head.get("SSECustomerAlgorithm"))
    md5 = _MD5_ETAG.fullmatch(etag or "")
    return RemoteFile(
        path=name,
        size=head.get("ContentLength"),
        sha256=_sha256(head),
        md5=md5.group(1) if md5 and not encrypted else None,
        version=etag,
    )


def _sha256(head: dict) -> str | None:
    """The whole object's SHA-256 in hex, if it was uploaded with one (not a multipart
    upload's checksum of checksums)."""
    value = head.get("ChecksumSHA256")
    if not value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT" or "-" in value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None
