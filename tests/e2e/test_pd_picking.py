"""Prefill/decode picking end to end through a real Envoy: the picker's pd-profile-handler
chooses a decode pod as the destination and names prefill pods in x-prefiller-host-port.

Six "pods" (tests/e2e/recording_backend.py, one Pod object each at 127.0.0.1 with its own
port through the active-ports annotation) carry role labels and, for a ModelServer whose
pdGroup.groupKey is example.com/pair, three P/D groups:

    g1: d1 (decode), p1a, p1b (prefill)    g2: d2 (decode), x2 (both)    g3: d3 (decode)

The default group label, infergate.io/group, puts them all in one group: only the
ModelServer's groupKey keeps the groups apart. What the checks observe is real: the headers
each decode pod received (Envoy forwards the picker's header mutation to it), which pods got
requests at all, the served endpoint, and the picker's /metrics and /debug/pd.
"""

from __future__ import annotations

import sys

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from tests.conftest import free_port
from tests.e2e.gateway_config import SERVED

pytestmark = pytest.mark.slow

HEADER = "x-prefiller-host-port"
PIN = "test-epp-endpoint-selection"
NET = "networking.infergate.io/v1alpha1"
MODEL = "pd-model"
PODS = [  # name, role, P/D group (example.com/pair)
    ("d1", "decode", "g1"),
    ("p1a", "prefill", "g1"),
    ("p1b", "prefill", "g1"),
    ("d2", "decode", "g2"),
    ("x2", "both", "g2"),
    ("d3", "decode", "g3"),
]
CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: decode-filter
- type: prefill-filter
- type: prefix-cache-scorer
- type: queue-scorer
- type: max-score-picker
- type: pd-profile-handler
  parameters: {nonCachedTokens: 64}
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: decode-filter
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 1}
"""


def pool_objects(stack: LocalStack, ports: list[int]) -> list[dict]:
    """The stack's InferencePool, one Pod per port with its labels, and a routed ModelServer."""
    pool = next(
        d for d in yaml.safe_load_all(stack.pool_path.read_text()) if d["kind"] == "InferencePool"
    )
    app = pool["spec"]["selector"]["matchLabels"]["app"]
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {
                    "app": app,
                    "infergate.io/role": role,
                    "infergate.io/group": "one",
                    "example.com/pair": group,
                },
                "annotations": {"inference.networking.k8s.io/active-ports": str(port)},
            },
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        for (name, role, group), port in zip(PODS, ports, strict=True)
    ]
    server = {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": "pd", "namespace": "default"},
        "spec": {
            "model": "infergate-sim",  # what the recording backend serves
            "inferenceEngine": "vLLM",
            "workloadSelector": {
                "matchLabels": {"app": app},
                "pdGroup": {
                    "groupKey": "example.com/pair",
                    "prefillLabels": {"infergate.io/role": "prefill"},
                    "decodeLabels": {"infergate.io/role": "decode"},
                },
            },
        },
    }
    route = {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": "pd", "namespace": "default"},
        "spec": {"modelName": MODEL, "rules": [{"targetModels": [{"modelServerName": "pd"}]}]},
    }
    return [pool, *pods, server, route]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd")
    ports = [free_port() for _ in PODS]
    (tmp / "epp-config.yaml").write_text(CONFIG)
    stack = LocalStack(
        StackConfig(
            workdir=tmp,
            pods=len(PODS),
            ports=free_stack_ports(len(PODS)),
            pod_ports=ports,
            picker_config=tmp / "epp-config.yaml",
            pod_command=lambda port: [
                sys.executable,
                "-m",
                "tests.e2e.recording_backend",
                str(port),
            ],
        )
    )
    # Before start: the picker reads this pool file in place of the one-Pod static pool.
    stack.pool_path.write_text(yaml.safe_dump_all(pool_objects(stack, ports), sort_keys=False))
    stack.start()
    yield stack, {name: f"127.0.0.1:{port}" for (name, _, _), port in zip(PODS, ports, strict=True)}
    stack.stop()


def ask(stack: LocalStack, decode: str, prompt: str) -> requests.Response:
    r = requests.post(
        stack.url + "/v1/completions",
        headers={PIN: decode},  # the decode profile's header-based-testing-filter
        json={"model": MODEL, "prompt": prompt, "max_tokens": 1},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.headers[SERVED] == decode
    return r


def received(address: str) -> list[dict[str, str]]:
    """The headers of each request the pod at `address` received, in order."""
    got = requests.get(f"http://{address}/recorded", timeout=5).json()
    return [dict(entry["headers"]) for entry in got]


def last_prefillers(address: str) -> list[str] | None:
    value = received(address)[-1].get(HEADER)
    return None if value is None else value.split(",")


def picker(stack: LocalStack, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}{path}", timeout=5)


def metric_samples(exposition: str) -> dict[tuple, float]:
    """(sample name, sorted label items) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def text(seed: str, chars: int) -> str:
    return "".join(f"{seed}{i:05d} " for i in range(chars // (len(seed) + 6) + 1))[:chars]


def test_prefill_pods_reach_the_decode_pod_in_the_header(pd):
    stack, at = pd
    shared = text("shared", 2000)  # 500 approximate tokens
    # 1. New to d1: disaggregated, with both prefill pods of g1 (primary, fallback).
    ask(stack, at["d1"], shared + text("one", 400))
    first = last_prefillers(at["d1"])
    assert first is not None and sorted(first) == sorted([at["p1a"], at["p1b"]])
    # 2. The same prompt again: d1 holds it all, so it serves it alone.
    ask(stack, at["d1"], shared + text("one", 400))
    assert last_prefillers(at["d1"]) is None
    # 3. The shared start with new endings (~100 tokens new to d1, over the 64 threshold):
    # disaggregated again, and the prefill pod that computed the start is chosen each time.
    for i in range(3):
        ask(stack, at["d1"], shared + text(f"end{i}", 400))
        assert last_prefillers(at["d1"])[0] == first[0]
    # 4. g2's decode pod pairs with g2's `both` pod, never with g1's prefill pods.
    ask(stack, at["d2"], text("other", 2000))
    assert last_prefillers(at["d2"]) == [at["x2"]]
    # 5. g3 has no prefill pod: d3 serves the request aggregated.
    ask(stack, at["d3"], text("alone", 2000))
    assert last_prefillers(at["d3"]) is None
    # The prefill pods themselves got nothing: Envoy sent every request to its decode pod.
    for name in ("p1a", "p1b", "x2"):
        assert received(at[name]) == []

    samples = metric_samples(picker(stack, "/metrics").text)
    for outcome, n in (("disaggregated", 5), ("decode_only", 1), ("no_prefill_pod", 1)):
        assert samples[("infergate_epp_pd_decisions_total", (("outcome", outcome),))] == n
    picks = ("infergate_epp_pd_endpoint_picks_total", (("endpoint", first[0]), ("role", "prefill")))
    assert samples[picks] == 4  # step 1 and the three of step 3

    page = picker(stack, "/debug/pd").json()
    assert page["decisions_total"] == {"disaggregated": 5, "decode_only": 1, "no_prefill_pod": 1}
    newest = page["recent"][0]
    assert (newest["decode"], newest["outcome"], newest["prefill"]) == (
        at["d3"],
        "no_prefill_pod",
        [],
    )
    assert newest["group"] == {"label": "example.com/pair", "value": "g3"}
    assert page["recent"][1]["prefill"] == [at["x2"]]
