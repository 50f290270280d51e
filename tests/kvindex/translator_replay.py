"""What the batch-merging tests of the event translator share: two pods, applying a batch
one event at a time (the reference a merged batch must equal), and a translator's whole state
to compare."""

from __future__ import annotations

from infergw.kvindex.events import AllBlocksCleared
from infergw.kvindex.translate import EventTranslator

PODS = ("10.0.0.1:8000", "10.0.0.2:8000")


def one_by_one(tr: EventTranslator, pod: str, events) -> None:
    for ev in events:
        if isinstance(ev, AllBlocksCleared):
            tr.clear_pod(pod)
        else:
            tr.apply(pod, "m", ev)


def state(tr: EventTranslator) -> tuple:
    index = tr.index
    held = {(p, t): index.keys_of(p, t) for p in PODS for t in ("gpu", "cpu")}
    stats = {k: v for k, v in tr.stats().items() if k not in ("bytes", "events")}
    emaps = {p: sorted(m.keys()) for p, m in tr._emaps.items()}
    return held, stats, emaps
