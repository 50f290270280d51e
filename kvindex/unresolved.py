"""Engine hashes a pod's events name but its own earlier events never stored.

The index keys blocks by token ids (kvindex.keys), so vLLM's hash seed never reaches a key; but
the translator follows a pod's chains through vLLM's hashes (a BlockStored's parent, a CPU
offload, a BlockRemoved). Within one engine process they always resolve. They stop resolving
when one pod's events come from processes that hash differently: another `PYTHONHASHSEED`
(vLLM seeds its first block's parent, NONE_HASH, from it, and draws a random one when it is
unset) or another `--prefix-caching-hash-algo`. Then continuations chain from the model's root
and hits go missing silently; this module makes that visible.

Some misses are normal: right after the picker subscribes, events name blocks stored before it
did. So a pod is judged only after a warm-up, on windows of parent and offload lookups
(removals are left out: blocks stored before the picker joined are evicted for as long as the
cache takes to turn over). A window with at least half unresolved logs a warning naming the pod
and the settings to check, at most once per `LOG_EVERY` seconds a pod.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("kvindex.unresolved")

KINDS = ("parent", "offload", "removed")  # where an engine hash was looked up
WARMUP = 256  # parent and offload lookups of a pod before it is judged
WINDOW = 64  # lookups per judgement
SUSPECT_RATIO = 0.5  # unresolved share of a window that makes a pod suspect
LOG_EVERY = 300.0  # seconds between warnings about one pod
MAX_PODS = 4096  # pods remembered; the oldest is forgotten past it


@dataclass(slots=True)
class _Pod:
    totals: Counter[str] = field(default_factory=Counter)  # kind -> unresolved, ever
    judged: int = 0  # parent and offload lookups, ever
    looked: int = 0  # in the current window
    missed: int = 0  # unresolved in the current window
    suspect_windows: int = 0
    logged_at: float | None = None


class UnresolvedHashes:
    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._pods: dict[str, _Pod] = {}

    def _pod(self, pod: str) -> _Pod:
        st = self._pods.get(pod)
        if st is None:
            if len(self._pods) >= MAX_PODS:
                del self._pods[next(iter(self._pods))]
            st = self._pods[pod] = _Pod()
        return st

    def note(self, pod: str, kind: str, looked: int, unresolved: int) -> None:
        """`pod`'s event made `looked` lookups of `kind`, `unresolved` of them missed."""
        if not looked:
            return
        st = self._pod(pod)
        st.totals[kind] += unresolved
        if kind == "removed":
            return
        st.judged += looked
        if st.judged <= WARMUP:
            return
        st.looked += looked
        st.missed += unresolved
        if st.looked < WINDOW:
            return
        if st.missed >= SUSPECT_RATIO * st.looked:
            st.suspect_windows += 1
            self._warn(pod, st)
        st.looked = st.missed = 0

    def _warn(self, pod: str, st: _Pod) -> None:
        now = self._clock()
        if st.logged_at is not None and now - st.logged_at < LOG_EVERY:
            return
        st.logged_at = now
        log.warning(
            "KV events of %s name engine block hashes it never stored (%d of the last %d "
            "parents): its blocks are indexed only from each request's start, so hits go "
            "missing. Every vLLM process publishing as this pod must use the same "
            "PYTHONHASHSEED and --prefix-caching-hash-algo (events lost before the picker "
            "subscribed look alike for a while)",
            pod,
            st.missed,
            st.looked,
        )

    def totals(self) -> dict[str, dict[str, int]]:
        """Per pod, unresolved lookups by kind, ever (for a counter)."""
        return {pod: dict(st.totals) for pod, st in self._pods.items() if st.totals}

    def suspect_windows(self) -> dict[str, int]:
        """Per pod, the windows judged suspect so far."""
        return {pod: st.suspect_windows for pod, st in self._pods.items() if st.suspect_windows}
