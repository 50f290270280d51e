"""The real controllers (build_controllers, kubernetes mode's set) against the API emulator over
HTTP, authorized by the RBAC of gateway-manifests/controllers.yaml as kube-apiserver would
(tests/kube_rbac.py), so nothing here passes that the install would refuse: a Model's
ModelServer, ModelRoute and AutoScalingPolicy get their status through the status subresource,
the binding its last decision, and what the controllers did and what failed is in Events the
emulator validated (tests/kube_events.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.controllers_in_emulator import (
    CONTROLLERS,
    TOKEN,
    kubelet,
    manifest_rbac,
    running_controllers,
)
from tests.kube_rbac import RBACEmulator
from tests.paths import CRD_EXAMPLES

NET, WORKLOAD = "networking.infergate.io/v1alpha1", "workload.infergate.io/v1alpha1"


async def until(what: str, check: Callable[[], object], within: float = 30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if got := check():
            return got
        await asyncio.sleep(0.1)
    pytest.fail(f"not within {within:.0f}s: {what}")


def conditions(obj: dict | None) -> dict[str, tuple[str, str]]:
    return {
        c["type"]: (c["status"], c["reason"])
        for c in ((obj or {}).get("status") or {}).get("conditions") or []
    }


def events(api: RBACEmulator, reason: str | None = None) -> list[dict]:
    found = api.list_objects("events.k8s.io/v1", "Event")
    return [e for e in found if reason is None or e["reason"] == reason]


async def scenario(api: RBACEmulator) -> None:
    async with running_controllers(autoscale_interval=0.3):
        policy = yaml.safe_load((CRD_EXAMPLES / "autoscalingpolicy.yaml").read_text())
        api.put(policy)
        model = yaml.safe_load((CRD_EXAMPLES / "model.yaml").read_text())
        api.put(model)
        name = model["metadata"]["name"]

        # the Model's children, each created with an Event on the Model
        await until("Created events", lambda: len(events(api, "Created")) >= 4)
        created = events(api, "Created")
        assert {e["regarding"]["kind"] for e in created} == {"Model"}
        assert any("ModelInfer" in e["note"] for e in created)

        # the ModelServer: no pod ready yet, then ready once the kubelet says so
        def server() -> dict | None:
            return api.get(NET, "ModelServer", name)

        await until("ModelServer not ready", lambda: "Ready" in conditions(server()))
        assert conditions(server())["Ready"][0] == "False"
        pods = await until(
            "the pods", lambda: {p["metadata"]["name"] for p in api.list_objects("v1", "Pod")}
        )
        kubelet(api, pods)
        await until(
            "ModelServer ready", lambda: conditions(server())["Ready"] == ("True", "PodsReady")
        )
        s = server()
        assert s["status"]["observedGeneration"] == s["metadata"]["generation"]

        route = await until(
            "ModelRoute status", lambda: conditions(api.get(NET, "ModelRoute", name))
        )
        assert route == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}

        pname = policy["metadata"]["name"]
        await until(
            "policy in use",
            lambda: (
                conditions(api.get(WORKLOAD, "AutoScalingPolicy", pname)).get("InUse")
                == ("True", "BoundByBindings")
            ),
        )
        p = api.get(WORKLOAD, "AutoScalingPolicy", pname)
        assert conditions(p)["Valid"] == ("True", "Valid") and p["status"]["bindings"] == 1

        # the pods serve no metrics here: the binding says so, and a Warning Event does
        await until("a MetricsUnavailable Warning", lambda: events(api, "MetricsUnavailable"))
        [warning] = events(api, "MetricsUnavailable")[:1]
        assert (
            warning["type"] == "Warning"
            and warning["regarding"]["kind"] == "AutoScalingPolicyBinding"
        )

        # a route to a ModelServer that does not exist: RefNotFound, a Warning, then resolved
        stray = {
            "apiVersion": NET,
            "kind": "ModelRoute",
            "metadata": {"name": "stray", "namespace": "default"},
            "spec": {
                "modelName": "other",
                "rules": [{"targetModels": [{"modelServerName": "later"}]}],
            },
        }
        api.put(stray)

        def stray_refs() -> tuple[str, str] | None:
            return conditions(api.get(NET, "ModelRoute", "stray")).get("ResolvedRefs")

        await until("stray unresolved", lambda: stray_refs() == ("False", "RefNotFound"))
        assert any(e["regarding"]["name"] == "stray" for e in events(api, "RefNotFound"))
        later = {**s, "metadata": {"name": "later", "namespace": "default"}}
        later.pop("status", None)
        api.put(later)
        await until("stray resolved", lambda: stray_refs() == ("True", "ResolvedRefs"))
        assert api.denied.get(CONTROLLERS.name, []) == []


def test_statuses_and_events_through_the_api_with_the_install_rbac(
    tmp_path: Path, monkeypatch
) -> None:
    auth = manifest_rbac()
    api = RBACEmulator({TOKEN: (CONTROLLERS, lambda: auth)})
    with api.threaded():
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)))
        asyncio.run(scenario(api))
