"""A Model published as an http(s) archive, read as its tokenizer's source (the picker's init
container in a cluster, or a Model whose weights are not downloaded yet): the archive is
streamed once and only the tokenizer's members are kept, in memory, each within the
tokenizer's per-file limit; nothing of the weights is written anywhere.

Why a stream rather than the whole archive: the picker's pod has a 512 MiB volume and 1 GiB
of memory, far less than a model. Without a `#sha256=` the stream stops as soon as every
tokenizer file is found (nothing would be checked by reading on); with one, it is read to
its end and hashed, and a digest that differs keeps nothing: the picker tokenizes with what
the engine's verified download unpacks, or with nothing. Either way the stream is bounded by
`max_bytes` (the download's own bound by default) and by the timeout between two reads.

Members are taken by name only: `NAME` or `TOP/NAME` (an archive's one top folder is the
model's, as unpack.py takes it), regular files only; links, devices and other paths are
passed over unread. A tar in any of Python's compressions is streamed; a zip (its index is
at its end) is not read this way: its tokenizer comes from the weights cache alone.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, field
from io import BytesIO

from infergw.fetch import http_get
from infergw.fetch.archive import HttpArchive
from infergw.fetch.source import CHUNK, FetchError, Limits, Opened, Stream
from infergw.fetch.unpack import TAR_SUFFIXES


class _Counted:
    """The archive's bytes as tarfile reads them: counted against the bound, hashed."""

    def __init__(self, stream: Stream, max_bytes: int, where: str) -> None:
        self.stream, self.max_bytes, self.where = stream, max_bytes, where
        self.read_bytes = 0
        self.sha256 = hashlib.sha256()

    def read(self, n: int = CHUNK) -> bytes:
        data = self.stream.read(n)
        self.read_bytes += len(data)
        if self.read_bytes > self.max_bytes:
            raise FetchError(f"{self.where}: more than the {self.max_bytes} bytes allowed")
        self.sha256.update(data)
        return data


@dataclass(slots=True)
class ArchiveTokenizer:
    archive: HttpArchive
    names: tuple[str, ...]  # the tokenizer files wanted
    limits: Limits  # per file
    max_bytes: int  # the whole archive
    _members: dict[str, bytes] | None = field(default=None, init=False)

    @staticmethod
    def reads(name: str) -> bool:
        """Whether an archive of this file name is streamed (a tar)."""
        return name.lower().endswith(TAR_SUFFIXES)

    def describe(self, name: str) -> str:
        return f"{http_get.shown(self.archive.url)}: {name}"

    def open(self, name: str) -> Opened | None:
        if self._members is None:
            self._members = self._scan()
        data = self._members.get(name)
        return None if data is None else Opened(BytesIO(data), len(data))

    def _scan(self) -> dict[str, bytes]:
        where = http_get.shown(self.archive.url)
        if not self.reads(self.archive.name):
            raise FetchError(f"{where}: a zip's tokenizer is read from the weights cache only")
        resp = http_get.get(self.archive.url, timeout=self.archive.timeout)
        opened = http_get.opened(resp, where, 0)
        counted = _Counted(opened.stream, self.max_bytes, where)
        found: dict[str, bytes] = {}
        top: str | None = None
        try:
            with tarfile.open(fileobj=counted, mode="r|*") as tar:
                for member in tar:
                    parts = member.name.strip("/").split("/")
                    if len(parts) == 2:
                        top = top or parts[0]
                    name = parts[-1]
                    at_top = len(parts) == 1 or (len(parts) == 2 and parts[0] == top)
                    if not (member.isreg() and at_top and name in self.names) or name in found:
                        continue
                    if member.size > self.limits.max_bytes:
                        raise FetchError(
                            f"{where}: {member.name} has {member.size} bytes, more than the "
                            f"{self.limits.max_bytes} allowed"
                        )
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # a regular file
                    found[name] = extracted.read()
                    if len(found) == len(self.names) and self.archive.sha256 is None:
                        return found  # nothing to verify by reading on
            while counted.read(CHUNK):  # the rest, hashed (a tar's end padding too)
                pass
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise FetchError(f"{where}: not a readable tar archive: {exc}") from None
        finally:
            opened.stream.close()
        if self.archive.sha256 and counted.sha256.hexdigest() != self.archive.sha256:
            raise FetchError(f"{where}: the archive's SHA-256 differs from the URL's #sha256=")
        return found
