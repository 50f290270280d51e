"""`infergate download URI [--dest PATH]`: a model's weights (or a LoRA adapter's) into the
weights cache, once per node, and `--dest` a link to them; what the Model's init container runs
before its engine, and what standalone mode runs before starting one.

Sources: `hf://ORG/NAME` or a bare repository id (its `--revision`, a branch, tag or commit;
HF_TOKEN, HF_ENDPOINT),
`s3://BUCKET/PREFIX` and `obs://BUCKET/PREFIX` (boto3's AWS_* variables; OBS through its S3
API at AWS_ENDPOINT_URL), `pvc://CLAIM/PATH` (the claim mounted at `--pvc-root/CLAIM`), a
local folder (`file://PATH` or a path), and an `http(s)://` archive (`--sha256`, or the URL's
`#sha256=HEX`, to check it).

Which files: those matching an `--include` glob (all without one), less those matching an
`--exclude` glob. Without `--exclude`, a snapshot holding safetensors leaves out what vLLM
does not read beside them (DEFAULT_EXCLUDE: the `original/` checkpoint of Meta's
repositories, `*.pth`, PyTorch `.bin` shards), which would otherwise double the download;
`--no-default-exclude` keeps everything.

The steps: list the snapshot (resolving the revision), find its cache entry, else take its
lock, find it again (another process may have made it meanwhile), check the free space,
fetch every file (resuming what an earlier try left), unpack an archive, and rename the whole
into place. Any failure ends with one line on stderr — the condition reason, what went
wrong, what to do next — the same line in `--termination-log` (Kubernetes shows it in the
pod's status) and the progress file, and an exit code per kind (source.py): nothing half
written becomes an entry.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from infergw.api import logs, version
from infergw.api.sizes import size_arg
from infergw.fetch.archive import HttpArchive, checksum_in_url
from infergw.fetch.cache import Cache, default_root, link
from infergw.fetch.evict import evict, touch
from infergw.fetch.hf import HuggingFace, check_revision
from infergw.fetch.local import LocalFolder
from infergw.fetch.progress import Progress
from infergw.fetch.s3 import bucket_source
from infergw.fetch.snapshot import Repository, Snapshot
from infergw.fetch.source import FetchError, NotFound, Unsafe
from infergw.fetch.transfer import Retry, fetch_file
from infergw.fetch.unpack import unpack

log = logging.getLogger("fetch.download")

USAGE_EXIT = 2
DEFAULT_MAX_BYTES = 4 << 40  # 4 TiB: more than the largest open models' weights
DEFAULT_TIMEOUT = 60.0  # seconds to connect and between two reads
DEFAULT_PVC_ROOT = Path("/mnt/pvc")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Left out of a snapshot that has safetensors, unless --exclude or --no-default-exclude says
# otherwise: vLLM loads the safetensors and never these (Meta's consolidated checkpoint in
# original/, PyTorch pickles), which often double a repository's size.
DEFAULT_EXCLUDE = ("original/*", "*.pth", "pytorch_model*.bin")


@dataclass(frozen=True, slots=True)
class Request:
    uri: str
    revision: str = "main"
    sha256: str | None = None
    exclude: tuple[str, ...] | None = None  # None: DEFAULT_EXCLUDE beside safetensors
    include: tuple[str, ...] = ()  # empty: every file
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT
    pvc_root: Path = DEFAULT_PVC_ROOT
    retry: Retry = field(default_factory=Retry)


def repository_for(req: Request) -> Repository:
    """The source of a URI; ValueError for one this tool does not read."""
    uri = req.uri
    scheme, sep, rest = uri.partition("://")
    if not sep:
        if Path(uri).exists() or not _REPO_ID.fullmatch(uri):
            return LocalFolder(Path(uri), str(Path(uri).absolute()))
        scheme, rest = "hf", uri  # a repository id, as vLLM reads one
    rest = rest.strip("/") if scheme != "file" else rest
    if not rest:
        raise ValueError(f"{uri!r}: names nothing")
    if scheme == "hf":
        if not _REPO_ID.fullmatch(rest) or ".." in rest.split("/"):
            raise ValueError(f"{uri!r}: not a repository id (ORG/NAME)")
        check_revision(req.revision)
        return HuggingFace.from_environment(rest, req.revision, req.timeout)
    if scheme in ("s3", "obs"):
        return bucket_source(uri, req.timeout)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        return LocalFolder(req.pvc_root / claim / path, f"pvc://{rest}")
    if scheme == "file":
        return LocalFolder(Path(rest), f"file://{rest}")
    if scheme in ("http", "https"):
        return HttpArchive(*checksum_in_url(uri, req.sha256), req.timeout)
    raise ValueError(
        f"{uri!r}: reads hf://, s3://, obs://, pvc://, file://, http(s):// archives and paths"
    )


def download(req: Request, cache: Cache, progress: Progress) -> tuple[Path, bool]:
    """The cache entry of the request's snapshot, and whether it was there already."""
    repo = repository_for(req)
    snap = _chosen(repo.snapshot(), req)
    key = cache.key(snap)
    with cache.locked(key, progress.waiting):
        # under the lock: an eviction (evict.py) cannot take the entry found meanwhile
        if (entry := cache.complete(key)) is not None:
            touch(cache, key)
            return entry, True
        entry = _fetch(repo, snap, key, cache, progress, req)
        touch(cache, key)
        return entry, False


