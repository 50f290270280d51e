"""What Envoy Gateway writes into an EnvoyPatchPolicy's status (v1.1 and later: Gateway API's
PolicyStatus, one entry per Gateway), for the tests that play its part."""

from __future__ import annotations

EG_CONTROLLER = "gateway.envoyproxy.io/gatewayclass-controller"
APPLIED = (
    ("Accepted", "True", "Accepted", "Policy has been accepted."),
    ("Programmed", "True", "Programmed", "Patches have been successfully applied."),
)


def patch_policy_status(
    namespace: str,
    generation: int,
    conditions: tuple[tuple[str, str, str, str], ...] = APPLIED,
    gateway: str = "inference-gateway",
) -> dict:
    """`conditions` as (type, status, reason, message) for `gateway`; as Envoy Gateway does,
    only Accepted carries observedGeneration (envoyproxy/gateway#7713)."""
    ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway,
           "namespace": namespace}  # fmt: skip
    return {
        "ancestors": [
            {
                "ancestorRef": ref,
                "controllerName": EG_CONTROLLER,
                "conditions": [
                    {"type": t, "status": s, "reason": r, "message": m,
                     "lastTransitionTime": "2030-01-01T00:00:00Z"}
                    | ({"observedGeneration": generation} if t == "Accepted" else {})
                    for t, s, r, m in conditions
                ],
            }
        ]
    }  # fmt: skip
