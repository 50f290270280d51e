"""Kubernetes Events for what the controllers do and what fails, as `kubectl events` and
`kubectl describe` show them.

We write `events.k8s.io/v1` Events: what controller-runtime's recorder writes since v0.23
(`mgr.GetEventRecorder`, client-go's `tools/events`; the core `v1` recorder is deprecated).
Repeats are aggregated as that recorder does, so a reconcile that sees the same failure every
pass writes no new Event each time:

- the first occurrence of (object, type, reason, action, note) creates an Event;
- the second writes `series: {count: 2, lastObservedTime}` onto it;
- later ones count in memory and are written at most every `refresh` seconds;
- after `finish` seconds without a repeat the series ends: the next occurrence is a new Event.

Memory is bounded: at most `max_series` series are remembered, the least recently seen
forgotten first (`forget` is told its Event: standalone mode, whose in-memory store has no
Event TTL, deletes it; an API server expires Events by itself). Writing an Event never fails
a reconcile: a refused or failed write is logged and dropped, as client-go's recorder drops
it after its retries.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from infergw.cluster.store import EVENT, Obj, Store, StoreError

log = logging.getLogger("controllers.events")

NORMAL, WARNING = "Normal", "Warning"
REPORTING_CONTROLLER = "infergate.io/controllers"
# What the API server accepts (events.k8s.io/v1 validation): reason and action up to 128
# bytes, the note up to 1 kB, reportingInstance up to 128 (bytes of UTF-8: Go's len()).
FIELD_LIMIT = 128
NOTE_LIMIT = 1024
SERIES_FINISH = 6 * 60.0  # client-go's finishTime
SERIES_REFRESH = 30 * 60.0  # client-go's refreshTime
MAX_SERIES = 1024


class Recorder(Protocol):
    async def event(self, obj: Obj, type_: str, reason: str, action: str, note: str) -> None: ...


class NoEvents:
    """The recorder of a reconciler built without one (most unit tests): records nothing."""

    async def event(self, obj: Obj, type_: str, reason: str, action: str, note: str) -> None:
        return None


NO_EVENTS = NoEvents()


def micro_time(wall: float) -> str:
    """metav1.MicroTime as the API server writes it."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clip(text: str, limit: int) -> str:
    """`text` in at most `limit` bytes of UTF-8 (a note of 1,000 é is 2,000 bytes)."""
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes
        return text
    data = text.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    if len(data) <= limit:
        return data.decode()
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def default_instance() -> str:
    return clip(f"infergate-controllers-{socket.gethostname()}-{os.getpid()}", FIELD_LIMIT)


@dataclass(slots=True)
class _Series:
    namespace: str
    name: str  # the Event's
    count: int
    last_seen: float  # monotonic
    last_written: float


