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

import time
from collections.abc import Iterator, Sequence

import prometheus_client.metrics as prom_metrics
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily


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
