"""Builders for the Director unit tests: a pool of two pods with two ports each, a least-request
picker config, parsed completion requests in their contexts, and ModelRoutes with a rate limit
in front of a gate.
Shared by the director, gate, trust, hostile-body and ext_proc fuzz tests."""

from __future__ import annotations

import pytest

from infergw.epp.capacity_wait import CapacityWaitCollector
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore, PoolSpec
from infergw.epp.director import Director, DirectorOptions
from infergw.epp.errors import PickerError
from infergw.epp.flowcontrol import FlowControlConfig
from infergw.epp.gatekeeper import Gatekeeper
from infergw.epp.metric_collectors import FlowControlMetrics
from infergw.epp.metrics import PickerMetrics
from infergw.epp.request import parse_request
from infergw.epp.scheduling.config import load_config
from infergw.epp.trust import HeaderTrust

HEAD = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
"""
# A config whose one scorer reads the KV-event index: the picker must build the KV cache.
PRECISE = (
    HEAD
    + """\
plugins:
- type: precise-prefix-cache-scorer
schedulingProfiles:
- {name: default, plugins: [{pluginRef: precise-prefix-cache-scorer}]}
"""
)
LEAST_REQUEST = (
    HEAD
    + """\
plugins:
- type: header-based-testing-filter
- type: least-request
- {type: max-score-picker, parameters: {seed: 1}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: least-request
  - pluginRef: max-score-picker
"""
)
A0, A1, B0, B1 = "10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001"
EVERYONE = {A0, A1, B0, B1}


def pod(name: str, ip: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app": "vllm"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def make_datastore() -> Datastore:
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [8000, 8001]))
    ds.replace_pods([pod("a", "10.0.0.1"), pod("b", "10.0.0.2")])
    return ds


def make_director(config: str = LEAST_REQUEST, **options) -> Director:
    return Director(
        make_datastore(), load_config(config), PickerMetrics(), DirectorOptions(**options)
    )


def context(
    model: str = "m",
    headers=None,
    max_tokens: int | None = 100,
    prompt: str = "x" * 40,
    *,
    subset: list[str] | None = None,
    stream: bool = False,
    stream_options: str | None = None,
) -> RequestContext:
    """A parsed completion request in a fresh context, as extproc hands it to the director."""
    body = f'{{"model": "{model}", "prompt": "{prompt}"'
    if max_tokens is not None:
        body += f', "max_tokens": {max_tokens}'
    if stream:
        body += ', "stream": true'
    if stream_options is not None:
        body += f', "stream_options": {stream_options}'
    body += "}"
    req = parse_request("/v1/completions", body.encode(), headers or {}, max_body_bytes=1 << 20)
    return RequestContext(req, subset=subset)


def status_of(fn, *args) -> int:
    with pytest.raises(PickerError) as info:
        fn(*args)
    return info.value.status


def set_models(d: Director, models: dict[str, set[str] | None]) -> None:
    for address, names in models.items():
        d.datastore.endpoint(address).models = None if names is None else frozenset(names)


NET = "networking.infergate.io/v1alpha1"


def limited_route(**limit) -> list[dict]:
    return [
        {
            "apiVersion": NET,
            "kind": "ModelRoute",
            "metadata": {"name": "limited"},
            "spec": {
                "modelName": "m",
                "rules": [{"targetModels": [{"modelServerName": "all"}]}],
                "rateLimit": {"unit": "minute", **limit},
            },
        }
    ]


SERVERS = [
    {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": "all"},
        "spec": {
            "model": "m",
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": "vllm"}},
        },
    }
]


def director_with(
    routes=(), flow_control: FlowControlConfig | None = None, *, pool: str | None = None
) -> Director:
    """`pool` named: flow control's metrics are recorded for that pool name."""
    ds = make_datastore()
    ds.set_routes(list(routes), SERVERS)
    metrics = PickerMetrics()
    observer = FlowControlMetrics(metrics, pool) if pool is not None else None
    gate = Gatekeeper(metrics.registry, flow_control=flow_control, flow_observer=observer)
    # These clients name their flows and objectives, as on a closed network that trusts them.
    options = DirectorOptions(fallbacks=0, trust=HeaderTrust(client_headers=True))
    return Director(ds, load_config(LEAST_REQUEST), metrics, options, gate)


def cold_director(*, ttl: float = 30.0, routes=(), flow_control=None) -> Director:
    """A director whose pool has no pod at all (scaled to zero)."""
    ds = make_datastore()
    ds.set_routes(list(routes), SERVERS)
    ds.replace_pods([])
    metrics = PickerMetrics()
    gate = Gatekeeper(metrics.registry, flow_control=flow_control, capacity_wait_ttl=ttl)
    gate.capacity.pool = lambda: "pool"
    metrics.registry.register(CapacityWaitCollector(gate.capacity, metrics.model_labels))
    options = DirectorOptions(fallbacks=0, trust=HeaderTrust(client_headers=True))
    return Director(ds, load_config(LEAST_REQUEST), metrics, options, gate)
