"""The weights cache: one directory per snapshot, keyed by source, resolved revision and the
files chosen, that appears whole or not at all.

    <root>/entries/<key>/          complete snapshots, never written again
    <root>/.staging/<key>/          verified files of a snapshot being downloaded
    <root>/.staging/<key>.partial/  files still arriving (resumed from their length)
    <root>/.staging/<key>.unpacked/ an archive's files as they are unpacked
    <root>/.locks/<key>.lock        held (flock) by the one process downloading <key>

A download takes the key's lock, so several pods of one node sharing the cache (a hostPath or
a node's volume) download once: the others wait on the lock and then find the entry. The
entry appears by renaming the staging directory, so a reader sees all of it or none; what a
failed download leaves in `.staging` is what the next attempt resumes from, never an entry.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infergw.fetch.snapshot import Snapshot
from infergw.fetch.source import FetchError, NoSpace

MANIFEST = ".infergate-snapshot.json"  # in each entry: what it holds and where it came from
MAX_MANIFEST_READ = 64 << 20  # a manifest of MAX_FILES files; one longer is not ours
ENV = "INFERGATE_CACHE_DIR"
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no room: the disk, a file size limit, quota
LOCK_POLL = 0.25  # seconds between tries of a held lock
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(source: str) -> str:
    """The readable start of a source's entries' keys."""
    return _UNSAFE.sub("-", source.replace("://", "--")).strip("-.")[:80]


def default_root() -> Path:
    """$INFERGATE_CACHE_DIR, else $XDG_CACHE_HOME/infergate/models, else ~/.cache/..."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "infergate" / "models"


@contextmanager
def disk_errors(where: str) -> Iterator[None]:
    """A write's OSError as NoSpace (full disk, file size limit, quota) or a FetchError
    naming the path (not writable, read-only)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL:
            raise NoSpace(f"{where}: {exc.strerror}") from None
        raise FetchError(f"{where}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class Cache:
    root: Path

    def key(self, snapshot: Snapshot) -> str:
        """Readable for people (the source), unique by a digest of source, revision and the
        files chosen (a download that leaves some out is another entry)."""
        h = hashlib.sha256(f"{snapshot.source}\0{snapshot.revision}\0".encode())
        for f in snapshot.files:
            h.update(f"{f.path}\0".encode())
        return f"{_slug(snapshot.source)}--{h.hexdigest()[:20]}"

    def entry(self, key: str) -> Path:
        return self.root / "entries" / key

    def staging(self, key: str) -> Path:
        return self.root / ".staging" / key

    def partials(self, key: str) -> Path:
        return self.root / ".staging" / f"{key}.partial"

    def unpacked(self, key: str) -> Path:
        return self.root / ".staging" / f"{key}.unpacked"

    def complete(self, key: str) -> Path | None:
        """The entry, if a download finished it (its manifest is the last thing renamed in)."""
        entry = self.entry(key)
        return entry if (entry / MANIFEST).is_file() else None

    def holding(self, source: str, revision: str, name: str) -> Path | None:
        """A complete entry of this source at this resolved revision that holds the file
        `name` (the picker's tokenizer beside the engine's weights), read from the entries'
        manifests; None if there is none (or no cache)."""
        folder = self.root / "entries"
        try:
            candidates = sorted(folder.glob(f"{glob.escape(_slug(source))}--*"))
        except OSError:
            return None
        for entry in candidates:
            try:
                manifest = (entry / MANIFEST).read_text()[:MAX_MANIFEST_READ]
                said = json.loads(manifest)
            except (OSError, ValueError):
                continue  # incomplete, or not ours
            if not isinstance(said, dict):
                continue
            same = said.get("source") == source and said.get("revision") == revision
            if same and (entry / name).is_file():
                return entry
        return None

    @contextmanager
    def locked(self, key: str, waiting: Callable[[str, float], None]) -> Iterator[None]:
        """Hold the key's lock; while another process holds it, `waiting(holder, seconds)` is
        called now and then. The lock goes with the process, however it ends."""
        path = self.root / ".locks" / f"{key}.lock"
        with disk_errors(str(path.parent)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            since = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    waiting(holder or "another process", time.monotonic() - since)
                    time.sleep(LOCK_POLL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    def publish(self, tree: Path, key: str, manifest: str) -> Path:
        """Make `tree` (complete and verified) the key's entry, by one rename; the lock is
        held, so no other entry of that key can appear meanwhile."""
        entry = self.entry(key)
        with disk_errors(str(entry)):
            (tree / MANIFEST).write_text(manifest)
            _fsync_tree(tree)
            entry.parent.mkdir(parents=True, exist_ok=True)
            if entry.exists():  # an entry without its manifest: a copy made by hand, or older
                shutil.rmtree(entry)
            os.rename(tree, entry)
            _fsync_dir(entry.parent)
        return entry

    def discard(self, key: str) -> None:
        """What a download of `key` left in staging (after a publish, or when its source's
        files cannot be trusted)."""
        for folder in (self.staging(key), self.partials(key), self.unpacked(key)):
            shutil.rmtree(folder, ignore_errors=True)

    def check_space(self, needed: int) -> None:
        """NoSpace before downloading when the cache's filesystem has less than `needed`."""
        with disk_errors(str(self.root)):
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
        if needed > free:
            raise NoSpace(f"{self.root}: {needed} more bytes are needed and {free} are free")


def link(dest: Path, entry: Path) -> None:
    """`dest` a symbolic link to the entry, replaced in one rename (a reader sees the old
    link or the new one); a real file or directory there is left alone and refused."""
    if dest.exists() and not dest.is_symlink():
        raise FetchError(f"{dest}: exists and is not a link; remove it or choose another --dest")
    with disk_errors(str(dest)):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(entry.resolve(), target_is_directory=True)
        os.replace(tmp, dest)


def _fsync_tree(tree: Path) -> None:
    """Everything under `tree` on disk before the rename that makes it an entry: a crash then
    cannot leave an entry whose files are empty."""
    for folder, _dirs, files in os.walk(tree):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
