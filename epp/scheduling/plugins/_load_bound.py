"""The bound on how far cache affinity may pull load: a prefix scorer's `loadBound`.

A popular new prefix sends every request to the pod that holds it (and, through speculative
entries, to the pod that got its first request), however long that pod's queue grows. With a
bound B, a pod whose in-flight requests (the picker's own count, fresh between scrapes) exceed
the least loaded candidate's by more than B gets no affinity score: the load scorers choose,
the pod they choose gets the prompt's speculative entries, and the prefix's next requests
follow it there until it too passes the bound. SGLang's cache-aware policy switches to the
shortest queue on the same kind of test (`balance_abs_threshold`); llm-d weighs load against
affinity in its scorers. None turns the bound off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec

from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.params import MAX_ENTRIES

LoadBound = Annotated[int, msgspec.Meta(ge=0, le=MAX_ENTRIES)] | None
DEFAULT_LOAD_BOUND = 4


def bounded(scores: list[float], endpoints: Sequence[Endpoint], bound: int | None) -> list[float]:
    """`scores`, with 0 for the pods more than `bound` requests above the least loaded."""
    if bound is None or not endpoints:
        return scores
    limit = min(e.inflight_requests for e in endpoints) + bound
    return [
        0.0 if e.inflight_requests > limit else s for s, e in zip(scores, endpoints, strict=True)
    ]
