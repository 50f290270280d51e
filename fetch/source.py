"""What a fetch reads from: a named file of a model's repository, opened as a byte stream, and
the bounded copy of one to disk (size and time limits, written whole or not at all)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CHUNK = 1 << 16


class FetchError(Exception):
    """A file that cannot be fetched: the message says which and why (the init container's
    last log line)."""


class Stream(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Opened:
    stream: Stream
    length: int | None  # as the server declares it; None: not said


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
