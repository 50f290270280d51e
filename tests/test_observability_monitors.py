"""gateway-manifests/observability/monitors.yaml against the objects they must find: each
ServiceMonitor's selector and port against the Services the install (the kustomize base),
the hand-written pool (epp.yaml) and the controllers (a Model's picker) make; each
PodMonitor's against the pods the controllers make for a Model (aggregated and P/D) — and
none of them finding what is not theirs."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from infergw import api
from infergw.api import Model
from infergw.api.workload import ModelInfer
from infergw.controllers import model_objects, picker_objects
from infergw.controllers.modelinfer_pods import pod_for, revision, slots
from infergw.controllers.picker_objects import PickerSettings
from tests.controller_manifests import MANIFESTS, load
from tests.paths import EXAMPLES

MONITORS = MANIFESTS / "observability" / "monitors.yaml"
Obj = dict[str, Any]


def monitors() -> list[Obj]:
    return load(MONITORS)


def monitor(name: str) -> Obj:
    (found,) = [m for m in monitors() if m["metadata"]["name"] == name]
    return found


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) on `labels`."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
        }[op]
        if not ok:
            return False
    return True


def in_namespace(mon: Obj, namespace: str) -> bool:
    ns = mon["spec"].get("namespaceSelector") or {}
    return ns.get("any", False) or namespace in ns.get("matchNames", [namespace])


def model(path: str = "crds/model.yaml", **overrides) -> Model:
    doc = yaml.safe_load((EXAMPLES / path).read_text())
    doc["metadata"].setdefault("namespace", "team")
    doc["spec"].update(overrides)
    return api.from_dict_as(Model, doc)


def aggregated(engine: str = "vLLM") -> Model:
    return model(backend={"aggregated": {}}, engine={"type": engine})


def services() -> list[Obj]:
    """Every Service: the install's, the hand-written pool's, and a Model's picker's."""
    docs = load(MANIFESTS / "controllers.yaml") + load(MANIFESTS / "bbr" / "bbr.yaml")
    docs += load(MANIFESTS / "epp.yaml")
    docs += [api.to_dict(o) for o in picker_objects.desired(aggregated(), PickerSettings())]
    return [d for d in docs if d["kind"] == "Service"]


def pods(m: Model) -> list[Obj]:
    mi: ModelInfer = model_objects.modelinfer(m)
    return [pod_for(mi, slot, revision(mi)) for slot in slots(mi, 0)]


def service_targets(mon: Obj) -> list[str]:
    """The Services a ServiceMonitor scrapes: selected, in its namespaces, with its port."""
    port = mon["spec"]["endpoints"][0]["port"]
    return [
        s["metadata"]["name"]
        for s in services()
        if matches(mon["spec"]["selector"], s["metadata"].get("labels") or {})
        and in_namespace(mon, s["metadata"].get("namespace", "default"))
        and port in {p.get("name") for p in s["spec"]["ports"]}
    ]


def pod_targets(mon: Obj, candidates: list[Obj]) -> list[Obj]:
    """The pods a PodMonitor scrapes: selected, with a container port of its port's name."""
    port = mon["spec"]["podMetricsEndpoints"][0]["port"]
    return [
        p
        for p in candidates
        if matches(mon["spec"]["selector"], p["metadata"]["labels"])
        and port in {cp.get("name") for c in p["spec"]["containers"] for cp in c.get("ports") or []}
    ]


def test_one_monitor_per_component_of_the_operators_kinds():
    kinds = {m["metadata"]["name"]: (m["apiVersion"], m["kind"]) for m in monitors()}
    assert set(kinds) == {
        "infergate-endpoint-pickers",
        "infergate-controllers",
        "infergate-router",
        "infergate-model-servers",
        "infergate-model-servers-trtllm",
        "infergate-pd-connector",
    }
    assert {v[0] for v in kinds.values()} == {"monitoring.coreos.com/v1"}


@pytest.mark.parametrize(
    "name, want",
    [
        # the hand-written pool's picker and a Model's (the controllers'): not the router's
        ("infergate-endpoint-pickers", {"vllm-pool-epp", "llama-3-8b-epp"}),
        ("infergate-controllers", {"infergate-controllers-metrics"}),
        ("infergate-router", {"infergate-bbr"}),
    ],
)
def test_service_monitors_find_their_components_metrics_services(name, want):
    assert set(service_targets(monitor(name))) == want


def test_model_server_monitors_find_every_serving_pod_and_no_other():
    plain = monitor("infergate-model-servers")
    trtllm = monitor("infergate-model-servers-trtllm")
    for m in (aggregated("vLLM"), aggregated("SGLang"), model()):  # model(): P/D, vLLM
        serving = [
            p for p in pods(m) if p["metadata"]["labels"].get("infergate.io/entry") == "true"
        ]
        assert serving and pod_targets(plain, pods(m)) == serving
        assert pod_targets(trtllm, pods(m)) == []
    trt = pods(aggregated("TRTLLM"))
    assert pod_targets(trtllm, trt) and pod_targets(plain, trt) == []


def test_the_connector_monitor_finds_the_decode_pods_that_run_it():
    mon = monitor("infergate-pd-connector")
    assert mon["spec"]["podMetricsEndpoints"][0]["path"] == "/connector/metrics"
    found = pod_targets(mon, pods(model()))
    assert found
    for p in found:
        assert "connector" in {c["name"] for c in p["spec"]["containers"]}
    assert pod_targets(mon, pods(aggregated())) == []


def test_the_picker_service_the_controllers_make_is_selected_by_its_component_label():
    """The label is on the Service only: the Deployment's selector (immutable) is unchanged."""
    (svc,) = [s for s in services() if s["metadata"]["name"] == "llama-3-8b-epp"]
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "endpoint-picker"
    objs = [api.to_dict(o) for o in picker_objects.desired(aggregated(), PickerSettings())]
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    assert "app.kubernetes.io/component" not in deployment["spec"]["selector"]["matchLabels"]
