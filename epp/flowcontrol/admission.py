"""What admission answers: the outcome, its HTTP status, and the running totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from infergw.epp.flowcontrol.queue import FlowItem


class Outcome(StrEnum):
    DISPATCHED = "dispatched"
    REJECTED_CAPACITY = "rejected_capacity"
    REJECTED_SHEDDABLE = "rejected_sheddable"
    EVICTED_TTL = "evicted_ttl"
    REJECTED_SHUTDOWN = "rejected_shutdown"


# How a request left the queue when its client went away while it waited: not an answer
# admission gives, but one more way a wait ends (for its metrics).
CANCELLED = "cancelled"
# Where admitting an item ended when it had to wait: in the queue (for its metrics).
QUEUED = "queued"

# The ImmediateResponse status for each rejection (as GIE maps its queue outcomes).
HTTP_STATUS = {
    Outcome.REJECTED_CAPACITY: 429,
    Outcome.REJECTED_SHEDDABLE: 429,
    Outcome.EVICTED_TTL: 503,
    Outcome.REJECTED_SHUTDOWN: 503,
}


@dataclass(slots=True, frozen=True)
class Admission:
    outcome: Outcome
    item: FlowItem
    message: str = ""
    retry_after: int | None = None  # seconds, for a Retry-After header on 429
    waited: float = 0.0  # seconds spent queued

    @property
    def admitted(self) -> bool:
        return self.outcome is Outcome.DISPATCHED

    @property
    def status(self) -> int | None:
        """The HTTP status to answer with, None when admitted."""
        return HTTP_STATUS.get(self.outcome)


@dataclass(slots=True)
class FlowControlStats:
    dispatched: int = 0  # all admitted requests
    dispatched_after_wait: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by Outcome value
    cancelled_queued: int = 0  # client left while waiting
    cancelled_dispatched: int = 0  # client left between dispatch and resuming
    wait_seconds_sum: float = 0.0  # over dispatched_after_wait
    wait_seconds_max: float = 0.0
