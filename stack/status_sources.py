"""What `infergate status` reads, into typed snapshots: a picker's `/metrics` and
`/debug/endpoints` pages (the local stack's, or any picker reachable over HTTP), and a
cluster namespace's Models, pods, autoscaling decisions and Warning Events.

Everything read is untrusted: a page is read up to a byte limit, at most so many lines and
endpoints are looked at, and a value that is missing, of the wrong type or not finite is
None (shown as unknown), never an exception. A picker that cannot be reached is a view with
its error."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infergw.api.names import MODEL_LABEL

PAGE_LIMIT = 4 << 20  # bytes of one page
MAX_LINES = 200_000  # metric lines looked at
MAX_ENDPOINTS = 64  # pods shown per picker
MAX_EVENTS = 8  # Warning Events shown
TEXT_LIMIT = 160  # characters of any string shown
ERROR_LIMIT = 400  # characters of a reason a source could not be read
TIMEOUT = 2.0

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
# Shown as "?": terminal control characters (an escape sequence could rewrite the screen),
# Unicode's line separators, lone surrogates, and bidi controls (U+202E would show a pod's
# name reversed, and any text after it on the line).
_CONTROL = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# The picker's series read (epp/metrics.py, epp/app.py)
REQUESTS = "inference_objective_request_total"
ERRORS = "inference_objective_request_error_total"
INPUT_TOKENS = "inference_objective_input_tokens_sum"
CACHED_TOKENS = "inference_objective_prompt_cached_tokens_sum"
QUEUE = "infergate_epp_flow_control_queue_size"
WAITING_FOR_CAPACITY = "infergate_epp_pool_waiting_for_capacity"
READY_PODS = "inference_pool_ready_pods"
WANTED = frozenset(
    (REQUESTS, ERRORS, INPUT_TOKENS, CACHED_TOKENS, QUEUE, WAITING_FOR_CAPACITY, READY_PODS)
)


class SourceError(Exception):
    """A page that could not be read (the message says why)."""


class Unreachable(SourceError):
    """Nothing answered at the page's address (refused, timed out, no such host)."""