class EventRecorder:
    def __init__(
        self,
        store: Store,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        finish: float = SERIES_FINISH,
        refresh: float = SERIES_REFRESH,
        max_series: int = MAX_SERIES,
        forget: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.instance = clip(instance or default_instance(), FIELD_LIMIT)
        self.clock, self.wall = clock, wall
        self.finish, self.refresh = finish, refresh
        self.max_series = max_series
        # called with (namespace, name) of an Event whose series is forgotten
        self.forget = forget
        self._series: OrderedDict[tuple, _Series] = OrderedDict()
        self.written = 0  # Event writes that reached the store (tests, debugging)

    def __len__(self) -> int:
        return len(self._series)

    async def event(self, obj: Obj, type_: str, reason: str, action: str, note: str) -> None:
        """Record that `obj` saw (reason, action, note): Normal or Warning."""
        regarding = _reference(obj)
        reason, action = clip(reason, FIELD_LIMIT), clip(action, FIELD_LIMIT)
        note = clip(note, NOTE_LIMIT)
        key = (
            regarding.get("uid") or "",
            regarding["kind"],
            regarding["namespace"],
            regarding["name"],
            type_,
            reason,
            action,
            note,
        )
        now = self.clock()
        series = self._series.get(key)
        if series is not None and now - series.last_seen > self.finish:
            self._series.pop(key)  # that series ended: this is a new Event
            series = None
        if series is None:
            await self._create(key, regarding, type_, reason, action, note, now)
            return
        series.count += 1
        series.last_seen = now
        self._series.move_to_end(key)
        if series.count == 2 or now - series.last_written >= self.refresh:
            await self._write_series(series)

    async def _create(self, key, regarding, type_, reason, action, note, now) -> None:
        ns = regarding["namespace"] or "default"
        # client-go names an Event <object>.<nanoseconds in hex>; the name stays a subdomain
        name = f"{regarding['name'][:200]}.{time.time_ns():x}"
        body = {
            "apiVersion": EVENT.api_version,
            "kind": EVENT.kind,
            "metadata": {"name": name, "namespace": ns},
            "eventTime": micro_time(self.wall()),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance,
            "action": action,
            "reason": reason,
            "note": note,
            "type": type_,
            "regarding": regarding,
        }
        # counted from now: a repeat recorded meanwhile (another worker) joins this series
        self._series[key] = _Series(ns, name, 1, now, now)
        if not await self._write(body, create=True):
            self._series.pop(key, None)  # the next occurrence tries again
            return
        while len(self._series) > self.max_series:
            _, old = self._series.popitem(last=False)
            await self._forget(old)

    async def _write_series(self, series: _Series) -> None:
        have = await self._read(series)
        if have is None:
            return
        have["series"] = {"count": series.count, "lastObservedTime": micro_time(self.wall())}
        if await self._write(have, create=False):
            series.last_written = series.last_seen

    async def _read(self, series: _Series) -> Obj | None:
        try:
            return await self.store.get(EVENT, series.namespace, series.name)
        except StoreError as exc:
            log.warning("event %s/%s: not read: %s", series.namespace, series.name, exc)
            return None

    async def _write(self, body: Obj, *, create: bool) -> bool:
        try:
            if create:
                await self.store.create(body)
            else:
                await self.store.update(body)
        except (StoreError, OSError) as exc:
            m = body["metadata"]
            log.warning(
                "event %s/%s (%s) not written: %s",
                m["namespace"],
                m["name"],
                body.get("reason"),
                exc,
            )
            return False
        self.written += 1
        return True

    async def _forget(self, series: _Series) -> None:
        if self.forget is None:
            return
        try:
            await self.forget(series.namespace, series.name)
        except (StoreError, OSError) as exc:
            log.warning("event %s/%s not deleted: %s", series.namespace, series.name, exc)


def object_ref(typed) -> Obj:
    """The identity of a typed object of ours (api/), as `event` takes it."""
    m = typed.metadata
    meta = {"name": m.name or "", "namespace": m.namespace or ""}
    if m.uid:
        meta["uid"] = m.uid
    return {"apiVersion": typed.api_version, "kind": typed.kind, "metadata": meta}


def _reference(obj: Obj) -> Obj:
    """The Event's `regarding`: an ObjectReference to obj."""
    m = obj.get("metadata") or {}
    ref = {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "name": m.get("name", ""),
        "namespace": m.get("namespace", ""),
    }
    for src, dst in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
        if m.get(src):
            ref[dst] = m[src]
    return ref


async def condition_events(
    recorder: Recorder, obj: Obj, conditions: list[dict], warnings: frozenset[str]
) -> None:
    """An Event for each condition of obj's next status whose reason moved from the one in
    obj's current status: a Warning for a reason in `warnings` (a failure), else Normal."""
    conds = (obj.get("status") or {}).get("conditions") or []
    old = {c.get("type"): c.get("reason") for c in conds if isinstance(c, dict)}
    for c in conditions:
        if old.get(c["type"]) != c["reason"]:
            type_ = WARNING if c["reason"] in warnings else NORMAL
            await recorder.event(obj, type_, c["reason"], c["type"], c["message"])
