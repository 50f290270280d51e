"""A size in bytes as people write it on a command line: `500G`, `500GiB`, `1T` or a number
of bytes (binary units, as `du -h` and Kubernetes' `Gi` count)."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """The number of bytes; ValueError for anything else."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r}: a size such as 500G, 500GiB or 1073741824")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def size_arg(text: str) -> int:
    """byte_size as an argparse type."""
    try:
        return byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
