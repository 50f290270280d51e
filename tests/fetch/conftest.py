"""What the fetch tests share: moto's S3 server as a real process on 127.0.0.1 (one for the
session), the credentials it takes, and a client of it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infergw.stack.ports import free_port
from tests.conftest import running

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running(cmd, ready_url=f"{url}/moto-api/", timeout=60):
        yield url


def s3_client(url: str, key: str = "test", secret: str = "test", service: str = "s3") -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


def download_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m infergw.fetch.download ...` as the init container runs it, with only the
    environment given (none of this machine's HF_* or AWS_* settings)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_", "INFERGATE"))}
    return subprocess.run(
        [sys.executable, "-m", "infergw.fetch.download", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def entries(cache: Path) -> list[str]:
    """The cache's complete entries."""
    folder = cache / "entries"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
