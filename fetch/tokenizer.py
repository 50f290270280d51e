"""`infergate fetch tokenizer --source URI --dest DIR`: a model's tokenizer files alone, for the
endpoint picker's `--tokenizer MODEL=DIR` (the precise prefix scorer tokenizes prompts as the
engine does). The picker's init container runs it; the weights are never fetched.

tokenizer.json is required; the others are fetched when the repository has them. Each file is
bounded in size and time, written whole or not at all, and tokenizer.json must load with the
`tokenizers` library the picker uses, so a broken file fails here, with its name, rather than
in the picker.

`--from-weights-cache` (the local stack, whose picker can read this machine's weights cache):
the revision is resolved first (the Hub's commit, an S3 listing's digest); if the cache
(`--cache-dir`, the download's default) holds a complete entry of that source at that
revision — the engine's weights, downloaded by `infergate download` — the tokenizer is copied
from it and nothing more is fetched; otherwise the files are fetched at the resolved commit.
A picker in a cluster cannot read the node's cache: its init container fetches the tokenizer
files alone, at the Model's `modelRevision`, with the Model's source settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from infergw.api import logs, version
from infergw.fetch.archive import HttpArchive, checksum_in_url
from infergw.fetch.archive_tokenizer import ArchiveTokenizer
from infergw.fetch.cache import Cache, default_root
from infergw.fetch.hf import HuggingFace, check_revision
from infergw.fetch.s3 import S3, bucket_source
from infergw.fetch.source import FetchError, Limits, Opened, Source, copy_bounded

log = logging.getLogger("fetch.tokenizer")

REQUIRED = "tokenizer.json"
# What kvindex/tokenize.py and the chat template reader may use besides tokenizer.json.
OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SCHEMES = ("hf", "s3", "obs", "http", "https")  # the Model URIs a tokenizer is fetched from
DEFAULT_MAX_BYTES = 64 << 20  # the largest tokenizer.json of common models is ~35 MiB
DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_ARCHIVE_BYTES = 4 << 40  # a whole archive streamed for its tokenizer: the download's


def fetchable(uri: str) -> bool:
    """Whether a tokenizer can be fetched for a Model of this URI (a zip archive: only
    copied from the weights cache, which a cluster's picker cannot read)."""
    scheme = uri.partition("://")[0]
    if scheme in ("http", "https"):
        return ArchiveTokenizer.reads(HttpArchive(uri.partition("#")[0]).name)
    return scheme in SCHEMES


def source_for(
    uri: str, revision: str, timeout: float, limits: Limits, max_archive_bytes: int
) -> Source:
    """The source for a Model's URI; ValueError for a scheme without a tokenizer fetch."""
    scheme, sep, rest = uri.partition("://")
    rest = rest.strip("/")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(
            f"{uri!r}: a tokenizer is fetched from hf://ORG/NAME, s3:// or obs://BUCKET/PREFIX, "
            "or an http(s):// archive"
        )
    if scheme in ("http", "https"):
        archive = HttpArchive(*checksum_in_url(uri, None), min(timeout, 30.0))
        return ArchiveTokenizer(archive, (REQUIRED, *OPTIONAL), limits, max_archive_bytes)
    if scheme == "hf":
        if ".." in rest.split("/"):
            raise ValueError(f"{uri!r}: not a repository name")
        check_revision(revision)
        return HuggingFace.from_environment(rest, revision, min(timeout, 30.0))
    return bucket_source(uri, min(timeout, 30.0))


class CachedEntry:
    """A weights cache entry read as a tokenizer's source: its files were verified when it
    was downloaded, and are copied with the same bounds as a fetch."""

    def __init__(self, entry: Path) -> None:
        self.entry = entry

    def describe(self, name: str) -> str:
        return str(self.entry / name)

    def open(self, name: str) -> Opened | None:
        path = self.entry / name
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror or exc}") from None
        return Opened(f, path.stat().st_size)


