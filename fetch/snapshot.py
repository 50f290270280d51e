"""What a weights download copies: a snapshot of a model repository — its files at one resolved
revision, each with the size and checksums its source gives — and the protocol of a source
that lists one and reads its files from an offset (a resumed transfer).

Names come from a remote listing (the Hub's API, S3 keys, an archive's members), so each is
checked before it names a path: relative, no `..`, no empty or dot parts, no backslash or NUL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Protocol

from infergw.fetch.source import Opened, Unsafe

MAX_NAME = 1024  # characters of a relative path (Linux's PATH_MAX is 4096, a part 255)
MAX_PART = 255
MAX_FILES = 100_000  # more than any model repository; a listing beyond it is refused


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of the snapshot: what the source says of it, to verify what arrives."""

    path: str  # relative, '/'-separated, checked by safe_path
    size: int | None  # None: the source does not say (a plain HTTP file without a length)
    sha256: str | None = None  # hex; the Hub's LFS files, S3 objects uploaded with one
    git_sha1: str | None = None  # hex git blob id; the Hub's files kept in git
    md5: str | None = None  # hex; an S3 object uploaded in one part (its ETag)
    version: str | None = None  # what a resumed read must still match (an ETag)


@dataclass(frozen=True, slots=True)
class Snapshot:
    source: str  # canonical, without credentials: hf://org/name, s3://bucket/prefix, a path
    revision: str  # resolved: a commit, or a digest of the listing
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def manifest(self) -> str:
        """The snapshot as JSON, kept beside the files of a cache entry."""
        return json.dumps(
            {
                "source": self.source,
                "revision": self.revision,
                "files": [
                    {k: v for k, v in asdict(f).items() if v is not None} for f in self.files
                ],
            },
            indent=1,
        )


class Repository(Protocol):
    def snapshot(self) -> Snapshot:
        """The files at the resolved revision; NotFound, Denied or FetchError otherwise."""
        ...

    def open_at(self, file: RemoteFile, offset: int) -> Opened:
        """`file` from byte `offset` (the server may send it whole: see Opened.start);
        NotFound if it went away, Denied, or FetchError."""
        ...


def safe_path(name: str, where: str) -> str:
    """`name` as a relative path inside a directory, or Unsafe saying why not."""
    if not name or len(name) > MAX_NAME or "\\" in name or "\0" in name:
        raise Unsafe(f"{where}: refusing the file name {name[:80]!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or any(p in ("", ".", "..") for p in name.split("/")):
        raise Unsafe(f"{where}: refusing the file name {name[:80]!r} (outside the model's folder)")
    if any(len(p.encode()) > MAX_PART for p in path.parts):
        raise Unsafe(f"{where}: refusing the file name {name[:80]!r} (a part over 255 bytes)")
    return name


def checked_files(files: list[RemoteFile], where: str) -> tuple[RemoteFile, ...]:
    """The listing with every name checked, no name twice and no name both a file and a
    folder (`a` and `a/b`), within MAX_FILES; sorted, so the revision digest is stable."""
    if len(files) > MAX_FILES:
        raise Unsafe(f"{where}: {len(files)} files, more than the {MAX_FILES} allowed")
    names = set()
    for f in files:
        if f.path in names:
            raise Unsafe(f"{where}: {f.path!r} listed twice")
        names.add(safe_path(f.path, where))
        if f.size is not None and f.size < 0:
            raise Unsafe(f"{where}: {f.path!r} has a negative size")
    for name in names:
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            if str(parent) in names:
                raise Unsafe(f"{where}: {str(parent)!r} is both a file and a folder")
            parent = parent.parent
    return tuple(sorted(files, key=lambda f: f.path))


def listing_digest(files: tuple[RemoteFile, ...]) -> str:
    """A revision for a source without commits (S3, a directory): what names, sizes and
    versions it lists; any change makes another cache entry."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.version or f.sha256 or f.md5 or ''}\n".encode())
    return h.hexdigest()[:32]
