"""Prometheus metrics cheap enough for the per-request and per-message path, exposed exactly
as prometheus_client's own (the same names, labels, buckets, samples and order).

prometheus_client takes a lock per value: a histogram observation is two locked increments
after a walk over the buckets, a counter increment a locked add behind two checks — ~1–4 µs
each, and a request makes a dozen. Here a histogram finds its bucket by bisection and a child
updates plain floats under one lock of its own; the ext_proc message counts, written by the
event loop alone, are plain ints read by a collector. (prometheus_client's multiprocess mode,
which keeps values in files, is not supported by these; the picker does not use it.)
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

import prometheus_client.metrics as prom_metrics
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily


class _Plain:
    """A child's value, for prometheus_client's sample code to read (`get`); written by its
    metric under the metric's one lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def get(self) -> float:
        return self.value

    def get_exemplar(self) -> None:
        return None


class FastHistogram(Histogram):
    """A Histogram whose children observe with a bisection and one lock. Exemplars are not
    kept (the picker sets none)."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._values_lock = threading.Lock()
        self._sum = _Plain()
        self._buckets = [_Plain() for _ in self._upper_bounds]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            raise ValueError("FastHistogram keeps no exemplars")
        if self._labelnames and not self._labelvalues:
            self._raise_if_not_observable()
        # The first bound >= amount, as Histogram's walk finds; NaN falls in no bucket.
        i = bisect_left(self._upper_bounds, amount)
        with self._values_lock:
            self._sum.value += amount
            if amount == amount:
                self._buckets[i].value += 1.0

    def merge(self, tally: LocalTally) -> None:
        """Adds a tally's observations at once, as if each had been observed here."""
        if self._labelnames and not self._labelvalues:
            self._raise_if_not_observable()
        with self._values_lock:
            self._sum.value += tally.total
            for bucket, count in zip(self._buckets, tally.counts, strict=True):
                bucket.value += count

    def _child_samples(self) -> Iterable:
        with self._values_lock:  # a consistent view: buckets, count and sum of one moment
            return super()._child_samples()


class LocalTally:
    """Observations bucketed where they happen, without a lock, for one FastHistogram child
    to merge later (FastHistogram.merge): what one request sees many times (each streamed
    chunk's gap) costs a bisection each and the shared histogram once. Its size is the
    buckets', however many observations it takes."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = [float(b) for b in buckets]
        if self.bounds[-1] != float("inf"):
            self.bounds.append(float("inf"))  # as Histogram adds it
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def add(self, amount: float) -> None:  # a finite amount (NaN would land in the first)
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount


class FastCounter(Counter):
    """A Counter whose children add under one plain lock. Exemplars are not kept."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._values_lock = threading.Lock()
        self._value = _Plain()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            raise ValueError("FastCounter keeps no exemplars")
        if self._labelnames and not self._labelvalues:
            self._raise_if_not_observable()
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._values_lock:
            self._value.value += amount

    def reset(self) -> None:
        with self._values_lock:
            self._value.value = 0.0
        self._created = time.time()


class LoopTally:
    """A counter by one label, counted in plain ints by the one thread that writes it (the
    event loop: `counts[value] += 1`) and exposed like a prometheus_client Counter with all
    its label values made at once."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        values: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.counts: dict[str, int] = dict.fromkeys(values, 0)
        self._created = time.time()
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=(self.label,))
        created = self._created if prom_metrics._use_created else None
        for value, count in list(self.counts.items()):
            family.add_metric((value,), float(count), created=created)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=(self.label,))