def excluded(snap: Snapshot, req: Request) -> tuple[str, ...]:
    """The globs a snapshot's files are left out by: the request's, else DEFAULT_EXCLUDE
    when the snapshot has safetensors (outside what that leaves out)."""
    if req.exclude is not None:
        return req.exclude
    kept = [f.path for f in snap.files if not _matches(f.path, DEFAULT_EXCLUDE)]
    return DEFAULT_EXCLUDE if any(p.endswith(".safetensors") for p in kept) else ()


def _matches(path: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def _chosen(snap: Snapshot, req: Request) -> Snapshot:
    """The snapshot's included files less the excluded, within the size allowed."""
    exclude = excluded(snap, req)
    files = tuple(
        f
        for f in snap.files
        if (not req.include or _matches(f.path, req.include)) and not _matches(f.path, exclude)
    )
    if not files:
        raise NotFound(f"{snap.source}: no files left to download")
    if exclude and len(files) < len(snap.files) and req.exclude is None:
        log.info(
            "%s: leaving out %d files matching %s (vLLM reads the safetensors; "
            "--no-default-exclude keeps them)",
            snap.source, len(snap.files) - len(files), ", ".join(exclude),
        )  # fmt: skip
    chosen = replace(snap, files=files)
    if chosen.size > req.max_bytes:
        raise Unsafe(f"{snap.source}: {chosen.size} bytes, more than --max-bytes {req.max_bytes}")
    return chosen


def _fetch(
    repo: Repository, snap: Snapshot, key: str, cache: Cache, progress: Progress, req: Request
) -> Path:
    staging, partials = cache.staging(key), cache.partials(key)
    already = _bytes_under(staging) + _bytes_under(partials)
    cache.check_space(snap.size - already)
    progress.begin(snap.size, len(snap.files), already)
    for file in snap.files:
        fetch_file(repo, file, staging, partials, progress, req.max_bytes, req.retry)
    tree = staging
    if isinstance(repo, HttpArchive):
        progress.set_phase("unpacking")
        unpacked = cache.unpacked(key)
        shutil.rmtree(unpacked, ignore_errors=True)  # an unpack cut short: done again whole
        tree = unpack(staging / snap.files[0].path, unpacked, req.max_bytes)
    entry = cache.publish(tree, key, snap.manifest())
    cache.discard(key)
    return entry


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


# ---- the command --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate download",
        description="Download a model's weights into the shared cache; print the entry's path.",
    )
    where = p.add_argument_group("Source and destination")
    limits = p.add_argument_group("Limits and retries")
    progress = p.add_argument_group("Progress and errors")
    p.add_argument(
        "uri",
        nargs="?",
        help="hf://ORG/NAME, ORG/NAME, s3://, obs://, pvc://, file://, a path, "
        "or an http(s):// archive",
    )
    where.add_argument("--dest", type=Path, help="made a link to the cache entry")
    where.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_root()}")
    where.add_argument(
        "--revision", default="main", help="hf://: a branch, tag or commit (default: %(default)s)"
    )
    where.add_argument(
        "--sha256", help="an http(s) archive's SHA-256, checked (or the URL's #sha256=HEX)"
    )
    where.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files matching it (repeatable), e.g. '*.safetensors'; default: all",
    )
    where.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="leave out files matching it (repeatable), e.g. 'original/*'; default: "
        f"{', '.join(DEFAULT_EXCLUDE)} when the model has safetensors",
    )
    where.add_argument(
        "--no-default-exclude",
        action="store_true",
        help="without --exclude, leave nothing out",
    )
    limits.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="in all (default: %(default)s)"
    )
    limits.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to connect and between two reads (default: %(default)s)",
    )
    limits.add_argument(
        "--retries",
        type=int,
        default=Retry().retries,
        help="more tries of a file whose transfer failed, each resuming (default: %(default)s)",
    )
    where.add_argument(
        "--pvc-root",
        type=Path,
        default=DEFAULT_PVC_ROOT,
        help="where pvc://CLAIM is mounted, as <root>/CLAIM (default: %(default)s)",
    )
    where.add_argument(
        "--cache-max-bytes",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="after the download, remove least-recently-used entries that no pod or download "
        "holds until the cache's entries fit (e.g. 500G); default: no bound",
    )
    where.add_argument(
        "--prune",
        action="store_true",
        help="download nothing (no URI): remove the entries --cache-max-bytes says (default "
        "0: every entry not in use), printing each",
    )
    progress.add_argument("--progress-file", type=Path, help="JSON progress, rewritten in place")
    progress.add_argument(
        "--termination-log",
        type=Path,
        help="the error line written here too (Kubernetes: /dev/termination-log)",
    )
    logs.add_log_flags(p.add_argument_group("Logging"))
    version.add_version_flag(p)
    return p


