"""A Hugging Face Hub of our own over real HTTP on 127.0.0.1, with the Hub's URL layout: the
revision API (`/api/models/{repo}/revision/{rev}?blobs=true`: the commit and per file its
size, git blob id and, for LFS files, sha256), resolve URLs that serve files kept in git and
redirect LFS files to a CDN (another server: another host, which must not get the token),
and Range requests on both. Faults to inject: a transfer cut off after some bytes, bytes that
differ from the listing (or are longer), a listing without sizes, hostile names, and a slow drip.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d+)-")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Request:
    host: str  # "hub" or "cdn"
    path: str
    range: str | None
    auth: str | None


@dataclass
class Mirror:
    """What the mirror serves and how; what it was asked."""

    repo: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # served from the CDN, listed with sha256
    token: str | None = None  # set: the hub wants it (a gated model)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, then close
    cut_times: int = 1  # how many answers are cut (then whole)
    served: dict[str, bytes] = field(default_factory=dict)  # served instead of what is listed
    extra_listed: list[dict] = field(default_factory=list)  # hostile siblings
    sizes: bool = True  # the listing gives sizes and checksums (blobs=true)
    drip: float = 0.0  # seconds between 64 KiB chunks
    requests: list[Request] = field(default_factory=list)
    hub_url: str = ""
    cdn_url: str = ""
    _cuts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def listing(self) -> dict:
        siblings = []
        for name, data in sorted(self.files.items()):
            entry: dict = {"rfilename": name}
            if self.sizes:
                entry |= {"size": len(data), "blobId": git_blob_id(data)}
                if name in self.lfs:
                    sha = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo, "sha": COMMIT, "siblings": siblings + self.extra_listed}

    def asked(self, host: str, name: str) -> list[Request]:
        return [r for r in self.requests if r.host == host and r.path.endswith("/" + name)]

    def cut(self, name: str) -> int | None:
        """Bytes after which this answer is cut, if it is one of the first `cut_times`."""
        with self._lock:
            if name not in self.cut_after or self._cuts.get(name, 0) >= self.cut_times:
                return None
            self._cuts[name] = self._cuts.get(name, 0) + 1
            return self.cut_after[name]


def _handler(m: Mirror, host: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            m.requests.append(Request(host, self.path, self.headers.get("Range"), auth))
            if host == "hub" and m.token and auth != f"Bearer {m.token}":
                return self._send(401, b'{"error": "gated"}')
            api = f"/api/models/{m.repo}/revision/"
            if host == "hub" and self.path.startswith(api):
                rev = self.path.removeprefix(api).partition("?")[0]
                if rev not in ("main", COMMIT):
                    return self._send(404, b'{"error": "Revision Not Found"}')
                return self._send(200, json.dumps(m.listing()).encode())
            prefix = f"/{m.repo}/resolve/{COMMIT}/" if host == "hub" else "/cdn/"
            name = self.path.removeprefix(prefix)
            if not self.path.startswith(prefix) or name not in m.files:
                return self._send(404, b"Entry not found")
            if host == "hub" and name in m.lfs:
                self.send_response(302)
                self.send_header("Location", f"{m.cdn_url}/cdn/{name}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self._file(name, m.served.get(name, m.files[name]))

        def _file(self, name: str, data: bytes) -> None:
            start = 0
            match = _RANGE.fullmatch(self.headers.get("Range") or "")
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    return self._send(416, b"")
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            cut = m.cut(name)
            if cut is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            body = data[start:] if cut is None else data[start:cut]
            for i in range(0, len(body), 1 << 16):
                self.wfile.write(body[i : i + (1 << 16)])
                if m.drip:
                    self.wfile.flush()
                    time.sleep(m.drip)
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that stopped reading (a cut-off or refused transfer): expected
        super().handle_error(request, client_address)


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), handler)
    # A short poll: shutdown() waits for the loop to look, 0.5 s a server by default.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def running_mirror(mirror: Mirror) -> Iterator[Mirror]:
    with serve(_handler(mirror, "cdn")) as cdn, serve(_handler(mirror, "hub")) as hub:
        mirror.cdn_url, mirror.hub_url = cdn, hub
        yield mirror
