"""One budget for the request bytes a server holds across all its streams at once.

Each stream takes from it as body bytes arrive (and for what parsing keeps beside them, and
what reading the answer's usage buffers) and gives everything back when it ends; a request
that would overdraw it is answered 429 with Retry-After instead (an answer's usage is not
read), so concurrent large bodies cannot exhaust the picker's memory. The picker and the
body-based router gather request bodies the same way, with `BodyAccumulator`.
"""

from __future__ import annotations

from infergw.epp.errors import PickerError

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # --max-body-bytes of the picker and the router
DEFAULT_MAX_HELD_BYTES = 8 * DEFAULT_MAX_BODY_BYTES  # eight bodies of the default size
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


class BudgetShare:
    """What one stream holds of the budget: taken as it goes, all given back when it ends."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> None:
        """Reserve `n` more bytes (PickerError 429 when the budget has no room)."""
        self.budget.take(n)
        self.held += n

    def give(self, n: int) -> None:
        self.budget.give(n)
        self.held -= n

    def settle(self, held: int) -> None:
        """Make what this stream holds exactly `held` bytes."""
        if held > self.held:
            self.take(held - self.held)
        else:
            self.give(self.held - held)

    def release(self) -> None:
        """The stream ended: everything back."""
        self.give(self.held)


class BodyAccumulator:
    """A request body gathered chunk by chunk: each chunk checked against the body limit
    (413 before it is held) and charged to the stream's share of the budget (429) first."""

    def __init__(self, share: BudgetShare, limit: int) -> None:
        self.share = share
        self.limit = limit
        self._body = bytearray()

    def __len__(self) -> int:
        return len(self._body)

    def add(self, chunk: bytes) -> None:
        if len(self._body) + len(chunk) > self.limit:
            raise PickerError(413, f"request body exceeds the limit of {self.limit} bytes")
        self.share.take(len(chunk))
        self._body += chunk

    def take_all(self, charge_per_byte: int = 1) -> bytes:
        """The whole body as bytes, emptied here. The copy exists beside the gathered body
        for a moment, and the caller may build more from it: `charge_per_byte` bytes per
        body byte are charged before the copy is made, so the budget bounds the peak."""
        self.share.take(charge_per_byte * len(self._body))
        raw, self._body = bytes(self._body), bytearray()
        return raw
