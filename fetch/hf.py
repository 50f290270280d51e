"""Files of a Hugging Face model repository, by the Hub's resolve URLs:
`{endpoint}/{repo}/resolve/{revision}/{file}` (what `huggingface_hub` downloads from), and
for a weights download its snapshot by the API huggingface_hub's `model_info(...,
files_metadata=True)` calls: `{endpoint}/api/models/{repo}/revision/{revision}?blobs=true`,
which answers the commit (`sha`) and per file (`siblings`) its `size`, its git `blobId` and,
for an LFS file, `lfs.sha256`. The files are then read at that commit, so a branch that
moves meanwhile cannot mix two revisions, and checked against those sizes and checksums.

The token ($HF_TOKEN, from the Secret the Model's env names) goes to the Hub only: a redirect
to another host (the Hub's CDN) is followed without it, as huggingface_hub does, and only to
http(s) (http_get.py). $HF_ENDPOINT names a mirror (huggingface_hub's variable).
"""

from __future__ import annotations

import http.client
import json
import os
import re
from dataclasses import dataclass
from urllib.parse import quote

from infergw.fetch import http_get
from infergw.fetch.snapshot import RemoteFile, Snapshot, checked_files
from infergw.fetch.source import FetchError, NotFound, Opened

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MAX_LISTING_BYTES = 64 << 20  # the API's answer for a repository of many thousand files
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A branch, tag or commit, as api/workload.py's MODEL_REVISION allows (checked again here: a
# command line is input too). It becomes a path segment of the Hub's URLs, so no `..`.
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")


def check_revision(revision: str) -> None:
    """ValueError unless `revision` is a branch, tag or commit name."""
    if not _REVISION.fullmatch(revision) or ".." in revision:
        raise ValueError(f"revision {revision[:80]!r}: not a branch, tag or commit")


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

    def url(self, name: str, revision: str | None = None) -> str:
        rev = quote(revision or self.revision, safe="")
        return f"{self.endpoint}/{quote(self.repo)}/resolve/{rev}/{quote(name)}"

    def describe(self, name: str) -> str:
        return self.url(name)

    def _get(self, url: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        return http_get.get(
            url, timeout=self.timeout, token=self.token, headers=headers, denied=self._denied
        )

    def _denied(self, code: int) -> str:
        # The Hub answers 401 for a repository that does not exist, too.
        hint = "set HF_TOKEN" if not self.token else "HF_TOKEN has no access to it"
        return f"a gated, private or missing model: {hint}"

    def open(self, name: str) -> Opened | None:
        try:
            resp = self._get(self.url(name))
        except NotFound:
            return None
        return Opened(http_get.Stream(resp), http_get.length(resp))

    # ---- a weights snapshot ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        rev = quote(self.revision, safe="")
        url = f"{self.endpoint}/api/models/{quote(self.repo)}/revision/{rev}?blobs=true"
        with self._get(url) as resp:
            body = resp.read(MAX_LISTING_BYTES + 1)
        if len(body) > MAX_LISTING_BYTES:
            raise FetchError(f"{url}: an answer over {MAX_LISTING_BYTES} bytes")
        try:
            info = json.loads(body)
            commit = info["sha"]
            siblings = info["siblings"]
            if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
                raise ValueError(f"sha {commit!r} is not a commit")
            files = [_remote_file(s, commit) for s in siblings]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"{url}: not the Hub's answer ({exc})") from None
        where = f"hf://{self.repo}@{commit}"
        return Snapshot(f"hf://{self.repo}", commit, checked_files(files, where))

    def open_at(self, file: RemoteFile, offset: int) -> Opened:
        """`file` at the snapshot's commit (`file.version`), from `offset` by a Range request;
        the CDN the Hub redirects to honours it too, and gets no token."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        url = self.url(file.path, file.version)
        return http_get.opened(self._get(url, headers), url, offset)


def _remote_file(sibling: dict, commit: str) -> RemoteFile:
    """One entry of the API's `siblings`: its size and checksums, where given and well formed,
    to be read at `commit`."""
    name = sibling["rfilename"]
    if not isinstance(name, str):
        raise ValueError("rfilename is not a string")
    lfs = sibling.get("lfs") or {}
    size = lfs.get("size", sibling.get("size"))
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise ValueError(f"{name}: size {size!r}")
    sha256 = lfs.get("sha256")
    blob = sibling.get("blobId")
    return RemoteFile(
        path=name,
        size=size,
        sha256=sha256 if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else None,
        # A git blob id checks the content of a file kept in git, not of an LFS pointer's target.
        git_sha1=blob if not lfs and isinstance(blob, str) and _COMMIT.fullmatch(blob) else None,
        version=commit,
    )
