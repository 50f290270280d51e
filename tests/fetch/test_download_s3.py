"""`infergate download s3://...` against moto's S3 server (a real process on 127.0.0.1): the
objects under a prefix (and not a sibling prefix), checked by the SHA-256 they were uploaded
with or their one-part ETag's MD5, a partial file resumed by range, an object replaced between
listing and reading, a missing prefix or bucket, and wrong credentials (moto's IAM checks,
switched on for that test).
"""

from __future__ import annotations

import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergw.fetch.cache import MANIFEST
from infergw.fetch.progress import Progress
from infergw.fetch.s3 import S3
from infergw.fetch.source import TransferFailed
from infergw.fetch.transfer import Retry, fetch_file
from tests.fetch.conftest import S3_ENV, download_cli, entries, s3_client

BUCKET = "weights"
WEIGHTS = random.Random(7).randbytes(1 << 20)
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS}


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket=BUCKET)
    for name, body in FILES.items():
        s3.put_object(Bucket=BUCKET, Key=f"llama/v1/{name}", Body=body)
    # With a SHA-256 the store keeps and returns: checked as such.
    s3.put_object(
        Bucket=BUCKET, Key="llama/v1/sub/w.bin", Body=b"x" * 5000, ChecksumAlgorithm="SHA256"
    )
    s3.put_object(Bucket=BUCKET, Key="llama/v1-other/config.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="llama/v1/empty-folder/", Body=b"")  # a console's marker
    return s3_server


def run(url: str, uri: str, tmp: Path, **env: str):
    return download_cli(
        uri,
        f"--cache-dir={tmp / 'cache'}",
        f"--dest={tmp / 'm'}",
        "--retries=0",
        AWS_ENDPOINT_URL=url,
        **{**S3_ENV, **env},
    )


def test_the_objects_under_the_prefix_are_downloaded_and_checked(bucket, tmp_path) -> None:
    out = run(bucket, f"s3://{BUCKET}/llama/v1", tmp_path)
    assert out.returncode == 0, out.stderr
    got = {
        p.relative_to(tmp_path / "m").as_posix(): p.read_bytes()
        for p in (tmp_path / "m").rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    assert got == {**FILES, "sub/w.bin": b"x" * 5000}  # not v1-other, not the folder marker
    manifest = (tmp_path / "m" / MANIFEST).read_text()
    assert '"md5"' in manifest and '"sha256"' in manifest

    again = run(bucket, f"s3://{BUCKET}/llama/v1/", tmp_path)  # the same prefix, same entry
    assert again.returncode == 0 and "already in the cache" in again.stderr


def test_obs_is_read_through_its_s3_api_and_needs_the_endpoint(bucket, tmp_path) -> None:
    out = run(bucket, f"obs://{BUCKET}/llama/v1", tmp_path)
    assert out.returncode == 0, out.stderr
    no_endpoint = download_cli(f"obs://{BUCKET}/llama/v1", f"--cache-dir={tmp_path}", **S3_ENV)
    assert no_endpoint.returncode == 2 and "set AWS_ENDPOINT_URL" in no_endpoint.stderr


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        (f"s3://{BUCKET}/nothing", "no objects under this prefix"),
        ("s3://nobucket/x", "NoSuchBucket"),
    ],
)
def test_a_missing_prefix_or_bucket_is_not_found(bucket, tmp_path, uri, said) -> None:
    out = run(bucket, uri, tmp_path)
    assert out.returncode == 3 and said in out.stderr, out.stderr
    assert entries(tmp_path / "cache") == []


def test_a_partial_file_is_resumed_and_a_wrong_one_refetched(bucket, tmp_path) -> None:
    source = S3(BUCKET, "llama/v1")
    source._client = s3_client(bucket)
    snap = source.snapshot()
    file = next(f for f in snap.files if f.path == "model.safetensors")
    assert file.md5 is not None
    staging, partials = tmp_path / "staging", tmp_path / "partials"
    partials.mkdir()
    (partials / file.path).write_bytes(WEIGHTS[:300_000])  # an earlier try's bytes
    fetch_file(source, file, staging, partials, Progress("t"), 1 << 30, Retry(0))
    assert (staging / file.path).read_bytes() == WEIGHTS

    (staging / file.path).unlink()
    (partials / file.path).write_bytes(b"\0" * 300_000)  # not the object's bytes
    with pytest.raises(TransferFailed, match="md5"):
        fetch_file(source, file, staging, partials, Progress("t"), 1 << 30, Retry(0))
    assert not (partials / file.path).exists()  # dropped: the next try starts over
    fetch_file(source, file, staging, partials, Progress("t"), 1 << 30, Retry(0))
    assert (staging / file.path).read_bytes() == WEIGHTS


def test_an_object_replaced_after_the_listing_is_not_spliced(bucket, tmp_path) -> None:
    s3 = s3_client(bucket)
    s3.put_object(Bucket=BUCKET, Key="moving/w.bin", Body=b"a" * 1000)
    source = S3(BUCKET, "moving")
    source._client = s3
    snap = source.snapshot()
    s3.put_object(Bucket=BUCKET, Key="moving/w.bin", Body=b"b" * 1000)
    with pytest.raises(TransferFailed, match="changed meanwhile"):
        fetch_file(source, snap.files[0], tmp_path / "s", tmp_path / "p", Progress("t"), 1 << 20)


@pytest.fixture
def iam(bucket) -> Iterator[tuple[str, str]]:
    """A user allowed s3:*, then moto checking every request's signature and policy."""
    iam = s3_client(bucket, service="iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(
        UserName="reader",
        PolicyName="s3",
        PolicyDocument='{"Version": "2012-10-17", "Statement": '
        '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
    )
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    _auth(bucket, "0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        _auth(bucket, "inf")


def _auth(url: str, after: str) -> None:
    # As text: a form-encoded body would be parsed away before moto reads it.
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=after.encode(), headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200


def test_wrong_credentials_are_access_denied(bucket, iam, tmp_path) -> None:
    key, secret = iam
    ok = run(
        bucket,
        f"s3://{BUCKET}/llama/v1",
        tmp_path / "a",
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = run(
        bucket,
        f"s3://{BUCKET}/llama/v1",
        tmp_path / "b",
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY="nope",
    )
    assert wrong.returncode == 4, wrong.stderr
    last = wrong.stderr.strip().splitlines()[-1]
    assert "AccessDenied: " in last and "SignatureDoesNotMatch" in last and "credentials" in last
    unknown = run(bucket, f"s3://{BUCKET}/llama/v1", tmp_path / "c", AWS_ACCESS_KEY_ID="AKIANOBODY")
    assert unknown.returncode == 4 and "InvalidAccessKeyId" in unknown.stderr
    assert entries(tmp_path / "b" / "cache") == entries(tmp_path / "c" / "cache") == []