def text(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """A string to show, clipped, control characters replaced; None for anything else."""
    if not isinstance(value, str):
        return None
    value = _CONTROL.sub("?", value[:limit])
    return value if len(value) < limit else value[: limit - 1] + "…"


def number(value: Any) -> float | None:
    """A finite number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return value if math.isfinite(value) else None


def fetch(url: str, limit: int | None = None, timeout: float = TIMEOUT) -> bytes:
    """GET url, at most `limit` bytes (PAGE_LIMIT): SourceError for anything but a 200
    within them."""
    limit = PAGE_LIMIT if limit is None else limit
    # The socket's timeout bounds each read; a page sent a byte at a time needs a deadline.
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = bytearray()
            while len(body) <= limit:
                if time.monotonic() > deadline:
                    raise SourceError(f"{url}: not read within {timeout} s")
                chunk = resp.read1(limit + 1 - len(body))
                if not chunk:
                    break
                body += chunk
    except urllib.error.HTTPError as exc:
        raise SourceError(f"{url}: HTTP {exc.code}") from None
    except OSError as exc:  # refused, timed out, no such host
        raise Unreachable(f"{url}: {exc}") from None
    except ValueError as exc:  # a bad URL
        raise SourceError(f"{url}: {exc}") from None
    return within(url, body, limit)


def within(where: str, body: bytes, limit: int) -> bytes:
    """body, read as `limit` + 1 bytes at most: SourceError when it is over the limit."""
    if len(body) > limit:
        raise SourceError(f"{where}: more than {limit} bytes")
    return bytes(body)


@dataclass(slots=True)
class Samples:
    """Sums of the wanted series, and the error counter by error_code."""

    sums: dict[str, float] = field(default_factory=dict)
    errors_by_code: dict[str, float] = field(default_factory=dict)
    skipped: int = 0  # lines that were not a sample

    def get(self, name: str) -> float | None:
        return self.sums.get(name)


def parse_metrics(body: bytes, wanted: frozenset[str] = WANTED) -> Samples:
    """The Prometheus text format, leniently: unreadable lines are skipped and counted."""
    out = Samples()
    for n, line in enumerate(body.decode("utf-8", "replace").splitlines()):
        if n >= MAX_LINES:
            out.skipped += 1
            break
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            out.skipped += 1
            continue
        name, labels, raw = m.groups()
        if name not in wanted:
            continue
        try:
            value = float(raw)
        except ValueError:
            out.skipped += 1
            continue
        if not math.isfinite(value):
            out.skipped += 1
            continue
        out.sums[name] = out.sums.get(name, 0.0) + value
        if name == ERRORS:
            code = text(dict(_LABEL.findall(labels or "")).get("error_code", "?")[:32]) or "?"
            if code in out.errors_by_code or len(out.errors_by_code) < 16:
                out.errors_by_code[code] = out.errors_by_code.get(code, 0.0) + value
    return out


@dataclass(slots=True, frozen=True)
class PodRow:
    name: str | None
    address: str | None
    engine: str | None
    reachable: bool | None
    running: float | None
    waiting: float | None
    kv_usage: float | None  # 0..1
    inflight: float | None


def pod_rows(body: bytes) -> tuple[str | None, list[PodRow], int]:
    """The pool's name, its endpoints and how many more there were, from /debug/endpoints."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise SourceError(f"/debug/endpoints is not JSON: {exc}") from None
    except RecursionError:
        raise SourceError("/debug/endpoints is not JSON: nested too deeply") from None
    if not isinstance(doc, Mapping):
        raise SourceError("/debug/endpoints is not a JSON object")
    pool = doc.get("pool")
    pool_name = text(pool.get("name")) if isinstance(pool, Mapping) else None
    endpoints = doc.get("endpoints")
    if not isinstance(endpoints, list):
        return pool_name, [], 0
    rows = []
    for e in endpoints[:MAX_ENDPOINTS]:
        if not isinstance(e, Mapping):
            continue
        reachable = e.get("reachable")
        rows.append(
            PodRow(
                name=text(e.get("name")),
                address=text(e.get("address")),
                engine=text(e.get("engine")),
                reachable=reachable if isinstance(reachable, bool) else None,
                running=number(e.get("running")),
                waiting=number(e.get("waiting")),
                kv_usage=number(e.get("kv_usage")),
                inflight=number(e.get("inflight_requests")),
            )
        )
    return pool_name, rows, max(0, len(endpoints) - MAX_ENDPOINTS)


@dataclass(slots=True)
class PickerView:
    url: str
    error: str | None = None
    pool: str | None = None
    pods: list[PodRow] = field(default_factory=list)
    more_pods: int = 0
    samples: Samples | None = None
    answered: bool = True  # False: neither page's address answered at all

    @property
    def cached_share(self) -> float | None:
        """Prompt tokens served from the engines' prefix cache, of all prompt tokens."""
        if self.samples is None:
            return None
        total, cached = self.samples.get(INPUT_TOKENS), self.samples.get(CACHED_TOKENS)
        if not total or cached is None:
            return None
        return min(1.0, max(0.0, cached / total))


def read_picker(url: str) -> PickerView:
    """One picker's view; `url` is its metrics address (http://127.0.0.1:9090)."""
    base = url.rstrip("/")
    return read_pages(base, lambda path: fetch(base + path))


def read_pages(name: str, get: Callable[[str], bytes]) -> PickerView:
    """A picker's view from its two pages, each read by `get(path)` (SourceError when it
    cannot be): over HTTP, or through the API server's pod proxy."""
    view = PickerView(name)
    problems: list[SourceError] = []
    try:
        view.samples = parse_metrics(get("/metrics"))
    except SourceError as exc:
        problems.append(exc)
    try:
        view.pool, view.pods, view.more_pods = pod_rows(get("/debug/endpoints"))
    except SourceError as exc:
        problems.append(exc)
    view.error = text("; ".join(map(str, problems)), ERROR_LIMIT) or None
    view.answered = not (len(problems) == 2 and all(isinstance(p, Unreachable) for p in problems))
    return view


# ---- a cluster namespace ----------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ModelRow:
    name: str | None
    ready: str | None  # the Ready condition's status
    reason: str | None
    replicas: float | None
    ready_replicas: float | None


@dataclass(slots=True, frozen=True)
class ClusterPod:
    name: str | None
    model: str | None
    phase: str | None
    ready: bool
    restarts: float | None


@dataclass(slots=True, frozen=True)
class Decision:
    binding: str | None
    target: str | None
    current: float | None
    desired: float | None
    reason: str | None
    metrics: str | None  # name=value, …


@dataclass(slots=True, frozen=True)
class EventRow:
    when: str | None
    object: str | None
    reason: str | None
    note: str | None
    count: float | None


@dataclass(slots=True)
class ClusterView:
    namespace: str
    error: str | None = None
    models: list[ModelRow] = field(default_factory=list)
    pods: list[ClusterPod] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    warnings: list[EventRow] = field(default_factory=list)


def _dict(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _condition(obj: Mapping, kind: str) -> Mapping:
    for c in _list(_dict(obj.get("status")).get("conditions")):
        if isinstance(c, Mapping) and c.get("type") == kind:
            return c
    return {}


def model_row(obj: Mapping) -> ModelRow:
    ready, status = _condition(obj, "Ready"), _dict(obj.get("status"))
    return ModelRow(
        text(_dict(obj.get("metadata")).get("name")),
        text(ready.get("status")),
        text(ready.get("reason")),
        number(status.get("replicas")),
        number(status.get("readyReplicas")),
    )


def cluster_pod(obj: Mapping) -> ClusterPod:
    meta, status = _dict(obj.get("metadata")), _dict(obj.get("status"))
    restarts = [
        number(_dict(c).get("restartCount")) for c in _list(status.get("containerStatuses"))
    ]
    return ClusterPod(
        text(meta.get("name")),
        text(_dict(meta.get("labels")).get(MODEL_LABEL)),
        text(status.get("phase")),
        _condition(obj, "Ready").get("status") == "True",
        sum(r for r in restarts if r is not None) if restarts else None,
    )


def decisions(obj: Mapping) -> list[Decision]:
    name = text(_dict(obj.get("metadata")).get("name"))
    out = []
    for t in _list(_dict(obj.get("status")).get("targets"))[:16]:
        t = _dict(t)
        role = text(t.get("role"))
        metrics = ", ".join(
            f"{text(_dict(m).get('name'))}={text(_dict(m).get('value'))}"
            for m in _list(t.get("metrics"))[:4]
        )
        target = text(t.get("name"))
        out.append(
            Decision(
                name,
                f"{target}/{role}" if role else target,
                number(t.get("currentReplicas")),
                number(t.get("desiredReplicas")),
                text(t.get("reason")),
                text(metrics) or None,
            )
        )
    return out


def event_row(obj: Mapping) -> EventRow:
    regarding, series = _dict(obj.get("regarding")), _dict(obj.get("series"))
    kind, name = text(regarding.get("kind")), text(regarding.get("name"))
    return EventRow(
        text(series.get("lastObservedTime")) or text(obj.get("eventTime")),
        f"{kind}/{name}" if kind and name else None,
        text(obj.get("reason")),
        text(obj.get("note")),
        number(series.get("count")) or 1.0,
    )


def recent_warnings(events: list[Mapping], limit: int = MAX_EVENTS) -> list[EventRow]:
    rows = [event_row(e) for e in events if isinstance(e, Mapping) and e.get("type") == "Warning"]
    rows.sort(key=lambda r: r.when or "", reverse=True)
    return rows[:limit]
