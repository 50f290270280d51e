"""`infergate fetch tokenizer`: a model's tokenizer files alone, from Hugging Face's resolve URLs
(a local server with the Hub's URL layout, a CDN redirect and a gated repository) and from S3
(moto's S3 server as a real process on 127.0.0.1), run as the picker's init container runs it
(`python -m infergw.fetch tokenizer ...`). Bounded in size and time, written whole or not at
all, the token sent to the Hub only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from infergw.fetch.hf import HuggingFace
from infergw.fetch.source import FetchError, Limits
from infergw.fetch.tokenizer import OPTIONAL, REQUIRED, fetch_tokenizer
from tests.fetch.conftest import S3_ENV, s3_client
from tests.fetch.hub_mirror import serve
from tests.paths import DEFAULT_MODEL

TOKEN = "hf_secret"
REPO = "org/tiny"
FILES = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}


@dataclass
class Hub:
    """What the Hub serves and how, and what it and its CDN were asked."""

    files: dict[str, bytes] = field(default_factory=lambda: dict(FILES))
    gated: bool = False
    cdn_for: set[str] = field(default_factory=lambda: {REQUIRED})  # redirected to the CDN
    chunked: bool = False  # no Content-Length
    drip: float = 0.0  # seconds between bytes
    redirect_to: str | None = None  # tokenizer.json redirected here instead
    hub_auth: list[str | None] = field(default_factory=list)
    cdn_auth: list[str | None] = field(default_factory=list)
    cdn_url: str = ""


def _handler(hub: Hub, is_cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            (hub.cdn_auth if is_cdn else hub.hub_auth).append(auth)
            prefix = "/cdn/" if is_cdn else f"/{REPO}/resolve/main/"
            name = self.path.removeprefix(prefix)
            if not self.path.startswith(prefix) or name not in hub.files:
                return self._send(404, b"Entry not found")
            if not is_cdn and hub.gated and auth != f"Bearer {TOKEN}":
                return self._send(401, b"gated")
            if not is_cdn and name == REQUIRED and hub.redirect_to:
                return self._redirect(hub.redirect_to)
            if not is_cdn and name in hub.cdn_for:
                return self._redirect(f"{hub.cdn_url}/cdn/{name}")
            self._send(200, hub.files[name])

        def _redirect(self, where: str) -> None:
            self.send_response(302)
            self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            if hub.chunked and code == 200:
                self.send_header("Connection", "close")
                self.end_headers()
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
            if hub.drip and code == 200:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(hub.drip)
            else:
                self.wfile.write(body)

    return Handler


@pytest.fixture
def hub() -> Iterator[tuple[Hub, str]]:
    state = Hub()
    with serve(_handler(state, is_cdn=True)) as cdn, serve(_handler(state, is_cdn=False)) as url:
        state.cdn_url = cdn
        yield state, url


def fetch_cli(source: str, dest: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "infergw.fetch",
            "tokenizer",
            f"--source={source}",
            f"--dest={dest}",
            *flags,
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- Hugging Face -------------------------------------------------------------------------------


def test_hf_fetches_the_tokenizer_files_and_sends_the_token_to_the_hub_only(hub, tmp_path) -> None:
    state, url = hub
    state.gated = True
    out = fetch_cli(f"hf://{REPO}", tmp_path / "tok", HF_ENDPOINT=url, HF_TOKEN=TOKEN)
    assert out.returncode == 0, out.stderr
    got = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    want = {n: FILES[n] for n in (REQUIRED, *OPTIONAL) if n in FILES}
    assert got == want  # config.json and the weights are never asked for
    assert "config.json" not in got
    assert set(state.hub_auth) == {f"Bearer {TOKEN}"}
    assert state.cdn_auth == [None]  # followed to another host without the token


def test_a_gated_model_without_a_token_says_so(hub, tmp_path) -> None:
    state, url = hub
    state.gated = True
    out = fetch_cli(f"hf://{REPO}", tmp_path / "tok", HF_ENDPOINT=url)
    assert out.returncode == 1
    assert "HTTP 401" in out.stderr and "set HF_TOKEN" in out.stderr
    assert not (tmp_path / "tok" / REQUIRED).exists()


def test_missing_optional_files_are_skipped_and_a_missing_tokenizer_fails(hub, tmp_path) -> None:
    state, url = hub
    source = HuggingFace(REPO, endpoint=url)
    limits = Limits(1 << 20, 10.0)
    assert fetch_tokenizer(source, tmp_path / "a", limits) == [REQUIRED, "tokenizer_config.json"]
    del state.files[REQUIRED]
    with pytest.raises(FetchError, match=r"tokenizer\.json: not found"):
        fetch_tokenizer(source, tmp_path / "b", limits)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "undeclared"])
def test_a_file_over_the_size_bound_is_refused_and_nothing_is_left(hub, tmp_path, chunked) -> None:
    state, url = hub
    state.chunked = chunked
    size = len(FILES[REQUIRED])
    with pytest.raises(FetchError, match=f"{size - 1}"):
        fetch_tokenizer(HuggingFace(REPO, endpoint=url), tmp_path, Limits(size - 1, 10.0))
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_drips_is_cut_off_at_the_deadline(hub, tmp_path) -> None:
    state, url = hub
    state.files[REQUIRED] = FILES[REQUIRED][:200]
    state.cdn_for = set()
    state.drip = 0.02  # 200 bytes take 4 s; each read returns within the socket timeout
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="not complete within 1s"):
        fetch_tokenizer(HuggingFace(REPO, endpoint=url), tmp_path, Limits(1 << 20, 1.0))
    assert time.monotonic() - t0 < 3.0
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_that_does_not_load_fails_here_not_in_the_picker(hub, tmp_path) -> None:
    state, url = hub
    state.files[REQUIRED] = b'{"not": "a tokenizer"}'
    with pytest.raises(FetchError, match="does not load"):
        fetch_tokenizer(HuggingFace(REPO, endpoint=url), tmp_path, Limits(1 << 20, 10.0))
    assert not (tmp_path / REQUIRED).exists()


def test_a_redirect_to_another_scheme_is_refused(hub, tmp_path) -> None:
    state, url = hub
    state.redirect_to = "ftp://127.0.0.1/tokenizer.json"  # urllib would follow ftp
    with pytest.raises(FetchError, match="redirected to a ftp URL"):
        fetch_tokenizer(HuggingFace(REPO, endpoint=url), tmp_path, Limits(1 << 20, 10.0))


@pytest.mark.parametrize(
    "source", ["pvc://claim/llama", "hf://", "s3://", "hf://org/../../etc", "llama"]
)
def test_sources_it_cannot_fetch_from_are_refused_by_name(source, tmp_path) -> None:
    out = fetch_cli(source, tmp_path)
    assert out.returncode == 1 and source in out.stderr, out.stderr


def test_the_launcher_runs_it() -> None:
    from infergw.cli import main

    assert main(["fetch"]) == 2  # the artifact must be named
    with pytest.raises(SystemExit) as exit_:
        main(["fetch", "tokenizer", "--help"])
    assert exit_.value.code == 0


# ---- S3 ------------------------------------------------------------------------------------------


def test_s3_fetches_the_tokenizer_files_under_the_prefix(s3_server, tmp_path) -> None:
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket="models")
    for name, body in FILES.items():
        s3.put_object(Bucket="models", Key=f"llama/v1/{name}", Body=body)
    s3.put_object(Bucket="models", Key="broken/tokenizer.json", Body=b"{}")

    out = fetch_cli("s3://models/llama/v1", tmp_path / "tok", AWS_ENDPOINT_URL=s3_server, **S3_ENV)
    assert out.returncode == 0, out.stderr
    got = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    assert got == {n: FILES[n] for n in (REQUIRED, "tokenizer_config.json")}

    missing = fetch_cli("s3://models/other", tmp_path / "x", AWS_ENDPOINT_URL=s3_server, **S3_ENV)
    assert missing.returncode == 1
    assert "s3://models/other/tokenizer.json: not found" in missing.stderr
    broken = fetch_cli("s3://models/broken", tmp_path / "y", AWS_ENDPOINT_URL=s3_server, **S3_ENV)
    assert broken.returncode == 1 and "does not load" in broken.stderr
    no_bucket = fetch_cli(
        "s3://nobucket/llama", tmp_path / "z", AWS_ENDPOINT_URL=s3_server, **S3_ENV
    )
    assert no_bucket.returncode == 1 and "NoSuchBucket" in no_bucket.stderr

    big = fetch_cli(
        "s3://models/llama/v1",
        tmp_path / "w",
        "--max-bytes=100",
        AWS_ENDPOINT_URL=s3_server,
        **S3_ENV,
    )
    assert big.returncode == 1 and "more than the 100" in big.stderr
    assert not (tmp_path / "w" / REQUIRED).exists()


def test_obs_is_read_through_its_s3_api_and_only_with_an_endpoint(s3_server, tmp_path) -> None:
    s3_client(s3_server).create_bucket(Bucket="obs-models")
    s3_client(s3_server).put_object(
        Bucket="obs-models", Key=f"llama/{REQUIRED}", Body=FILES[REQUIRED]
    )
    obs = fetch_cli("obs://obs-models/llama", tmp_path / "o", AWS_ENDPOINT_URL=s3_server, **S3_ENV)
    assert obs.returncode == 0, obs.stderr
    assert (tmp_path / "o" / REQUIRED).read_bytes() == FILES[REQUIRED]
    nowhere = fetch_cli("obs://obs-models/llama", tmp_path / "n", **S3_ENV)
    assert nowhere.returncode == 1 and "set AWS_ENDPOINT_URL" in nowhere.stderr
