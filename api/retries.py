"""What Envoy retries in front of the pods, one definition for the local stack's template
(gateway-manifests/local/envoy.yaml.j2) and the cluster's EnvoyPatchPolicy
(gateway-manifests/envoy-patch-policy.yaml, checked against these by tests/test_manifests.py).

A retry goes at once to the picker's next endpoint (a ModelServer's `retry.attempts` caps how
many it names); Envoy retries only before any byte of the answer reached the client.
"""

from __future__ import annotations

# Refused connection or stream, a reset before the request was sent (nothing ran on the pod),
# or a 503 from the pod (draining, out of room).
RETRY_ON = "connect-failure,refused-stream,reset-before-request,retriable-status-codes"
RETRIABLE_STATUS_CODES = (503,)
# Retries in flight: at most this percent of the cluster's active requests, at least this many.
RETRY_BUDGET_PERCENT = 20.0
RETRY_BUDGET_MIN_CONCURRENCY = 3


def retry_policy(num_retries: int) -> dict:
    """A route's retry_policy (Envoy's v3 RetryPolicy, as YAML/JSON)."""
    return {
        "retry_on": RETRY_ON,
        "retriable_status_codes": list(RETRIABLE_STATUS_CODES),
        "num_retries": num_retries,
    }


def retry_budget() -> dict:
    """A cluster circuit-breaker threshold's retry_budget."""
    return {
        "budget_percent": {"value": RETRY_BUDGET_PERCENT},
        "min_retry_concurrency": RETRY_BUDGET_MIN_CONCURRENCY,
    }
