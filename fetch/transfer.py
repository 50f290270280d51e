"""One file of a snapshot onto disk: appended to its partial file from where an earlier try
stopped (the source asked for the rest by range), checked against the size and the strongest
checksum the listing gives, then renamed into the staging tree. A transfer cut short keeps
its partial file and is tried again (at most `retries` more times, resuming); a file that
arrives longer than listed, or whose checksum differs, loses it: its bytes cannot be trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from infergw.fetch.cache import disk_errors
from infergw.fetch.progress import Progress
from infergw.fetch.snapshot import RemoteFile, Repository
from infergw.fetch.source import CHUNK, TransferFailed, Unsafe

log = logging.getLogger("fetch.transfer")

HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Retry:
    retries: int = 2  # more tries of a file after a transfer that failed
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one


class Checksum:
    """The strongest check the listing allows: SHA-256, else the git blob id (SHA-1 over
    "blob <size>\\0" and the content), else an S3 ETag's MD5; none: the size alone."""

    def __init__(self, file: RemoteFile) -> None:
        self.file = file
        self.reset()

    def reset(self) -> None:
        """Back to no bytes seen (the source sent the file again from its start)."""
        file = self.file
        self.want: str | None = file.sha256 or file.git_sha1 or file.md5
        self.name = "sha256" if file.sha256 else "git blob sha1" if file.git_sha1 else "md5"
        self._h = None
        if file.sha256:
            self._h = hashlib.sha256()
        elif file.git_sha1 and file.size is not None:
            self._h = hashlib.sha1(f"blob {file.size}\0".encode(), usedforsecurity=False)
        elif file.md5:
            self._h = hashlib.md5(usedforsecurity=False)
        else:
            self.want = None

    def update(self, data: bytes) -> None:
        if self._h is not None:
            self._h.update(data)

    def mismatch(self) -> str | None:
        """What differs, or None when it matches (or there is nothing to check)."""
        if self._h is None or self.want is None:
            return None
        got = self._h.hexdigest()
        return None if got == self.want else f"{self.name} {got}, the source lists {self.want}"


def fetch_file(
    repo: Repository,
    file: RemoteFile,
    staging: Path,
    partials: Path,
    progress: Progress,
    max_bytes: int,
    retry: Retry = Retry(),
) -> None:
    """`file` verified at `staging / file.path`, resuming `partials / file.path`."""
    target = staging / file.path
    if target.is_file() and (file.size is None or target.stat().st_size == file.size):
        progress.file_done()  # verified and renamed by an earlier try; counted in `already`
        return
    partial = partials / file.path
    with disk_errors(str(partial.parent)):
        partial.parent.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
    progress.file(file.path)
    for attempt in range(retry.retries + 1):
        try:
            _fetch_once(repo, file, partial, progress, max_bytes)
            break
        except TransferFailed as exc:
            if attempt == retry.retries:
                raise
            pause = retry.backoff * 2**attempt
            log.warning("%s; trying again in %.1fs (resuming)", exc, pause)
            time.sleep(pause)
    with disk_errors(str(target)):
        os.replace(partial, target)
    progress.file_done()


def _fetch_once(
    repo: Repository, file: RemoteFile, partial: Path, progress: Progress, max_bytes: int
) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    if file.size is not None and offset > file.size:
        offset = _restart(partial, progress, offset)  # longer than the file: not its bytes
    check = Checksum(file)
    _hash_existing(partial, offset, check)
    if file.size is None or offset < file.size:
        offset = _receive(repo, file, partial, offset, check, progress, max_bytes)
    if file.size is not None and offset != file.size:
        raise TransferFailed(f"{file.path}: {offset} of {file.size} bytes arrived")
    if (wrong := check.mismatch()) is not None:
        _restart(partial, progress, offset)
        raise TransferFailed(f"{file.path}: its content is not the listed one ({wrong})")


def _receive(
    repo: Repository,
    file: RemoteFile,
    partial: Path,
    offset: int,
    check: Checksum,
    progress: Progress,
    max_bytes: int,
) -> int:
    """Append what the source sends from `offset`; the new length."""
    opened = repo.open_at(file, offset)
    try:
        if opened.start != offset:  # the whole file came back: start over
            offset = _restart(partial, progress, offset)
            check.reset()
        declared = opened.start + opened.length if opened.length is not None else None
        limit = min(max_bytes, file.size if file.size is not None else declared or max_bytes)
        if declared is not None and declared > limit:
            raise Unsafe(f"{file.path}: {declared} bytes, more than the {limit} expected")
        with disk_errors(str(partial)), partial.open("ab") as out:
            while chunk := opened.stream.read(CHUNK):
                if offset + len(chunk) > limit:
                    out.close()
                    _restart(partial, progress, offset)
                    raise Unsafe(f"{file.path}: more than the {limit} bytes expected")
                out.write(chunk)
                offset += len(chunk)
                check.update(chunk)
                progress.advance(len(chunk))
            out.flush()
    finally:
        opened.stream.close()
    if declared is not None and offset < declared:
        raise TransferFailed(f"{file.path}: cut off after {offset} of {declared} bytes")
    return offset


def _hash_existing(partial: Path, length: int, check: Checksum) -> None:
    """Feed what an earlier try wrote to the checksum, so a resumed file is checked whole."""
    if not length or check.want is None:
        return
    with partial.open("rb") as f:
        while data := f.read(HASH_CHUNK):
            check.update(data)


def _restart(partial: Path, progress: Progress, had: int) -> int:
    partial.unlink(missing_ok=True)
    progress.advance(-had)
    return 0
