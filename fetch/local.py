"""A model folder on this machine as a snapshot source: a local path, `file://PATH`, or a
`pvc://CLAIM/PATH` where the claim is mounted at `<pvc root>/CLAIM` (the init container's
mount). Copied into the cache like any other source, so an engine reads it from the node's
own disk, whatever the claim's storage.

Symbolic links to files are followed (a Hugging Face cache's snapshot folder links into its
blobs); a link to a folder is refused, as are links that lead nowhere. Each file's size and
mtime make the revision: a file changed in place makes another entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from infergw.fetch.snapshot import RemoteFile, Snapshot, checked_files, listing_digest
from infergw.fetch.source import FetchError, NotFound, Opened, Unsafe


class _File:
    """A local file read from an offset."""

    def __init__(self, path: Path, offset: int) -> None:
        self._f = path.open("rb")
        self._f.seek(offset)

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


@dataclass(frozen=True, slots=True)
class LocalFolder:
    root: Path
    name: str  # how the source is named in messages and the cache (no credentials here)

    def snapshot(self) -> Snapshot:
        if not self.root.is_dir():
            raise NotFound(f"{self.name}: no such folder ({self.root})")
        files = []
        try:
            for folder, dirs, names in os.walk(self.root, onerror=_raise):
                for d in dirs:
                    if os.path.islink(os.path.join(folder, d)):
                        raise Unsafe(f"{self.name}: {d} is a link to a folder")
                for n in names:
                    path = Path(folder, n)
                    st = path.stat()  # follows a link to a file; a dangling one raises
                    rel = path.relative_to(self.root).as_posix()
                    files.append(RemoteFile(rel, st.st_size, version=str(st.st_mtime_ns)))
        except OSError as exc:
            raise FetchError(f"{self.name}: {exc}") from None
        checked = checked_files(files, self.name)
        return Snapshot(self.name, listing_digest(checked), checked)

    def open_at(self, file: RemoteFile, offset: int) -> Opened:
        path = self.root / file.path
        try:
            size = path.stat().st_size
            return Opened(_File(path, offset), size - offset, offset)
        except FileNotFoundError:
            raise NotFound(f"{self.name}/{file.path}: gone since it was listed") from None
        except OSError as exc:
            raise FetchError(f"{self.name}/{file.path}: {exc}") from None


def _raise(exc: OSError) -> None:
    raise exc
