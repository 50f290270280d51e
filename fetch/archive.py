"""A model published as one archive over HTTP(S) (`https://host/path/model.tar.gz`, tar in
any of Python's compressions, or zip) as a snapshot source: the archive is the one file, its
size from the server (asked with a one-byte range, which a presigned GET URL allows where a
HEAD would not), its SHA-256 when the caller gives one (`--sha256`), its ETag as the version a
resumed read must match (If-Range: a changed archive comes back whole). The SHA-256 may be
named in the URL itself, `https://host/model.tar.gz#sha256=HEX` (checksum_in_url). unpack.py
then makes the model folder of it.

The URL's query (a presigned URL's signature) and user info stay out of messages and of the
cache key: the source is named by scheme, host and path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from infergw.fetch import http_get
from infergw.fetch.snapshot import RemoteFile, Snapshot, checked_files
from infergw.fetch.source import Opened, Unsafe
from infergw.fetch.unpack import is_archive

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FRAGMENT = re.compile(r"sha256=([0-9a-f]{64})")


def checksum_in_url(url: str, given: str | None) -> tuple[str, str | None]:
    """The URL without its fragment, and the SHA-256 the fragment names as `#sha256=HEX` (as
    pip reads a file's hash from its URL): how a Model, whose `modelURI` is one string, says
    what its archive must hash to. It must agree with `given` (`--sha256`), if both say one;
    a fragment of any other form is refused rather than ignored."""
    base, sep, fragment = url.partition("#")
    if not sep:
        return url, given
    match = _FRAGMENT.fullmatch(fragment)
    if match is None:
        raise ValueError(
            f"{http_get.shown(base)}: the URL's fragment may only be #sha256=<64 lowercase hex "
            f"digits>, not #{fragment[:80]!r}"
        )
    if given is not None and given != match.group(1):
        raise ValueError(f"{http_get.shown(base)}: --sha256 and the URL's #sha256= differ")
    return base, match.group(1)


@dataclass(frozen=True, slots=True)
class HttpArchive:
    url: str
    sha256: str | None = None  # hex, from the caller
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"--sha256 {self.sha256!r}: 64 lowercase hex digits")

    @property
    def name(self) -> str:
        return unquote(PurePosixPath(urlsplit(self.url).path).name)

    def snapshot(self) -> Snapshot:
        where = http_get.shown(self.url)
        if not is_archive(self.name):
            raise Unsafe(f"{where}: not an archive (.tar[.gz|.bz2|.xz], .tgz or .zip)")
        with http_get.get(self.url, timeout=self.timeout, headers={"Range": "bytes=0-0"}) as resp:
            size = http_get.length(resp) if resp.status == 200 else None
            if resp.status == 206 and (got := http_get.content_range(resp)) is not None:
                size = got[1]
            etag = resp.headers.get("ETag")
            modified = resp.headers.get("Last-Modified")
        strong = etag if etag and not etag.startswith("W/") else None
        file = RemoteFile(self.name, size, sha256=self.sha256, version=strong or modified)
        revision = self.sha256 or strong or modified or "unversioned"
        return Snapshot(where, revision, checked_files([file], where))

    def open_at(self, file: RemoteFile, offset: int) -> Opened:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if file.version:
                headers["If-Range"] = file.version
        resp = http_get.get(self.url, timeout=self.timeout, headers=headers)
        return http_get.opened(resp, http_get.shown(self.url), offset)
