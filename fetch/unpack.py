"""An archive's files into a folder, refusing what would escape it or is no model file: names
that are absolute or climb out (`..`), symbolic and hard links, devices and fifos, a name
given twice, and more bytes in all than the download allows (a zip's declared sizes are
checked as it inflates). Files get mode 0644 and folders 0755, whatever the archive says.

An archive whose members all sit in one top folder (`model/config.json`, ...) gives that
folder's content: the engine wants config.json at the top of its model path.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from infergw.fetch.cache import disk_errors
from infergw.fetch.snapshot import MAX_FILES, safe_path
from infergw.fetch.source import CHUNK, FetchError, Unsafe

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)


def is_archive(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES + ZIP_SUFFIXES)


def unpack(archive: Path, into: Path, max_bytes: int) -> Path:
    """`archive`'s files under `into`; the folder holding the model (`into`, or its one top
    folder)."""
    what = archive.name
    _Writer(into, what, max_bytes).run(archive)
    top = list(into.iterdir())
    if len(top) == 1 and top[0].is_dir() and not top[0].is_symlink():
        return top[0]
    return into


class _Writer:
    def __init__(self, into: Path, what: str, max_bytes: int) -> None:
        self.into, self.what, self.max_bytes = into, what, max_bytes
        self.total = 0
        self.names: set[str] = set()

    def run(self, archive: Path) -> None:
        with disk_errors(str(self.into)):
            self.into.mkdir(parents=True, exist_ok=True)
        try:
            if archive.name.lower().endswith(ZIP_SUFFIXES):
                self._zip(archive)
            else:
                self._tar(archive)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise FetchError(f"{self.what}: not a readable archive ({exc})") from None

    def _tar(self, archive: Path) -> None:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = self._name(member.name)
                if name is None:
                    continue
                if member.isdir():
                    self._folder(name)
                elif member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has one
                    self._file(name, source, member.size)
                else:
                    kind = "a link" if member.issym() or member.islnk() else "not a regular file"
                    raise Unsafe(f"{self.what}: {member.name!r} is {kind}")

    def _zip(self, archive: Path) -> None:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = self._name(info.filename)
                if name is None:
                    continue
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise Unsafe(f"{self.what}: {info.filename!r} is a link")
                if info.is_dir():
                    self._folder(name)
                    continue
                with z.open(info) as source:
                    self._file(name, source, info.file_size)

    def _name(self, raw: str) -> str | None:
        """The member's checked relative name; None for the archive's own top (`./`)."""
        name = raw
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        if name in ("", "."):
            return None
        safe_path(name, self.what)
        if name in self.names:
            raise Unsafe(f"{self.what}: {name!r} twice")
        self.names.add(name)
        if len(self.names) > MAX_FILES:
            raise Unsafe(f"{self.what}: more than {MAX_FILES} members")
        return name

    def _folder(self, name: str) -> None:
        with disk_errors(str(self.into / name)):
            (self.into / name).mkdir(mode=0o755, parents=True, exist_ok=True)

    def _file(self, name: str, source: IO[bytes], declared: int) -> None:
        self._count(declared)
        path = self.into / name
        written = 0
        with disk_errors(str(path)):
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with path.open("xb") as out:
                while chunk := source.read(CHUNK):
                    written += len(chunk)
                    if written > declared:
                        raise Unsafe(f"{self.what}: {name!r} inflates past its {declared} bytes")
                    out.write(chunk)
            path.chmod(0o644)

    def _count(self, size: int) -> None:
        self.total += size
        if self.total > self.max_bytes:
            raise Unsafe(f"{self.what}: more than the {self.max_bytes} bytes allowed unpacked")
