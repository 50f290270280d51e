"""An http(s) archive Model's tokenizer (`infergate fetch tokenizer --source URL`): streamed
from the archive over real HTTP, only the tokenizer's members kept and, with the URL's
`#sha256=`, the whole archive checked; with `--from-weights-cache` after the engine's
download, copied from the unpacked entry without reading the archive again."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fetch.conftest import download_cli
from tests.fetch.hub_mirror import Mirror, running_mirror
from tests.paths import DEFAULT_MODEL

FILES = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}
WEIGHTS = b"w" * (1 << 20)


def tar_gz(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:  # a link named as a tokenizer file: never followed
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


ARCHIVE = tar_gz({"tiny/model.safetensors": WEIGHTS, **{f"tiny/{k}": v for k, v in FILES.items()}})
SHA = hashlib.sha256(ARCHIVE).hexdigest()


@pytest.fixture
def cdn() -> Iterator[Mirror]:
    served = {
        "tiny.tar.gz": ARCHIVE,
        "linked.tar.gz": tar_gz({"m/config.json": b"{}"}, links=("m/tokenizer.json",)),
        "tiny.zip": b"PK",
    }
    with running_mirror(Mirror("org/unused", served)) as mirror:
        yield mirror


def fetch(uri: str, dest: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "infergw.fetch", "tokenizer", f"--source={uri}", f"--dest={dest}"]
    return subprocess.run(
        [*cmd, *flags], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
    )


def test_the_tokenizer_is_streamed_out_of_a_checked_archive(cdn, tmp_path) -> None:
    out = fetch(f"{cdn.cdn_url}/cdn/tiny.tar.gz#sha256={SHA}", tmp_path / "tok")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(
        n for n in FILES if n.startswith(("tokenizer", "special_tokens", "chat_template"))
    )
    for p in (tmp_path / "tok").iterdir():
        assert p.read_bytes() == FILES[p.name]
    # nothing of the weights written anywhere
    assert not list(tmp_path.rglob("*.safetensors"))


def test_an_archive_that_differs_from_its_sha256_gives_nothing(cdn, tmp_path) -> None:
    out = fetch(f"{cdn.cdn_url}/cdn/tiny.tar.gz#sha256={'0' * 64}", tmp_path / "tok")
    assert out.returncode == 1 and "SHA-256 differs" in out.stderr
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_links_and_zips_are_not_read_and_a_small_bound_holds(cdn, tmp_path) -> None:
    out = fetch(f"{cdn.cdn_url}/cdn/linked.tar.gz", tmp_path / "a")
    assert out.returncode == 1 and "not found" in out.stderr
    out = fetch(f"{cdn.cdn_url}/cdn/tiny.zip", tmp_path / "b")
    assert out.returncode == 1 and "weights cache only" in out.stderr
    out = fetch(f"{cdn.cdn_url}/cdn/tiny.tar.gz#sha256={SHA}", tmp_path / "c",
                "--max-archive-bytes=65536")  # fmt: skip
    assert out.returncode == 1 and "more than the 65536 bytes allowed" in out.stderr


def test_after_the_engines_download_it_is_copied_from_the_entry(cdn, tmp_path) -> None:
    url = f"{cdn.cdn_url}/cdn/tiny.tar.gz#sha256={SHA}"
    cache = tmp_path / "cache"
    done = download_cli(url, f"--cache-dir={cache}")
    assert done.returncode == 0, done.stderr
    whole = [r for r in cdn.asked("cdn", "tiny.tar.gz") if r.range != "bytes=0-0"]
    out = fetch(url, tmp_path / "tok", "--from-weights-cache", f"--cache-dir={cache}")
    assert out.returncode == 0, out.stderr
    assert "the weights cache's" in out.stderr
    # only the archive's size and version were asked again, never its bytes
    assert [r for r in cdn.asked("cdn", "tiny.tar.gz") if r.range != "bytes=0-0"] == whole
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == FILES["tokenizer.json"]
