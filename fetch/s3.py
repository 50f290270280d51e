"""Files of a model under an S3 prefix: `s3://bucket/prefix` holds `prefix/tokenizer.json`.

Through boto3 (the `s3` extra, which the image installs), with its usual configuration from
the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (from the Secret the Model's env
names), AWS_REGION, and AWS_ENDPOINT_URL(_S3) for an S3-compatible store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infergw.fetch.source import FetchError, Opened

MISSING = ("NoSuchKey", "404", "NotFound")


class _Stream:
    """A botocore body read as bytes arrive, so the caller's deadline is checked often."""

    def __init__(self, body: Any) -> None:
        self.body = body
        raw = getattr(body, "_raw_stream", None)
        self._read = getattr(raw, "read1", None) or body.read

    def read(self, n: int) -> bytes:
        return self._read(n)

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

    def open(self, name: str) -> Opened | None:
        client = self._s3()  # FetchError without boto3, before its exceptions are imported
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in MISSING:
                return None
            raise FetchError(f"{self.describe(name)}: {code or exc}") from None
        except BotoCoreError as exc:
            raise FetchError(f"{self.describe(name)}: {exc}") from None
        return Opened(_Stream(answer["Body"]), answer.get("ContentLength"))
