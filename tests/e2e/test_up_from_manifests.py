"""The local stack started from a Model manifest, as `infergate up DIR` runs it: the
standalone controllers start the pods, the picker finds them through the pool file and
Envoy through the EDS file; KV events from those pods reach the picker; editing the
manifest adds a pod that Envoy can route to."""

from __future__ import annotations

import time

import pytest
import requests
import yaml

from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from tests.e2e.manifest_stack import ask, indexed_on_it_alone, wait, write_example

pytestmark = pytest.mark.slow


def test_a_model_manifest_becomes_a_served_stack_and_edits_apply(tmp_path):
    ports = free_stack_ports(pods=1)
    example = write_example(tmp_path / "example", replicas=2)
    lines: list[str] = []
    cfg = StackConfig.from_example(example, tmp_path / "run", ports, progress=lines.append)
    assert cfg.pod_timeout == 120  # the simulator starts in seconds
    stack = LocalStack(cfg)
    with stack:
        # a line per pod as it starts, the last one saying it is ready
        last = {line.split(":")[0]: line for line in lines}
        assert len(last) == 2 and all(": ready (" in line for line in last.values()), lines
        pods = stack.pod_addresses
        assert len(pods) == 2 and all(p.endswith(":8000") for p in pods), pods
        assert len({p.split(":")[0] for p in pods}) == 2  # each pod on its own address

        # Every pod is reachable through Envoy: its EDS cluster knows them all.
        for pod in pods:
            served = ask(stack, "hello", pin=pod).headers["x-gateway-destination-endpoint-served"]
            assert served == pod

        # KV events from the controllers' pods reach the picker's index: a long prompt
        # served once goes back to the pod that holds it, and hits its cache.
        prompt = "Chapter 1: " + " ".join(f"word{i}" for i in range(300))
        first = ask(stack, prompt).headers["x-gateway-destination-endpoint-served"]
        time.sleep(0.3)
        again = [ask(stack, prompt) for _ in range(3)]
        assert {r.headers["x-gateway-destination-endpoint-served"] for r in again} == {first}
        cached = again[-1].json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0

        # Editing the manifest scales the Model; the new pod joins the picker and Envoy.
        model = yaml.safe_load((example.directory / "model.yaml").read_text())
        model["spec"]["replicas"] = 3
        (example.directory / "model.yaml").write_text(yaml.safe_dump(model))
        wait(lambda: len(stack.picker_endpoints()) == 3, "a third pod behind the picker")
        (new,) = set(stack.pod_addresses) - set(pods)
        assert ask(stack, "hi", pin=new).headers["x-gateway-destination-endpoint-served"] == new

    # stop() ended the controllers, and with them every pod process.
    for pod in [*pods, new]:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{pod}/health", timeout=2)


def test_an_engine_that_is_not_installed_stops_the_start_with_what_is_missing(tmp_path):
    """A vLLM Model whose engine is not on this machine: no simulator in its place; the
    start fails at once, naming what is missing, and the pod never served."""
    ports = free_stack_ports(pods=1)
    example = write_example(
        tmp_path / "example", replicas=1, type="vLLM", command=["vllm-not-installed", "serve"]
    )
    model = example.model
    model["spec"]["image"] = "vllm/vllm-openai:v0.32.0"
    (example.directory / "model.yaml").write_text(yaml.safe_dump(model))
    example = Example.read(example.directory)
    assert not example.runs_simulator
    cfg = StackConfig.from_example(example, tmp_path / "run", ports)
    assert cfg.pod_timeout >= 600  # a real engine loads its model first
    started = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        LocalStack(cfg).start()
    assert time.monotonic() - started < 60
    message = str(failed.value)
    assert "cannot start" in message and "vllm-not-installed is not installed" in message
    assert "engine.type: Simulator" in message


def test_two_pickers_each_hear_every_pods_kv_events(tmp_path):
    """`infergate up --pickers 2`: the controllers run the pods in per-pod KV mode, each pod
    binding its PUB on its own loopback address, and both pickers connect to every pod: a
    prompt served once shows in both pickers' indexes, on the pod that served it."""
    ports = free_stack_ports(pods=1, pickers=2)
    example = write_example(tmp_path / "example", replicas=2)
    cfg = StackConfig.from_example(example, tmp_path / "run", ports, pickers=2)
    with LocalStack(cfg) as stack:
        pods = stack.pod_addresses
        assert len(pods) == 2
        assert all(set(stack.picker_endpoints(i)) == set(pods) for i in (0, 1))
        prompt = "Chapter 2: " + " ".join(f"word{i}" for i in range(300))
        served = ask(stack, prompt).headers["x-gateway-destination-endpoint-served"]
        indexed_on_it_alone(stack, prompt, served, pickers=2)
        # The controllers rendered per-pod sockets: each pod binds its own address.
        log = (stack.cfg.workdir / "controllers.log").read_text()
        assert "--sim-kv-events-bind" in log


def test_engine_keys_hash_as_the_controllers_pods_do(tmp_path):
    """`infergate up --kv-index-keys engine`: the picker is given the Model's hashing (its
    --block-size here; the simulator's default seed, as the controllers render no --seed), so
    a prompt sent to one pod directly (no speculative entry) is indexed from that pod's KV
    events alone, and through Envoy goes there with the cached tokens the picker predicted."""
    ports = free_stack_ports(pods=1)
    args = ["--sim-time-scale=0.2", "--block-size=32"]
    example = write_example(tmp_path / "example", replicas=2, args=args)
    cfg = StackConfig.from_example(example, tmp_path / "run", ports, kv_index_keys="engine")
    with LocalStack(cfg) as stack:
        holder = stack.pod_addresses[1]
        prompt = "Chapter 3: " + " ".join(f"word{i}" for i in range(300))
        direct = requests.post(
            f"http://{holder}/v1/completions",
            json={"model": "infergate-sim", "prompt": prompt, "max_tokens": 2},
            timeout=60,
        )
        assert direct.status_code == 200, direct.text
        indexed_on_it_alone(stack, prompt, holder, pickers=1)
        url = f"http://127.0.0.1:{stack.picker_ports().metrics}/debug/prefix-scores"
        scores = requests.post(url, json={"model": "infergate-sim", "prompt": prompt}, timeout=30)
        [mine] = [e for e in scores.json()["endpoints"] if e["address"] == holder]
        assert scores.json()["block_size"] == 32 and mine["cached_tokens"] > 0
        r = ask(stack, prompt)
        assert r.headers["x-gateway-destination-endpoint-served"] == holder
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == mine["cached_tokens"]
