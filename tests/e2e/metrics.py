"""A parsed Prometheus scrape, read by metric name and labels (e2e tests sum what they count)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Metrics:
    """One scrape: sums of samples by name over the label sets that match."""

    def __init__(self, text: str) -> None:
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def __call__(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def __contains__(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)