def beside_the_weights(source: Source, cache: Cache) -> tuple[Source, Path | None]:
    """The source to read the tokenizer from: the weights cache's entry of the source at its
    resolved revision, if there is one, else the source pinned to that revision (hf://);
    and that entry."""
    if not isinstance(source, HuggingFace | S3 | ArchiveTokenizer):
        return source, None
    # the revision resolved now: a commit, the listing's digest, the archive's SHA-256 or ETag
    snap = source.archive.snapshot() if isinstance(source, ArchiveTokenizer) else source.snapshot()
    entry = cache.holding(snap.source, snap.revision, REQUIRED)
    if entry is not None:
        return CachedEntry(entry), entry
    if isinstance(source, HuggingFace):
        source = replace(source, revision=snap.revision)
    return source, None


def fetch_tokenizer(source: Source, dest: Path, limits: Limits) -> list[str]:
    """The tokenizer files of `source` into `dest`; the names written. FetchError when
    tokenizer.json is missing, too big, too slow or does not load."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (REQUIRED, *OPTIONAL):
        opened = source.open(name)
        if opened is None:
            if name == REQUIRED:
                raise FetchError(
                    f"{source.describe(name)}: not found (the model has no fast tokenizer)"
                )
            continue
        size = copy_bounded(opened, dest / name, limits, source.describe(name))
        log.info("fetched %s (%d bytes)", source.describe(name), size)
        written.append(name)
    _check_loads(dest)
    return written


def _check_loads(dest: Path) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(dest / REQUIRED))
    except Exception as exc:  # the library raises its own Exception subclass
        (dest / REQUIRED).unlink(missing_ok=True)
        raise FetchError(f"{REQUIRED} does not load as a tokenizer: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate fetch tokenizer",
        description="Fetch a model's tokenizer files (not its weights) into a directory.",
    )
    where = p.add_argument_group("Source and destination")
    limits = p.add_argument_group("Limits")
    where.add_argument(
        "--source",
        required=True,
        help="the Model's modelURI: hf://ORG/NAME, s3:// or obs://BUCKET/PREFIX, or an "
        "http(s):// tar archive (#sha256=HEX: read whole and checked)",
    )
    where.add_argument("--dest", required=True, type=Path, help="the directory to write")
    where.add_argument(
        "--revision", default="main", help="hf://: the branch, tag or commit (default: %(default)s)"
    )
    where.add_argument(
        "--from-weights-cache",
        action="store_true",
        help="copy the tokenizer from the weights cache's entry of this source at its "
        "resolved revision when there is one (else fetch at that revision)",
    )
    where.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_root()}")
    limits.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="per file (default: %(default)s)"
    )
    limits.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per file (default: %(default)s)",
    )
    limits.add_argument(
        "--max-archive-bytes",
        type=int,
        default=DEFAULT_MAX_ARCHIVE_BYTES,
        help="an archive source: the most of it streamed (default: %(default)s)",
    )
    logs.add_log_flags(p.add_argument_group("Logging"))
    version.add_version_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["tokenizer"]:  # the one artifact so far; weights: infergate download
        asked_help = args[:1] in (["-h"], ["--help"])
        print(
            "usage: infergate fetch tokenizer --source URI --dest DIR\n"
            "(infergate fetch tokenizer --help: its options; a model's weights: "
            "infergate download)",
            file=sys.stdout if asked_help else sys.stderr,
        )
        return 0 if asked_help else 2
    opts = build_parser().parse_args(args[1:])
    logs.configure(logs.settings_from_args(opts))
    if opts.max_bytes < 1 or opts.timeout <= 0 or opts.max_archive_bytes < 1:
        print(
            "infergate fetch tokenizer: give --max-bytes, --max-archive-bytes and --timeout "
            "values above 0",
            file=sys.stderr,
        )
        return 2
    entry = None
    try:
        limits = Limits(opts.max_bytes, opts.timeout)
        source = source_for(
            opts.source, opts.revision, opts.timeout, limits, opts.max_archive_bytes
        )
        if opts.from_weights_cache:
            cache = Cache(opts.cache_dir or default_root())
            source, entry = beside_the_weights(source, cache)
        names = fetch_tokenizer(source, opts.dest, limits)
    except (ValueError, FetchError) as exc:
        print(f"infergate fetch tokenizer: {exc}", file=sys.stderr)
        return 1
    where = f"the weights cache's {entry}" if entry else opts.source
    log.info("tokenizer of %s in %s, from %s: %s", opts.source, opts.dest, where, ", ".join(names))
    return 0
