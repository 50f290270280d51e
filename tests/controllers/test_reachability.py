"""controllers/reachability.py on its own: the EnvoyPatchPolicies a route needs, read as Envoy
Gateway reports them (both status shapes), and hostile statuses that must neither raise nor
grow the Model's condition."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.api.networking import ParentRef
from infergw.controllers.reachability import (
    MAX_QUOTED,
    UNRESOLVED_HINT,
    Patch,
    patch_problems,
    reachable,
)

NS = "team"
GATEWAY = ParentRef(
    group="gateway.networking.k8s.io", kind="Gateway", name="inference-gateway", namespace=NS
)
EG = "gateway.envoyproxy.io/gatewayclass-controller"


def ancestor(gateway: str = "inference-gateway", namespace: str | None = NS) -> dict:
    ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}
    return ref | ({"namespace": namespace} if namespace else {})


def cond(kind: str, status: str = "True", reason: str = "", message: str = "", gen=None) -> dict:
    c = {"type": kind, "status": status, "reason": reason or kind, "message": message,
         "lastTransitionTime": "2030-01-01T00:00:00Z"}  # fmt: skip
    return c | ({"observedGeneration": gen} if gen is not None else {})


def policy(status: dict | None, name: str = "llama-epp", generation: int = 2) -> dict:
    obj = {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyPatchPolicy",
        "metadata": {"name": name, "namespace": NS, "generation": generation},
        "spec": {"type": "JSONPatch", "targetRef": ancestor(namespace=None)},
    }
    return obj | ({"status": status} if status is not None else {})


def per_gateway(*conditions: dict, ref: dict | None = None) -> dict:
    """v1.1 and later: Gateway API's PolicyStatus."""
    return {"ancestors": [{"ancestorRef": ref or ancestor(), "controllerName": EG,
                           "conditions": list(conditions)}]}  # fmt: skip


def problems(obj: dict | None) -> list[tuple[str, str]]:
    return patch_problems(Patch("llama-epp", obj, "PatchMissing"), GATEWAY)


def reasons(obj: dict | None) -> list[str]:
    return [r for r, _ in problems(obj)]


APPLIED = per_gateway(cond("Accepted", gen=2), cond("Programmed"))  # EG leaves Programmed's out


def test_applied_in_either_status_shape_for_the_current_generation() -> None:
    assert problems(policy(APPLIED)) == []
    # v0.5 to v1.0: the conditions on the policy itself
    assert problems(policy({"conditions": [cond("Accepted"), cond("Programmed")]})) == []
    # the ancestor's namespace defaults to the policy's
    assert problems(policy(per_gateway(cond("Accepted"), cond("Programmed"),
                                       ref=ancestor(namespace=None)))) == []  # fmt: skip


def test_missing_not_seen_and_other_gateways_reports() -> None:
    assert reasons(None) == ["PatchMissing"]
    assert reasons(policy(None)) == ["PatchNotSeen"]
    assert reasons(policy({})) == ["PatchNotSeen"]
    other = per_gateway(cond("Accepted"), cond("Programmed"), ref=ancestor("other"))
    assert reasons(policy(other)) == ["PatchNotSeen"]
    elsewhere = per_gateway(cond("Accepted"), cond("Programmed"), ref=ancestor(namespace="x"))
    assert reasons(policy(elsewhere)) == ["PatchNotSeen"]


def test_not_accepted_names_the_policy_and_envoy_gateways_words() -> None:
    disabled = cond("Accepted", "False", "Disabled",
                    "EnvoyPatchPolicy is disabled in the EnvoyGateway configuration")  # fmt: skip
    [(reason, message)] = problems(policy(per_gateway(disabled)))
    assert reason == "PatchNotAccepted"
    assert message == (
        f"EnvoyPatchPolicy llama-epp on Gateway {NS}/inference-gateway: Accepted False: "
        "Disabled (EnvoyPatchPolicy is disabled in the EnvoyGateway configuration)"
    )


def test_not_programmed_when_a_path_does_not_match() -> None:
    unmatched = cond("Programmed", "False", "ResourceNotFound",
                     "Unable to find xds resources: RouteConfiguration/team/gw/https")  # fmt: skip
    [(reason, message)] = problems(policy(per_gateway(cond("Accepted"), unmatched)))
    assert reason == "PatchNotProgrammed"
    assert "Programmed False: ResourceNotFound (Unable to find xds resources" in message
    invalid = {"conditions": [cond("Accepted"), cond("Programmed", "False", "Invalid")]}
    assert reasons(policy(invalid)) == ["PatchNotProgrammed"]
    assert reasons(policy(per_gateway(cond("Accepted")))) == ["PatchNotProgrammed"]


