"""Prometheus metric families built from plain values, as the engine vocabularies render them.

With a creation time, counters and histograms also carry the `_created` series that
prometheus_client adds to every counter and histogram (a real vLLM exports them).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from infergw.simulator.stats import Histogram


class Families:
    """Builds families that share one set of constant labels and one creation time."""

    def __init__(self, labels: Mapping[str, str], created: float | None = None) -> None:
        self.labels = dict(labels)
        self.created = created

    def gauge(self, name: str, doc: str, value: float) -> Metric:
        return self.gauge_by(name, doc, {}, value)

    def gauge_by(self, name: str, doc: str, extra: Mapping[str, str], value: float) -> Metric:
        """A gauge with one series whose labels are the constant ones plus `extra`."""
        labels = {**self.labels, **extra}
        g = GaugeMetricFamily(name, doc, labels=list(labels))
        g.add_metric(list(labels.values()), value)
        return g

    def gauges(self, name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
        """One series per value of `label`."""
        g = GaugeMetricFamily(name, doc, labels=[*self.labels, label])
        for key, value in values.items():
            g.add_metric([*self.labels.values(), key], value)
        return g

    def counter(self, name: str, doc: str, value: float) -> Metric:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value, created=self.created)
        return c

    def counters(self, name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
        """One series per value of `label`, in the order given."""
        c = CounterMetricFamily(name, doc, labels=[*self.labels, label])
        for key, value in values.items():
            c.add_metric([*self.labels.values(), key], value, created=self.created)
        return c

    def histogram(self, name: str, doc: str, h: Histogram) -> Metric:
        m = HistogramMetricFamily(name, doc, labels=list(self.labels))
        m.add_metric(list(self.labels.values()), h.cumulative(), h.total)
        if self.created is not None:
            m.add_sample(name + "_created", self.labels, self.created)
        return m
