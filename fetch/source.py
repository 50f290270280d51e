"""What a fetch reads from: a named file of a model's repository, opened as a byte stream, and
the bounded copy of one to disk (size and time limits, written whole or not at all); the
errors a fetch ends with, each with its exit code, condition reason and what to do next."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CHUNK = 1 << 16


class FetchError(Exception):
    """A file that cannot be fetched: the message says which and why (the init container's
    last log line). Subclasses tell the kinds apart by exit code and condition reason."""

    exit_code = 1
    reason = "FetchFailed"
    hint = "see the message"  # what to do next, for the one-line error


class NotFound(FetchError):
    exit_code = 3
    reason = "SourceNotFound"
    hint = "check the Model's URI and revision"


class Denied(FetchError):
    exit_code = 4
    reason = "AccessDenied"
    hint = "check the credentials in the Model's env (HF_TOKEN, AWS_* from a Secret)"


class TransferFailed(FetchError):
    """Interrupted, truncated or not what the source said: running again resumes or
    refetches."""

    exit_code = 5
    reason = "TransferFailed"
    hint = "run it again: a partial file resumes where it stopped"


class NoSpace(FetchError):
    exit_code = 6
    reason = "NoSpace"
    hint = "free space in the cache directory, or give it a larger volume"


class Unsafe(FetchError):
    """What the source sent would write outside the destination, or is absurd."""

    exit_code = 7
    reason = "UnsafeSource"
    hint = "the source is not a model repository this tool will copy; check it"


class Stream(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Opened:
    stream: Stream
    length: int | None  # of what the stream sends, as the server declares it; None: not said
    start: int = 0  # the offset in the file the stream starts at (a ranged read honoured)


class Source(Protocol):
    def describe(self, name: str) -> str:
        """Where `name` comes from, for messages (no credentials)."""
        ...

    def open(self, name: str) -> Opened | None:
        """The file `name` of the model's repository; None when it has none (404, no such
        key); FetchError for anything else (refused, unreachable, a bad answer)."""
        ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int  # per file
    timeout: float  # seconds per file, from the request to the last byte


def copy_bounded(opened: Opened, dest: Path, limits: Limits, what: str) -> int:
    """`opened` into `dest`, at most `limits.max_bytes` and within `limits.timeout` (a
    server that drips bytes is cut off too); written to a temporary name and renamed, so
    `dest` is whole or absent. Returns the size."""
    if opened.length is not None and opened.length > limits.max_bytes:
        opened.stream.close()
        raise FetchError(f"{what}: {opened.length} bytes, more than the {limits.max_bytes} allowed")
    deadline = time.monotonic() + limits.timeout
    partial = dest.with_name(f".{dest.name}.partial")
    size = 0
    try:
        with partial.open("wb") as out:
            while chunk := opened.stream.read(CHUNK):
                size += len(chunk)
                if size > limits.max_bytes:
                    raise FetchError(f"{what}: more than the {limits.max_bytes} bytes allowed")
                if time.monotonic() > deadline:
                    raise FetchError(f"{what}: not complete within {limits.timeout:g}s")
                out.write(chunk)
        if opened.length is not None and size != opened.length:
            raise FetchError(f"{what}: {size} of {opened.length} bytes arrived")
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        opened.stream.close()
    return size