def _keep_within(cache: Cache, max_bytes: int, keep: str) -> None:
    """The eviction after a download: a failure of it is logged, the download stands."""
    try:
        evict(cache, max_bytes, keep)
    except OSError as exc:
        log.warning("could not keep %s within %d bytes: %s", cache.root, max_bytes, exc)


def _prune(cache: Cache, max_bytes: int) -> int:
    """`--prune`: the eviction alone; the entries removed, one a line."""
    try:
        for e in evict(cache, max_bytes):
            print(f"removed {cache.entry(e.key)} ({e.size} bytes)")
    except OSError as exc:
        print(f"infergate download: --prune: {cache.root}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(logs.settings_from_args(opts))
    cache = Cache(opts.cache_dir or default_root())
    if opts.prune:
        if opts.uri is not None:
            parser.error("--prune downloads nothing: give no URI")
        return _prune(cache, opts.cache_max_bytes or 0)
    if opts.uri is None:
        parser.error("give the URI to download (or --prune)")
    # A file size limit (ulimit -f) must end in an error we report, not a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if opts.max_bytes < 1 or opts.timeout <= 0 or opts.retries < 0:
        print(
            "infergate download: give --max-bytes and --timeout above 0, --retries 0 or more",
            file=sys.stderr,
        )
        return USAGE_EXIT
    progress = Progress(opts.uri, opts.progress_file)
    try:
        exclude = () if opts.no_default_exclude else None
        req = Request(
            opts.uri,
            opts.revision,
            opts.sha256,
            tuple(opts.exclude) if opts.exclude is not None else exclude,
            tuple(opts.include),
            opts.max_bytes,
            opts.timeout,
            opts.pvc_root,
            Retry(opts.retries),
        )
        entry, cached = download(req, cache, progress)
        if opts.dest is not None:
            link(opts.dest, entry)
        if opts.cache_max_bytes is not None:
            _keep_within(cache, opts.cache_max_bytes, entry.name)
    except ValueError as exc:
        return _failed(opts, progress, "InvalidSource", str(exc), "fix the URI", USAGE_EXIT)
    except FetchError as exc:
        return _failed(opts, progress, exc.reason, str(exc), exc.hint, exc.exit_code)
    progress.finish(entry, cached)
    print(opts.dest if opts.dest is not None else entry)
    return 0


def _failed(
    opts: argparse.Namespace, progress: Progress, reason: str, message: str, hint: str, code: int
) -> int:
    line = f"{reason}: {message}; {hint}"
    progress.fail(reason, message)
    print(f"infergate download: {line}", file=sys.stderr)
    if opts.termination_log is not None:
        try:
            opts.termination_log.write_text(line + "\n")
        except OSError as exc:
            log.warning("termination log %s: %s", opts.termination_log, exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
