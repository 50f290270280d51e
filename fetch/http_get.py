"""One HTTP GET of a fetch, as the Hub's files and an HTTP(S) archive are read: redirects to
http(s) only, at most MAX_REDIRECTS, a bearer token sent to the first host alone (never to a
host a redirect leads to, such as the Hub's CDN: huggingface_hub does the same), the answer's
status as our errors, and a ranged answer checked to start where it was asked to.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

from infergw.fetch.source import Denied, FetchError, NotFound, Opened, TransferFailed

MAX_REDIRECTS = 5
USER_AGENT = "infergate-fetch"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, at most MAX_REDIRECTS, the Authorization header kept only
    while scheme and host stay the same."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urlsplit(newurl)
        if target.scheme not in ("http", "https"):
            raise FetchError(f"{req.full_url}: redirected to a {target.scheme or 'relative'} URL")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        origin = urlsplit(req.full_url)
        if new is not None and (target.scheme, target.netloc) != (origin.scheme, origin.netloc):
            new.remove_header("Authorization")
        return new


class Stream:
    """A response read as bytes arrive (read1), so the caller's deadline is checked often;
    a connection cut or timed out mid-body is a TransferFailed (a resumable one)."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.resp = resp

    def read(self, n: int) -> bytes:
        try:
            return self.resp.read1(n)
        except (OSError, http.client.HTTPException) as exc:
            raise TransferFailed(f"interrupted: {exc}") from None

    def close(self) -> None:
        self.resp.close()


def shown(url: str) -> str:
    """The URL without user info, query or fragment (a presigned URL's signature): what
    messages name."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def get(
    url: str,
    *,
    timeout: float,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    denied: Callable[[int], str] = lambda code: "credentials needed",
) -> http.client.HTTPResponse:
    """GET `url` (with `token` as a bearer, to its own host only): NotFound on 404, Denied on
    401/403 (`denied(code)` says why), TransferFailed on 412/416 (the file changed, or the
    partial one is longer), FetchError for anything else that is not an answer."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_SameHostAuth)
    where = shown(url)
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise NotFound(f"{where}: HTTP 404") from None
        if exc.code in (401, 403):
            raise Denied(f"{where}: HTTP {exc.code} ({denied(exc.code)})") from None
        if exc.code in (412, 416):
            raise TransferFailed(f"{where}: HTTP {exc.code} (changed since listed)") from None
        raise FetchError(f"{where}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"{where}: {reason}") from None


def length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def content_range(resp: http.client.HTTPResponse) -> tuple[int, int | None] | None:
    """(first byte, whole size or None) of a 206 answer's Content-Range; None if absent."""
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
    if match is None:
        return None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def opened(resp: http.client.HTTPResponse, url: str, offset: int) -> Opened:
    """The answer to a GET from `offset`: a 206 must start there; a 200 is the whole file
    (the server ignored the range, or the file changed: If-Range)."""
    start = 0
    if resp.status == 206:
        got = content_range(resp)
        if got is None or got[0] != offset:
            resp.close()
            raise TransferFailed(f"{url}: a range that was not asked for")
        start = offset
    return Opened(Stream(resp), length(resp), start)
