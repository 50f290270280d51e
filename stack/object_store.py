"""A local S3 for an example: moto's S3 server on a loopback port, a bucket, and the files the
example's Models download from it (examples/lifecycle). `infergate up` starts it before the
controllers, so the pods' `infergate download` init containers and runtime sidecars fetch
their weights and adapters from it as they would from any S3-compatible store.

The example says what to serve in a document of its own, read here and nowhere else (the
controllers skip the kind, controllers/manifests.py):

    apiVersion: stack.infergate.io/v1alpha1
    kind: LocalObjectStore
    metadata: {name: weights}
    spec:
      endpoint: http://127.0.0.1:9700   # what the Models' AWS_ENDPOINT_URL names
      bucket: lifecycle
      uploads:
      - prefix: tiny                    # every file of a folder (relative: from the file://
        directory: simulator/default_model   # root, stack/resources.py)
      - prefix: tiny-sql
        files: {adapter_config.json: '{"r": 8}'}   # or files written here

moto is a test dependency, not a runtime one (the `local-s3` extra): without it the stack
stops before starting anything, naming the extra. moto keeps objects in memory and checks no
signature, so the uploads are plain HTTP PUTs (no boto3 in the stack) and a restart would
lose them: the server is not supervised, its death is the stack's failure to start.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import quote, urlsplit

from infergw.api.lifetime import spawn, stop
from infergw.api.names import LOCAL_OBJECT_STORE_KIND

EXTRA = "local-s3"
MISSING_MOTO = (
    "{example}'s LocalObjectStore runs moto's S3 server, which is not installed here: "
    f"pip install 'infergw[{EXTRA}]' (or moto[server])"
)
MAX_UPLOAD_BYTES = 64 << 20  # an example's files, not a real model: a bound on what we read
MAX_FILES = 256
# S3's bucket names (path-style, no dots: nothing to confuse with a host name).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,511}\Z")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_LOOPBACK = ("127.0.0.1", "localhost")


class ObjectStoreError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Upload:
    """Objects under `prefix/`: the files of `directory`, or `files` (name → text)."""

    prefix: str
    directory: Path | None = None
    files: tuple[tuple[str, str], ...] = ()

    def objects(self) -> list[tuple[str, bytes]]:
        """(key, content) of every object, read now (bounded)."""
        out = [(f"{self.prefix}/{name}", text.encode()) for name, text in self.files]
        if self.directory is not None:
            if not self.directory.is_dir():
                raise ObjectStoreError(f"upload {self.prefix}: {self.directory} is no directory")
            paths = sorted(p for p in self.directory.iterdir() if p.is_file())
            if len(paths) > MAX_FILES:
                raise ObjectStoreError(f"upload {self.prefix}: more than {MAX_FILES} files")
            out += [(f"{self.prefix}/{p.name}", p.read_bytes()) for p in paths]
        if sum(len(data) for _, data in out) > MAX_UPLOAD_BYTES:
            raise ObjectStoreError(f"upload {self.prefix}: more than {MAX_UPLOAD_BYTES} bytes")
        return out


@dataclass(frozen=True, slots=True)
class ObjectStoreSpec:
    """One LocalObjectStore document, checked."""

    name: str
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    uploads: tuple[Upload, ...]

    @property
    def port(self) -> int:
        port = urlsplit(self.endpoint).port
        assert port is not None
        return port

    @classmethod
    def parse(cls, doc: dict, root: Path) -> ObjectStoreSpec:
        """From the document; relative directories start at `root` (the file:// root)."""
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = str(meta.get("name") or "")
        where = f"{LOCAL_OBJECT_STORE_KIND} {name or '(unnamed)'}"
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise ObjectStoreError(f"{where}: no spec")
        endpoint = spec.get("endpoint")
        if not isinstance(endpoint, str) or not _loopback_endpoint(endpoint):
            raise ObjectStoreError(
                f"{where}: spec.endpoint must be http://127.0.0.1:PORT (a loopback address and "
                f"a port), not {endpoint!r}"
            )
        bucket = spec.get("bucket")
        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            raise ObjectStoreError(f"{where}: spec.bucket {bucket!r} is not an S3 bucket name")
        uploads = spec.get("uploads") or []
        if not isinstance(uploads, list):
            raise ObjectStoreError(f"{where}: spec.uploads must be a list")
        chosen = tuple(_upload(where, u, root) for u in uploads)
        return cls(name, endpoint.rstrip("/"), bucket, chosen)


def _loopback_endpoint(endpoint: str) -> bool:
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        return False
    bare = parts.path in ("", "/") and not (parts.query or parts.fragment or parts.username)
    return parts.scheme == "http" and parts.hostname in _LOOPBACK and bool(port) and bare


def _upload(where: str, entry: object, root: Path) -> Upload:
    if not isinstance(entry, dict):
        raise ObjectStoreError(f"{where}: an upload must be a mapping, not {entry!r}")
    prefix = str(entry.get("prefix") or "").strip("/")
    if not _PREFIX.match(prefix) or ".." in prefix.split("/"):
        raise ObjectStoreError(f"{where}: upload prefix {prefix!r} is not a plain key prefix")
    directory = entry.get("directory")
    files = entry.get("files") or {}
    if (directory is None) == (not files):
        raise ObjectStoreError(f"{where}: upload {prefix} needs one of directory or files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and _FILE_NAME.match(k) and isinstance(v, str) for k, v in files.items()
    ):
        raise ObjectStoreError(f"{where}: upload {prefix}'s files must map file names to text")
    folder = None
    if directory is not None:
        if not isinstance(directory, str) or not directory:
            raise ObjectStoreError(f"{where}: upload {prefix}'s directory must be a path")
        folder = (root / directory).resolve()
    return Upload(prefix, folder, tuple(sorted(files.items())))


def moto_installed() -> bool:
    return find_spec("moto") is not None and find_spec("moto.server") is not None


class ObjectStoreServer:
    """moto's S3 server for one spec, filled with its uploads; started and stopped by its
    owner (the local stack)."""

    def __init__(self, spec: ObjectStoreSpec, workdir: Path) -> None:
        self.spec = spec
        self.log = workdir / f"object-store-{spec.name or spec.bucket}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server, wait until it answers, create the bucket and upload."""
        if not moto_installed():
            raise RuntimeError(MISSING_MOTO.format(example="the example"))
        host = urlsplit(self.spec.endpoint).hostname or "127.0.0.1"
        cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(self.spec.port)]
        with open(self.log, "ab") as out:
            self.proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait(timeout)
            self._fill()
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise RuntimeError(
                    f"the local S3 (moto) on {self.spec.endpoint} exited with "
                    f"{self.proc.returncode} (port taken?): {tail}"
                )
            try:
                with urllib.request.urlopen(f"{self.spec.endpoint}/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local S3 on {self.spec.endpoint} gave no answer")
            time.sleep(0.1)

    def _fill(self) -> None:
        bucket = f"{self.spec.endpoint}/{self.spec.bucket}"
        _put(bucket, b"")
        for upload in self.spec.uploads:
            for key, data in upload.objects():
                _put(f"{bucket}/{quote(key)}", data)

    def objects(self) -> int:
        return sum(len(u.objects()) for u in self.spec.uploads)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop(proc)


def _put(url: str, data: bytes) -> None:
    """One unsigned PUT (moto checks no signature): a bucket, or an object."""
    # A type of its own: urllib's default (a form) has the server parse the body as one.
    headers = {"Content-Type": "application/octet-stream"}
    request = urllib.request.Request(url, data=data, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors="replace")
        raise RuntimeError(f"the local S3 refused PUT {url}: {exc.code} {detail}") from None
