"""`infergate fetch tokenizer --from-weights-cache` (the local stack's picker): the tokenizer
copied from the weights cache's entry of the same source at the same resolved revision, so
nothing is fetched twice; without such an entry, fetched at the revision resolved now. Against
the Hub mirror over real HTTP and moto's S3 server, run as processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fetch.conftest import S3_ENV, download_cli, s3_client
from tests.fetch.hub_mirror import COMMIT, Mirror, running_mirror
from tests.paths import DEFAULT_MODEL

REPO = "org/tiny"
FILES = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}
WEIGHTS = {**FILES, "model.safetensors": b"w" * 8192}


@pytest.fixture
def hub() -> Iterator[Mirror]:
    with running_mirror(Mirror(REPO, dict(WEIGHTS))) as mirror:
        yield mirror


def fetch_tokenizer(uri: str, dest: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "infergw.fetch", "tokenizer", f"--source={uri}"]
    cmd += [f"--dest={dest}", "--from-weights-cache", f"--cache-dir={cache}"]
    return subprocess.run(
        cmd, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60
    )


def tokenizer_files_asked(hub: Mirror) -> list[str]:
    return [r.path for r in hub.requests if "/resolve/" in r.path and "tokenizer" in r.path]


def test_the_tokenizer_comes_from_the_engines_downloaded_files(hub, tmp_path) -> None:
    cache = tmp_path / "cache"
    done = download_cli(f"hf://{REPO}", f"--cache-dir={cache}", HF_ENDPOINT=hub.hub_url)
    assert done.returncode == 0, done.stderr
    asked = len(tokenizer_files_asked(hub))

    out = fetch_tokenizer(f"hf://{REPO}", tmp_path / "tok", cache, HF_ENDPOINT=hub.hub_url)
    assert out.returncode == 0, out.stderr
    assert len(tokenizer_files_asked(hub)) == asked  # only the revision was asked
    assert "the weights cache's" in out.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == FILES[name]


def test_without_an_entry_the_files_are_fetched_at_the_resolved_commit(hub, tmp_path) -> None:
    out = fetch_tokenizer(f"hf://{REPO}", tmp_path / "tok", tmp_path / "empty", **{
        "HF_ENDPOINT": hub.hub_url
    })  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert tokenizer_files_asked(hub)
    assert all(f"/resolve/{COMMIT}/" in p for p in tokenizer_files_asked(hub))
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]


def test_an_entry_of_another_revision_is_not_taken(hub, tmp_path) -> None:
    cache = tmp_path / "cache"
    assert (
        download_cli(f"hf://{REPO}", f"--cache-dir={cache}", HF_ENDPOINT=hub.hub_url).returncode
        == 0
    )
    [entry] = (cache / "entries").iterdir()
    manifest = entry / ".infergate-snapshot.json"
    manifest.write_text(manifest.read_text().replace(COMMIT, "f" * 40))
    (entry / "tokenizer.json").write_text("not this one")
    out = fetch_tokenizer(f"hf://{REPO}", tmp_path / "tok", cache, HF_ENDPOINT=hub.hub_url)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]


def test_an_s3_models_tokenizer_comes_from_its_downloaded_prefix(s3_server, tmp_path) -> None:
    client = s3_client(s3_server)
    client.create_bucket(Bucket="tok-reuse")
    for name, data in FILES.items():
        client.put_object(Bucket="tok-reuse", Key=f"tiny/{name}", Body=data)
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    cache = tmp_path / "cache"
    done = download_cli("s3://tok-reuse/tiny", f"--cache-dir={cache}", **env)
    assert done.returncode == 0, done.stderr
    out = fetch_tokenizer("s3://tok-reuse/tiny", tmp_path / "tok", cache, **env)
    assert out.returncode == 0 and "the weights cache's" in out.stderr, out.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]

    # Replaced in the bucket: another listing, another revision, so fetched afresh.
    client.put_object(Bucket="tok-reuse", Key="tiny/tokenizer_config.json", Body=b"{}")
    out = fetch_tokenizer("s3://tok-reuse/tiny", tmp_path / "tok2", cache, **env)
    assert out.returncode == 0 and "the weights cache's" not in out.stderr, out.stderr
    assert (tmp_path / "tok2" / "tokenizer_config.json").read_bytes() == b"{}"
