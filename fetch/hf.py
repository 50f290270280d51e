"""Files of a Hugging Face model repository, by the Hub's resolve URLs:
`{endpoint}/{repo}/resolve/{revision}/{file}` (what `huggingface_hub` downloads from).

The token ($HF_TOKEN, from the Secret the Model's env names) goes to the Hub only: a redirect
to another host (the Hub's CDN) is followed without it, as huggingface_hub does, and only to
http(s). $HF_ENDPOINT names a mirror (huggingface_hub's variable).
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from infergw.fetch.source import FetchError, Opened

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MAX_REDIRECTS = 5


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, at most MAX_REDIRECTS, the Authorization header kept only
    while the host stays the same."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urlsplit(newurl)
        if target.scheme not in ("http", "https"):
            raise FetchError(f"{req.full_url}: redirected to a {target.scheme or 'relative'} URL")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and target.netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class _Stream:
    """A response read as bytes arrive (read1), so the caller's deadline is checked often."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.resp = resp

    def read(self, n: int) -> bytes:
        return self.resp.read1(n)

    def close(self) -> None:
        self.resp.close()


@dataclass(slots=True)
class HuggingFace:
    repo: str  # org/name
    revision: str = "main"
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    timeout: float = 30.0  # connect and each read

    @classmethod
    def from_environment(cls, repo: str, revision: str, timeout: float) -> HuggingFace:
        token = next((os.environ[e] for e in TOKEN_ENVS if os.environ.get(e)), None)
        endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        return cls(repo, revision, endpoint.rstrip("/"), token, timeout)

    def url(self, name: str) -> str:
        return (
            f"{self.endpoint}/{quote(self.repo)}/resolve/{quote(self.revision, safe='')}/"
            f"{quote(name)}"
        )

    def describe(self, name: str) -> str:
        return self.url(name)

    def open(self, name: str) -> Opened | None:
        url = self.url(name)
        request = urllib.request.Request(url, headers={"User-Agent": "infergate-fetch"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        opener = urllib.request.build_opener(_SameHostAuth)
        try:
            resp = opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 404:
                return None
            if exc.code in (401, 403):
                hint = "set HF_TOKEN" if not self.token else "HF_TOKEN has no access to it"
                raise FetchError(
                    f"{url}: HTTP {exc.code} (a gated or private model: {hint})"
                ) from None
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(f"{url}: {reason}") from None
        length = resp.headers.get("Content-Length")
        return Opened(_Stream(resp), int(length) if length and length.isdigit() else None)
