"""The router's own metrics, in a registry of its own (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# infergate_bbr_requests_total{result}: how each request left the router.
ROUTED = "routed"  # the header names the pool
BODYLESS = "bodyless"  # no body to read: passed on, header removed
PASSED = "passed_through"  # a body it could not read, passed on (--on-bad-body pass)
MODEL_NOT_FOUND = "model_not_found"  # 404: no pool serves the model
RESPONSE_NOT_FOUND = "response_not_found"  # 404: a response id naming no pool served here
RESULT_BY_STATUS = {
    400: "bad_request",
    404: "no_matching_rule",
    413: "too_large",
    429: "busy",
    503: "no_pool",
    500: "internal",
}


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "infergate_bbr_requests_total",
            "Requests the body-based router handled, by result",
            ["result"],
            registry=self.registry,
        )
        self.routed = Counter(
            "infergate_bbr_routed_total",
            "Requests sent to each InferencePool (the x-gateway-model-name header's value)",
            ["pool"],
            registry=self.registry,
        )
        self.unknown_models = Counter(
            "infergate_bbr_model_not_found_total",
            "Requests for a model no InferencePool here serves (answered 404 model_not_found)",
            registry=self.registry,
        )
        self.pools = Gauge(
            "infergate_bbr_pools",
            "InferencePools in the router's table",
            registry=self.registry,
        )
        self.source_errors = Counter(
            "infergate_bbr_source_errors_total",
            "Reloads of the object files that failed (the previous table stays), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "infergate_bbr_skipped_objects_total",
            "Objects from the API server the router could not use, by kind",
            ["kind"],
            registry=self.registry,
        )