def test_a_report_about_an_older_generation_does_not_count() -> None:
    stale = per_gateway(cond("Accepted", gen=1), cond("Programmed", gen=1))
    [(reason, message)] = problems(policy(stale))
    assert reason == "PatchNotAccepted"
    assert "not reported for its current generation" in message
    stale_programmed = per_gateway(cond("Accepted", gen=2), cond("Programmed", gen=1))
    assert reasons(policy(stale_programmed)) == ["PatchNotProgrammed"]


def route(*conditions: dict) -> dict:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llama", "namespace": NS, "generation": 1},
        "spec": {},
        "status": {"parents": [{"parentRef": ancestor(), "conditions": list(conditions)}]},
    }


def deployment(*conditions: dict) -> dict:
    return {
        "metadata": {"name": "llama-epp", "namespace": NS},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "llama-epp"}}, "template": {}},
        "status": {"conditions": list(conditions)},
    }


AVAILABLE = deployment({"type": "Available", "status": "True"})
ROUTE_OK = route(cond("Accepted"), cond("ResolvedRefs"))


def test_order_route_then_the_install_filter_then_the_models_patch_then_the_picker() -> None:
    patches = [
        Patch("infergate-picker-filter", None, "PickerFilterMissing"),
        Patch("llama-epp", policy(None), "PatchMissing"),
    ]
    ok, reason, message = reachable(route(cond("Accepted", "False")), GATEWAY, None, patches)
    assert (ok, reason) == (False, "RouteNotAccepted")
    for part in ("infergate-picker-filter does not exist", "llama-epp for Gateway",
                 "Deployment does not exist"):  # fmt: skip
        assert part in message
    assert reachable(ROUTE_OK, GATEWAY, None, patches)[1] == "PickerFilterMissing"
    assert reachable(ROUTE_OK, GATEWAY, None, patches[1:])[1] == "PatchNotSeen"
    applied = [Patch(p.name, policy(APPLIED, name=p.name), p.missing) for p in patches]
    assert reachable(ROUTE_OK, GATEWAY, None, applied)[1] == "PickerMissing"
    ok, reason, message = reachable(ROUTE_OK, GATEWAY, AVAILABLE, applied)
    assert (ok, reason) == (True, "RouteAccepted")
    assert "Envoy Gateway applied the picker's patches" in message
    # no patch written (a Gateway in another namespace): as before
    assert reachable(ROUTE_OK, GATEWAY, AVAILABLE)[:2] == (True, "RouteAccepted")


# ---- hostile statuses ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
LONG = st.text(min_size=0, max_size=5000)
CONDITION = st.fixed_dictionaries(
    {"type": st.sampled_from(["Accepted", "Programmed", "Other"]),
     "status": st.sampled_from(["True", "False", "Unknown"]) | LONG},
    optional={"reason": LONG, "message": LONG, "observedGeneration": st.integers(-1, 3) | JSON},
)  # fmt: skip
ANCESTOR = st.fixed_dictionaries(
    {"ancestorRef": st.just(ancestor()) | st.builds(ancestor, st.text(max_size=20)) | JSON},
    optional={"conditions": st.lists(CONDITION | JSON, max_size=5), "controllerName": JSON},
)
STATUS = (
    JSON
    | st.fixed_dictionaries({}, optional={"ancestors": st.lists(ANCESTOR | JSON, max_size=4),
                                          "conditions": st.lists(CONDITION, max_size=5)})
)  # fmt: skip
KNOWN = {"PatchNotSeen", "PatchNotAccepted", "PatchNotProgrammed", "PatchStatusUnreadable"}
# Our own words around the quoted parts: names and the clipped reason, message and status.
BOUND = 400 + 3 * MAX_QUOTED


@settings(max_examples=300, deadline=None)
@given(STATUS)
def test_any_status_gives_a_known_reason_and_a_bounded_message(status) -> None:
    found = problems(policy(status))
    assert len(found) <= 1
    for reason, message in found:
        assert reason in KNOWN
        assert len(message) <= BOUND
    patches = [Patch("llama-epp", policy(status), "PatchMissing")]
    ok, _, message = reachable(ROUTE_OK, GATEWAY, AVAILABLE, patches)
    assert ok == (not found)
    assert len(message) <= BOUND


@settings(max_examples=100, deadline=None)
@given(st.lists(CONDITION, max_size=4))
def test_a_hostile_route_or_deployment_status_is_quoted_clipped(conditions) -> None:
    _, reason, message = reachable(route(*conditions), GATEWAY, deployment(*conditions))
    assert reason.startswith("Route")
    assert len(message) <= 3 * BOUND + len(UNRESOLVED_HINT)
