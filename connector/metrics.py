"""The sidecar's own Prometheus metrics (served on /connector/metrics: /metrics is the engine's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

PREFILL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class ConnectorMetrics:
    def __init__(self, connector: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.connector = connector
        self.requests = Counter(
            "infergate_connector_requests_total",
            "Requests the sidecar handled, by mode (passthrough or disaggregated).",
            ["connector", "mode"],
            registry=self.registry,
        )
        self.prefill_duration = Histogram(
            "infergate_connector_prefill_duration_seconds",
            "Time of the successful prefill leg, retries included.",
            ["connector"],
            buckets=PREFILL_BUCKETS,
            registry=self.registry,
        )
        self.prefill_failures = Counter(
            "infergate_connector_prefill_failures_total",
            "Failed prefill attempts, by reason.",
            ["connector", "reason"],
            registry=self.registry,
        )
        self.prefill_fallbacks = Counter(
            "infergate_connector_prefill_fallbacks_total",
            "Requests served whole by the local engine because no prefiller could be "
            "reached (--local-prefill-fallback), by the last prefill attempt's failure.",
            ["connector", "reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "infergate_connector_errors_total",
            "Requests answered with the sidecar's own error, by reason.",
            ["connector", "reason"],
            registry=self.registry,
        )

    def request(self, mode: str) -> None:
        self.requests.labels(self.connector, mode).inc()

    def prefill_done(self, seconds: float) -> None:
        self.prefill_duration.labels(self.connector).observe(seconds)

    def prefill_failed(self, reason: str) -> None:
        self.prefill_failures.labels(self.connector, reason).inc()

    def prefill_fallback(self, reason: str) -> None:
        self.prefill_fallbacks.labels(self.connector, reason).inc()

    def error(self, reason: str) -> None:
        self.errors.labels(self.connector, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
