"""The weights cache within a size (`infergate download --cache-max-bytes`, `--prune`):
least-recently-used complete entries go first, and never one that a running process reads
(a shared hold, as standalone mode's runtime takes for a pod's engine), one being downloaded
(its lock held by another process), one used just now, or a half-written staging folder.
Real files, real processes holding real locks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from infergw.api.sizes import byte_size
from infergw.fetch.cache import Cache
from infergw.fetch.download import Request
from infergw.fetch.download import download as fetch
from infergw.fetch.evict import IDLE_BEFORE_EVICTION, entries, hold
from infergw.fetch.progress import Progress
from tests.fetch.conftest import download_cli

KIB = 1024


def model(tmp: Path, name: str, size: int) -> Path:
    folder = tmp / "models" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    return folder


def download(tmp: Path, folder: Path, *flags: str) -> str:
    """The entry's key, downloaded into tmp/cache: by the CLI (a process of its own) when
    flags are given, else in this process (the cache filled beforehand, quicker)."""
    if not flags:
        entry, _ = fetch(Request(str(folder)), Cache(tmp / "cache"), Progress(str(folder)))
        return entry.name
    out = download_cli(str(folder), f"--cache-dir={tmp / 'cache'}", *flags)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip()).name


def last_used(tmp: Path, key: str, seconds_ago: float) -> None:
    """Time passing since the entry's last use (its place in the LRU order)."""
    then = time.time() - seconds_ago
    os.utime(tmp / "cache" / ".locks" / f"{key}.use", (then, then))


def keys(tmp: Path) -> set[str]:
    return {p.name for p in (tmp / "cache" / "entries").iterdir()}


@contextmanager
def process_holding(code: str) -> Iterator[subprocess.Popen]:
    """Another process running `code`, which prints "held" once it holds what it holds,
    and lets go when its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nprint('held', flush=True)\nimport sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_lru_entries_go_first_and_nothing_held_or_half_written(tmp_path) -> None:
    old, read, fetching, recent = (
        download(tmp_path, model(tmp_path, name, 64 * KIB))
        for name in ("old", "read", "fetching", "recent")
    )
    for key, ago in ((old, 400), (read, 500), (fetching, 600), (recent, 1)):
        last_used(tmp_path, key, ago)
    cache = tmp_path / "cache"
    partial = cache / ".staging" / "half--0123.partial"  # a download cut short: resumed later
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"x" * 100 * KIB)
    hold_read = (
        "from pathlib import Path\nfrom infergw.fetch.evict import hold\n"
        f"fd = hold(Path({str(cache / 'entries' / read)!r}))\nassert fd is not None"
    )
    lock_fetching = (
        "import fcntl, os\n"
        f"fd = os.open({str(cache / '.locks' / (fetching + '.lock'))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)"
    )
    with process_holding(hold_read), process_holding(lock_fetching):
        new = download(tmp_path, model(tmp_path, "new", 64 * KIB), f"--cache-max-bytes={100 * KIB}")
        # the least recently used that nothing holds went; the rest stays, over the bound
        assert keys(tmp_path) == {read, fetching, recent, new}
        assert (partial / "model.safetensors").stat().st_size == 100 * KIB
        assert not list((cache / ".staging").glob("*.evicted-*"))

    # let go and long unused: now they go, least recently used first, down to the bound
    for key, ago in ((read, 500), (fetching, 600), (recent, 400)):
        last_used(tmp_path, key, ago)
    last_used(tmp_path, new, 10)  # used just now: kept even by --prune
    out = download_cli("--prune", f"--cache-dir={cache}", f"--cache-max-bytes={150 * KIB}")
    assert out.returncode == 0, out.stderr
    removed = [line.split()[1] for line in out.stdout.splitlines()]
    assert [Path(p).name for p in removed] == [fetching, read]  # 600 s, then 500 s ago
    assert keys(tmp_path) == {recent, new}
    cut_short = cache / ".staging" / f"{recent}.evicted-99999"  # an eviction killed midway
    (cut_short / "sub").mkdir(parents=True)
    out = download_cli("--prune", f"--cache-dir={cache}")
    assert keys(tmp_path) == {new}
    assert partial.is_dir() and not cut_short.exists()


def test_a_reader_of_an_entry_evicted_meanwhile_holds_nothing(tmp_path) -> None:
    key = download(tmp_path, model(tmp_path, "m", KIB))
    entry = tmp_path / "cache" / "entries" / key
    fd = hold(entry)
    assert fd is not None
    os.close(fd)
    last_used(tmp_path, key, 2 * IDLE_BEFORE_EVICTION)
    assert download_cli("--prune", f"--cache-dir={tmp_path / 'cache'}").returncode == 0
    assert hold(entry) is None and not entry.exists()
    assert entries(Cache(tmp_path / "cache")) == []


@pytest.mark.parametrize(
    ("text", "size"), [("500G", 500 << 30), ("500GiB", 500 << 30), ("1t", 1 << 40), ("42", 42)]
)
def test_sizes_as_people_write_them(text, size) -> None:
    assert byte_size(text) == size


def test_a_bad_size_or_a_uri_with_prune_is_a_usage_error(tmp_path) -> None:
    assert download_cli("--prune", "--cache-max-bytes=lots").returncode == 2
    out = download_cli("--prune", str(tmp_path), f"--cache-dir={tmp_path / 'c'}")
    assert out.returncode == 2 and "give no URI" in out.stderr
    assert download_cli(f"--cache-dir={tmp_path / 'c'}").returncode == 2
