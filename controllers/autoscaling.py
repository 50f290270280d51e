"""The autoscaler's arithmetic, apart from any I/O: a recommendation from metrics, panic and
stable modes with rate limits and stabilization windows, clamping, the cost-aware split over
several targets and the prefill/decode ratio.

Semantics (Knative's KPA as Kthena adapted it):
- recommendation = max over metrics of ceil(sum / target), unchanged while every metric is
  within `tolerance` of its target at the current size;
- panic when recommendation ≥ current × threshold%: scale up fast (bounded by `percent`
  per period over the smallest size seen in the period), never down, until `hold` has
  passed since the last trigger;
- stable: up to the *smallest* recommendation of the stabilization window, down to the
  *largest* (so one noisy sample does not move the fleet), each step bounded by
  `instances` or `percent` of the smallest (up) / largest (down) size in the period;
  `select` Or takes the looser bound, And the tighter.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class StepPolicy:
    instances: int | None = None  # at most this many replicas per period
    percent: float | None = None  # at most this percent of the base per period
    period: float = 60.0
    select: str = "Or"  # Or: the looser of the two bounds; And: the tighter
    window: float = 0.0  # stabilization window, seconds


@dataclass(slots=True, frozen=True)
class PanicPolicy:
    threshold_percent: float = 200.0  # enter when rec ≥ current × threshold%
    percent: float = 1000.0  # growth per period while panicking
    period: float = 10.0
    hold: float = 60.0  # stay in panic this long after the last trigger


@dataclass(slots=True, frozen=True)
class Policy:
    targets: dict[str, float]  # metric name → target value per replica
    tolerance: float = 0.1  # fraction
    up: StepPolicy = StepPolicy(percent=100.0, instances=4, period=15.0)
    down: StepPolicy = StepPolicy(percent=100.0, period=15.0, window=300.0)
    panic: PanicPolicy | None = PanicPolicy()


def recommend(metrics: dict[str, float], policy: Policy, current: int) -> int:
    """ceil(sum / target) for each metric, the largest wins; within tolerance of every
    target at the current size, stay."""
    if current > 0 and all(
        abs(metrics.get(m, 0.0) / (t * current) - 1) <= policy.tolerance
        for m, t in policy.targets.items()
    ):
        return current
    wanted = [math.ceil(metrics.get(m, 0.0) / t) for m, t in policy.targets.items() if t > 0]
    return max(wanted, default=current)


# Why a step chose its size (the binding's status.targets[].reason).
WITHIN_TOLERANCE = "WithinTolerance"  # every metric near its target at this size
STEADY = "Steady"  # the recommendation is the current size
SCALE_UP, SCALE_DOWN = "ScaleUp", "ScaleDown"
STABILIZATION_WINDOW = "StabilizationWindow"  # the window's recommendations held it back
RATE_LIMITED = "RateLimited"  # the step's instances/percent bound per period held it back
PANIC = "Panic"
PANIC_RATE_LIMITED = "PanicRateLimited"
HELD_REQUESTS = "HeldRequests"  # the pickers hold requests for want of a ready pod
MIN_REPLICAS, MAX_REPLICAS = "MinReplicas", "MaxReplicas"


@dataclass(slots=True, frozen=True)
class Decision:
    """One step: what it read, what the metrics alone recommend and the size it set, why."""

    metrics: dict[str, float]  # summed over the target's ready pods
    demand: float  # requests the pickers hold
    current: int
    recommended: int
    desired: int
    reason: str


def _moved(reason: str, rec: int, windowed: int, bound: int, *, up: bool) -> str:
    """Why a step towards `rec` went no further: the period's rate bound, the window's
    recommendations, or neither (`reason`)."""
    if up:
        if bound < min(rec, windowed):
            return RATE_LIMITED
        if windowed < rec:
            return STABILIZATION_WINDOW
    else:
        if bound > max(rec, windowed):
            return RATE_LIMITED
        if windowed > rec:
            return STABILIZATION_WINDOW
    return reason


@dataclass(slots=True)
class Scaler:
    """The state of one scaled target over time."""

    policy: Policy
    min_replicas: int = 1
    max_replicas: int = 10
    panic_until: float = -math.inf
    last: Decision | None = None  # the last step's inputs and why, for the binding's status
    recs: deque[tuple[float, int]] = field(default_factory=deque)
    sizes: deque[tuple[float, int]] = field(default_factory=deque)

    def panicking(self, now: float) -> bool:
        return now < self.panic_until

    def step(self, now: float, metrics: dict[str, float], current: int, demand: float = 0.0) -> int:
        """The size to set now, given the metrics summed over the target's ready pods and
        `demand`, the requests the pickers hold because no pod is ready (scale from zero).

        While any request is held the target never shrinks and has at least one replica,
        at once (no window or rate limit delays the first pod); the held demand enters the
        recommendations, so a scale down (to zero too) comes only a whole scale-down
        stabilization window after the last request was held."""
        p = self.policy
        floor = max(current, 1) if demand > 0 else 0
        raw = recommend(metrics, p, current)
        rec = max(raw, floor)
        self.recs.append((now, rec))
        self.sizes.append((now, current))
        self._trim(now)
        if p.panic and current > 0 and rec * 100 >= current * p.panic.threshold_percent:
            self.panic_until = now + p.panic.hold
        held = floor > raw
        if p.panic and now < self.panic_until:
            base = self._min_size(now - p.panic.period)
            cap = math.floor(base * (1 + p.panic.percent / 100))
            desired = max(current, min(rec, cap))  # panic never scales down
            why = PANIC_RATE_LIMITED if rec > cap and cap > current else PANIC
        elif rec > current:
            windowed = min(r for t, r in self.recs if t >= now - p.up.window)
            # From zero a percentage bound is zero too: grow from one pod instead.
            base = max(1, self._min_size(now - p.up.period))
            bound = _bound(base, p.up, up=True)
            desired = max(current, min(windowed, bound))
            why = _moved(HELD_REQUESTS if held else SCALE_UP, rec, windowed, bound, up=True)
        elif rec < current:
            windowed = max(r for t, r in self.recs if t >= now - p.down.window)
            base = self._max_size(now - p.down.period)
            bound = _bound(base, p.down, up=False)
            desired = min(current, max(windowed, bound))
            why = _moved(SCALE_DOWN, rec, windowed, bound, up=False)
        else:
            desired = current
            why = HELD_REQUESTS if held else WITHIN_TOLERANCE if raw == current else STEADY
        size = max(self.min_replicas, min(self.max_replicas, max(desired, floor)))
        if size > desired and size == self.min_replicas:
            why = MIN_REPLICAS
        elif size < desired:
            why = MAX_REPLICAS
        self.last = Decision(dict(metrics), demand, current, rec, size, why)
        return size

    def _trim(self, now: float) -> None:
        p = self.policy
        keep = max(p.up.window, p.down.window, p.up.period, p.down.period)
        if p.panic:
            keep = max(keep, p.panic.period)
        for q in (self.recs, self.sizes):
            while q and q[0][0] < now - keep:
                q.popleft()

    def _min_size(self, since: float) -> int:
        return min(s for t, s in self.sizes if t >= since)

    def _max_size(self, since: float) -> int:
        return max(s for t, s in self.sizes if t >= since)


def _bound(base: int, step: StepPolicy, *, up: bool) -> int:
    """The furthest size one period may reach from `base`."""
    sign = 1 if up else -1
    bounds = []
    if step.instances is not None:
        bounds.append(base + sign * step.instances)
    if step.percent is not None:
        scaled = base * (1 + sign * step.percent / 100)
        bounds.append(math.floor(scaled) if up else math.ceil(scaled))
    if not bounds:
        return 10**9 if up else 0
    loose = max(bounds) if up else min(bounds)
    tight = min(bounds) if up else max(bounds)
    return loose if step.select == "Or" else tight


# ---- several targets ----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class CostTarget:
    name: str
    min_replicas: int
    max_replicas: int
    cost: float


def split_by_cost(
    total: int, targets: list[CostTarget], expansion_percent: float
) -> dict[str, int]:
    """Spread `total` replicas: every target's minimum first, then the rest of each target's
    range in packages of 1, r, r², … replicas (r = expansion_percent / 100), cheapest
    package (cost × size) first. A package is taken whole while it fits, else in part."""
    out = {t.name: t.min_replicas for t in targets}
    left = total - sum(out.values())
    r = max(1.0, expansion_percent / 100)
    packages = []
    for order, t in enumerate(targets):
        room, size = t.max_replicas - t.min_replicas, 1.0
        while room > 0:
            n = min(room, max(1, round(size)))
            packages.append((t.cost * n, order, t.name, n))
            room -= n
            size *= r
    for _cost, _order, name, n in sorted(packages):
        if left <= 0:
            break
        take = min(n, left)
        out[name] += take
        left -= take
    return out


def enforce_ratio(prefill: int, decode: int, low: float, high: float) -> tuple[int, int]:
    """Keep prefill / decode within [low, high] by raising whichever role is short."""
    if decode > 0 and prefill < decode * low:
        prefill = math.ceil(decode * low)
    if prefill > decode * high:
        decode = math.ceil(prefill / high)
    return prefill, decode
