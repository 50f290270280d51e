"""What waits, and in which order: items, and one priority band's per-flow FIFO queues.

Within a band the flow to serve next is the backlogged flow with the smallest virtual token
counter; within a flow, the oldest item. The band keeps its VTC's backlog in step with its
queues: a flow is active exactly while it has a queued item.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from infergw.epp.flowcontrol.config import BandConfig
from infergw.epp.flowcontrol.vtc import VirtualTokenCounter


@dataclass(slots=True, eq=False)
class FlowItem:
    """One request as flow control sees it."""

    flow_id: str = "default-flow"  # x-gateway-inference-fairness-id
    priority: int = 0  # higher goes first; < 0 is sheddable
    input_tokens: int = 0
    size_bytes: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    ttl: float | None = None  # seconds of waiting allowed; None = the configured default, 0 = none
    request_id: str = ""
    payload: Any = None  # the caller's own (request, candidates): the saturation check sees it
    # Output tokens charged at dispatch, before any is known (the caller's estimate): the
    # paper charges output as it is generated, and a flow whose answers are still running
    # must not look cheap meanwhile. Settled against the real count when it ends.
    expected_output: int = 0
    output_charged: int = field(default=0, init=False, repr=False)
    output_reported: int = field(default=0, init=False, repr=False)
    # Owned by the controller while the item waits.
    future: asyncio.Future[Any] | None = field(default=None, init=False, repr=False)
    timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


class Band:
    """The queues of one priority level."""

    def __init__(self, config: BandConfig, vtc: VirtualTokenCounter) -> None:
        self.config = config
        self.priority = config.priority
        self.vtc = vtc
        self.flows: dict[str, deque[FlowItem]] = {}
        self.requests = 0
        self.bytes = 0

    def over_limit(self, item: FlowItem) -> str | None:
        """Why the band cannot take `item`, or None when it fits."""
        c = self.config
        if c.max_requests and self.requests + 1 > c.max_requests:
            return f"priority band {self.priority} holds its limit of {c.max_requests} requests"
        if c.max_bytes and self.bytes + item.size_bytes > c.max_bytes:
            return (
                f"priority band {self.priority} cannot take {item.size_bytes} more bytes "
                f"({self.bytes} of {c.max_bytes} queued)"
            )
        return None

    def push(self, item: FlowItem) -> None:
        queue = self.flows.get(item.flow_id)
        if queue is None:
            queue = self.flows[item.flow_id] = deque()
            self.vtc.activate(item.flow_id)  # no queued request → one: the VTC lift
        queue.append(item)
        self.requests += 1
        self.bytes += item.size_bytes

    def remove(self, item: FlowItem) -> bool:
        """Take `item` out (the head when dispatching, anywhere when it expires or its client
        leaves); False when it is not queued here."""
        queue = self.flows.get(item.flow_id)
        if queue is None:
            return False
        if queue[0] is item:
            queue.popleft()
        else:
            try:
                queue.remove(item)
            except ValueError:
                return False
        self.requests -= 1
        self.bytes -= item.size_bytes
        if not queue:
            del self.flows[item.flow_id]
            self.vtc.deactivate(item.flow_id)
        return True

    def items(self) -> list[FlowItem]:
        return [item for queue in self.flows.values() for item in queue]

    def lengths(self) -> dict[str, int]:
        return {flow: len(queue) for flow, queue in self.flows.items()}
