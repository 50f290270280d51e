"""`infergate up --pod-addresses one` (what macOS gets without loopback aliases), end to end
with real Envoy, pickers and simulator pods: every pod on 127.0.0.1 with ports of its own,
which the picker, Envoy's EDS, the KV-event subscriptions and the P/D sidecar all follow."""

from __future__ import annotations

import uuid

import pytest
import requests
import yaml

from infergw.api.pod_ports import ONE, HostPorts
from infergw.cluster.pool import HOST_PORTS_ANNOTATION
from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from infergw.stack.resources import EXAMPLES
from tests.e2e.manifest_stack import ask, indexed_on_it_alone, wait, write_example
from tests.e2e.scale_to_zero import cold_request, wait_for_zero, zero_stack

pytestmark = pytest.mark.slow
SERVED = "x-gateway-destination-endpoint-served"


def pool_pods(stack: LocalStack) -> dict[str, dict]:
    """The pool file's pods by name."""
    docs = yaml.safe_load_all(stack.pool_path.read_text())
    return {d["metadata"]["name"]: d for d in docs if d and d["kind"] == "Pod"}


def serving_ports(stack: LocalStack) -> dict[str, int]:
    """Each pod's serving port (8000 in its manifest) as its annotation moved it."""
    out = {}
    for name, pod in pool_pods(stack).items():
        assert pod["status"]["podIP"] == "127.0.0.1", pod["status"]
        moved = HostPorts.parse(pod["metadata"]["annotations"][HOST_PORTS_ANNOTATION])
        out[name] = moved.of(8000)
    return out


def test_quickstart_pods_share_one_address_and_every_picker_hears_each(tmp_path):
    """Two pods, two pickers (per-pod KV events: each picker connects to every pod's own PUB
    port): Envoy reaches each pod at its port, and a prompt served once is indexed by both
    pickers on that pod alone, so it goes back there and hits its cache."""
    ports = free_stack_ports(pods=1, pickers=2)
    example = write_example(tmp_path / "example", replicas=2)
    cfg = StackConfig.from_example(example, tmp_path / "run", ports, pickers=2, pod_addresses=ONE)
    with LocalStack(cfg) as stack:
        pods = stack.pod_addresses
        moved = serving_ports(stack)
        assert sorted(pods) == sorted(f"127.0.0.1:{p}" for p in moved.values())
        assert len(set(moved.values())) == 2 and 8000 not in moved.values()
        assert all(set(stack.picker_endpoints(i)) == set(pods) for i in (0, 1))
        for pod in pods:  # Envoy's EDS file names each pod at its own port
            assert ask(stack, "hello", pin=pod).headers[SERVED] == pod

        prompt = f"Chapter {uuid.uuid4().hex}: " + " ".join(f"word{i}" for i in range(300))
        served = ask(stack, prompt).headers[SERVED]
        indexed_on_it_alone(stack, prompt, served, pickers=2)
        again = ask(stack, prompt)
        assert again.headers[SERVED] == served
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        log = (stack.cfg.workdir / "controllers.log").read_text()
        assert "standalone pods: one: every pod on 127.0.0.1" in log


def test_pd_example_runs_its_two_legs_on_one_address(tmp_path):
    """examples/pd: each decode pod's sidecar and engine, and each prefill pod, on 127.0.0.1
    at ports of their own; a long new prompt goes to a decode pod whose sidecar runs the
    prefill leg on its group's prefill pod (found in the pool file at its moved port) and
    pulls the KV from it."""
    ports = free_stack_ports(pods=1)
    example = Example.read(EXAMPLES / "pd")
    cfg = StackConfig.from_example(example, tmp_path / "run", ports, pod_addresses=ONE)
    with LocalStack(cfg) as stack:
        wait(lambda: len(stack.picker_endpoints()) == 4, "4 pods behind the picker", 30)
        moved = serving_ports(stack)
        assert len(set(moved.values())) == 4
        roles = {
            name: pod["metadata"]["labels"]["infergate.io/role"]
            for name, pod in pool_pods(stack).items()
        }
        decodes = {f"127.0.0.1:{moved[n]}" for n, role in roles.items() if role == "decode"}
        prefills = {f"127.0.0.1:{moved[n]}" for n, role in roles.items() if role == "prefill"}
        prompt = f"Request {uuid.uuid4().hex}: " + " ".join(f"ba{i}" for i in range(300))
        rid = str(uuid.uuid4())
        r = requests.post(
            stack.url + "/v1/completions",
            json={"model": "infergate-sim", "prompt": prompt, "max_tokens": 4},
            headers={"x-request-id": rid},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        # the decode engine pulled all but the last prompt token from the prefill pod
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        assert r.headers[SERVED] in decodes
        url = f"http://127.0.0.1:{ports.picker_metrics}/debug/pd"
        recent = requests.get(url, timeout=5).json()["recent"]
        (decision,) = [d for d in recent if d["request_id"] == rid]
        assert decision["outcome"] == "disaggregated"
        assert set(decision["prefill"]) <= prefills


def test_a_model_at_zero_starts_a_pod_on_one_address_for_its_first_request(tmp_path):
    """Scale from zero: the autoscaler reads the pickers' held requests and starts a pod,
    which the pickers and Envoy find at its moved port; the held request is served."""
    with zero_stack(tmp_path, pod_addresses=ONE) as stack:
        wait_for_zero(stack)
        status, _, _, text, headers = cold_request(stack, 0)
        assert status == 200, text
        assert "[DONE]" in text
        (moved,) = serving_ports(stack).values()
        assert headers[SERVED] == f"127.0.0.1:{moved}" and moved != 8000
