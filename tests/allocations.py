"""Count the bytes a piece of code holds at once (tracemalloc's peak), for memory bounds that
tests may check: bytes, never time."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_allocated(run: Callable[[], object]) -> int:
    """The most bytes Python allocated at once while `run()` ran."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
