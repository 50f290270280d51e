"""Keeping the weights cache within a size: least-recently-used complete entries are removed
until the cache's entries fit, never one in use and never a half-written one.

- In use: a process reading an entry holds a shared `flock` on `.locks/<key>.use` for as
  long as it reads (`hold`; standalone mode's runtime holds every entry a pod's containers
  name, from its engine's start until the pod stops; the runtime sidecar holds its loaded
  adapters). A running download holds the entry's own lock (`.locks/<key>.lock`, cache.py).
  The eviction takes both exclusively without waiting: either is held, the entry stays.
- Recently used: `.locks/<key>.use`'s mtime is touched whenever a download finds or makes
  the entry and whenever it is held; an entry used within IDLE_BEFORE_EVICTION is kept (the
  moment between a download linking it and the engine's reader holding it).
- Half-written: `.staging/` is never touched; only entries with their manifest count.
- Atomic: an entry leaves by one rename out of `entries/` (a reader sees it or not), then its
  files are removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from infergw.fetch.cache import MANIFEST, Cache

log = logging.getLogger("fetch.evict")

IDLE_BEFORE_EVICTION = 60.0  # seconds since an entry's last use before it may be evicted


def _use_lock(cache: Cache, key: str) -> Path:
    return cache.root / ".locks" / f"{key}.use"


def touch(cache: Cache, key: str) -> None:
    """Mark the entry used now (its place in the least-recently-used order)."""
    path = _use_lock(cache, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        log.warning("%s: %s", path, exc.strerror or exc)


def hold(entry: Path) -> int | None:
    """A shared lock on a cache entry for as long as the returned descriptor stays open (in
    this process or the children it is passed to); None when `entry` is not a complete
    cache entry (any more)."""
    entry = entry.resolve()
    if entry.parent.name != "entries" or not (entry / MANIFEST).is_file():
        return None
    cache = Cache(entry.parent.parent)
    path = _use_lock(cache, entry.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.warning("cannot hold %s: %s", entry, exc.strerror or exc)
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction of it is under way
    if not (entry / MANIFEST).is_file():  # evicted just before: nothing to hold
        os.close(fd)
        return None
    os.utime(path)
    return fd


def hold_all(paths: Iterable[str]) -> list[int]:
    """Holds on the cache entries that these paths (e.g. a container's `--model=PATH`
    arguments, links to entries) resolve to."""
    fds = []
    for text in paths:
        _, _, value = text.rpartition("=")
        if not value.startswith("/"):
            continue
        try:
            fd = hold(Path(value))
        except OSError:
            continue
        if fd is not None:
            fds.append(fd)
    return fds


def release(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    size: int
    used: float  # seconds since the epoch


def entries(cache: Cache) -> list[Entry]:
    """The complete entries, least recently used first."""
    out = []
    folder = cache.root / "entries"
    try:
        keys = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    for key in keys:
        path = folder / key
        if not (path / MANIFEST).is_file():
            continue  # not (yet) an entry
        try:
            used = _use_lock(cache, key).stat().st_mtime
        except OSError:
            used = (path / MANIFEST).stat().st_mtime
        out.append(Entry(key, _size(path), used))
    return sorted(out, key=lambda e: (e.used, e.key))


def _size(folder: Path) -> int:
    total = 0
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                pass
    return total


def evict(cache: Cache, max_bytes: int, keep: str | None = None) -> list[Entry]:
    """Remove least-recently-used entries that nothing holds until the entries' bytes are
    at most `max_bytes` (`keep`: a key never removed, the download just made); the ones
    removed. What cannot be removed (in use, downloading, used just now) is logged."""
    # what an eviction cut short left: no longer an entry, so nobody reads it
    for left in cache.root.joinpath(".staging").glob("*.evicted-*"):
        shutil.rmtree(left, ignore_errors=True)
    found = entries(cache)
    total = sum(e.size for e in found)
    removed: list[Entry] = []
    now = time.time()
    for e in found:
        if total <= max_bytes:
            break
        if e.key == keep:
            continue
        if now - e.used < IDLE_BEFORE_EVICTION:
            log.info("keeping %s: used %.0f s ago", e.key, now - e.used)
            continue
        if _remove_unheld(cache, e.key):
            total -= e.size
            removed.append(e)
            log.info("evicted %s (%d bytes), last used %s", e.key, e.size, time.ctime(e.used))
    if total > max_bytes:
        log.warning(
            "the weights cache %s holds %d bytes, over its %d: the rest is in use, being "
            "downloaded or just used",
            cache.root, total, max_bytes,
        )  # fmt: skip
    return removed


def _try_lock(path: Path) -> int | None:
    """An exclusive lock taken without waiting; None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_unheld(cache: Cache, key: str) -> bool:
    """Remove the entry if no download and no reader holds it."""
    download = _try_lock(cache.root / ".locks" / f"{key}.lock")
    if download is None:
        log.info("keeping %s: being downloaded", key)
        return False
    try:
        use = _try_lock(_use_lock(cache, key))
        if use is None:
            log.info("keeping %s: in use", key)
            return False
        gone = cache.root / ".staging" / f"{key}.evicted-{os.getpid()}"
        try:
            gone.parent.mkdir(parents=True, exist_ok=True)
            os.rename(cache.entry(key), gone)  # readers now see no entry
        except FileNotFoundError:
            return False  # another eviction took it
        finally:
            os.close(use)  # a reader waiting in hold() now finds no entry
        shutil.rmtree(gone, ignore_errors=True)
        return True
    finally:
        os.close(download)
