"""One budget for the request bytes the picker holds across all its streams at once.

Each stream takes from it as body bytes arrive (and for what parsing keeps beside them, and
what reading the answer's usage buffers) and gives everything back when it ends; a request
that would overdraw it is answered 429 with Retry-After instead (an answer's usage is not
read), so concurrent large bodies cannot exhaust the picker's memory.
"""

from __future__ import annotations

from infergw.epp.errors import PickerError

DEFAULT_MAX_HELD_BYTES = 256 * 1024 * 1024  # eight bodies of the default --max-body-bytes
RETRY_AFTER_SECONDS = 1


class BodyBudget:
    def __init__(self, limit: int = DEFAULT_MAX_HELD_BYTES) -> None:
        if limit <= 0:
            raise ValueError(f"the request bytes budget must be positive, got {limit}")
        self.limit = limit
        self.held = 0

    def fits(self, n: int) -> bool:
        return self.held + n <= self.limit

    def take(self, n: int) -> None:
        """Reserve `n` bytes, or raise PickerError 429 when they do not fit."""
        if not self.fits(n):
            raise PickerError(
                429,
                f"the endpoint picker holds {self.held} bytes of requests and cannot take "
                f"{n} more (limit {self.limit}); retry shortly",
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            )
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n
