"""The cluster path joined to the gateway recipe: a request through real Envoy reaches the pod
the real picker chose, with everything configured from what the install and the controllers
wrote into the API emulator (tests/cluster_path.py).

1. Install and a Model with a LoRA adapter and two replicas, reconciled by the real
   controllers' process (as tests/e2e/test_cluster_path.py does).
2. Envoy configured as the recipe renders it (tests/envoy_gateway_recipe.py: Envoy Gateway and
   Envoy AI Gateway's xDS for the Gateway and the Model's HTTPRoute), with the EnvoyPatchPolicies
   read back from the emulator applied: the install's `infergate-picker-filter` and the
   controllers' `llama-epp` (its picker cluster verifies the CA of the Secret they made).
3. The body-based router (`python -m infergw.bbr`) and the picker (`python -m infergw.epp`),
   both `--provider kubernetes` against the emulator, run as their installed Deployments
   would (args, ServiceAccount); only ports, TLS files and the pod IP differ. The router's
   certificate is one for the install's Certificate's names (no cert-manager here).

Differences from a cluster, in the test's rendering: the Services' DNS names dial 127.0.0.1 on
the processes' ports (`map_addresses`; SNI and the verified SANs stay the Services'), the
listener is plain HTTP, and the pods are simulators at 127.77.15.x:8000.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import requests

from infergw.api.names import SERVED_HEADER
from infergw.controllers.picker_patch import picker_host
from infergw.stack.local import envoy_binary
from tests import envoy_gateway_recipe as recipe
from tests.cluster_path import (
    ENGINE_PORT,
    PICKER,
    ROUTER,
    Cluster,
    ServerPorts,
    bindable,
    engine_kv_flags,
    engine_lora_flags,
    installed,
    kv_events_applied,
    long_prompt,
    picker_cmd,
    router_cmd,
    router_hosts,
)
from tests.conftest import free_port, running, simulator_cmd
from tests.picker_cluster import NS, SERVED, model_obj
from tests.picker_fixtures import FAST_SIMULATOR
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

TOPICS = ("rivers", "mountains")  # a prompt each, no prefix shared
POD_NET = "127.77.15"  # the pods' addresses: a loopback range no other test uses
ADAPTER = "llama-sql"  # the Model's LoRA adapter
POLICY_API = "gateway.envoyproxy.io/v1alpha1"
SUCCESSES = "vllm:request_success_total"
READY_PODS = 'inference_pool_ready_pods{name="llama"}'


def policy(cluster: Cluster, name: str) -> dict:
    found = cluster.get(POLICY_API, "EnvoyPatchPolicy", name)
    assert found is not None, f"no EnvoyPatchPolicy {name} in the emulator"
    return found


def envoy_config(cluster: Cluster, listen: int, admin: int, ports: dict[str, int], ca: bytes):
    """The recipe's rendering with the policies the emulator holds; `ports`: where the
    Services' DNS names dial on this machine."""
    gw = recipe.Gateway(NS)
    [router_host, *_] = router_hosts()
    router = recipe.router_cluster(gw, router_host, 0, ca.decode(), router_host, san_type="DNS")
    config = recipe.base(gw, ["llama"], listen, admin, router)
    recipe.apply_policy(config, policy(cluster, recipe.PICKER_FILTER_POLICY))
    recipe.apply_policy(config, policy(cluster, "llama-epp"))
    recipe.ai_gateway_post_translate(config, gw, ["llama"])
    recipe.map_addresses(config, ports)
    return config


def chat(model: str, prompt: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}


def successes(address: str) -> float:
    """Requests the simulator at `address` answered (its vLLM metrics)."""
    text = requests.get(f"http://{address}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(SUCCESSES))  # fmt: skip


def ready_members(metrics_port: int) -> float | None:
    """The pool's Ready pods as the picker counts them (its metrics), or None before it has."""
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(READY_PODS):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = model_obj(
        backend={"aggregated": {"replicas": 2}},
        loraAdapters=[{"name": ADAPTER, "artifactURL": "hf://acme/llama-3-8b-sql-lora"}],
    )
    with installed(tmp_path_factory.mktemp("cluster-gateway"), model) as c:
        wait_for(lambda: len(c.pods()) == 2, "the Model's two pods", alive=(c.controllers,))
        yield c


class Gateway:
    """Envoy's listener, and the pods behind it by address."""

    def __init__(self, port: int, pods: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.pods = pods  # pod name → ip:port

    def chat(self, model: str, prompt: str = "hi") -> requests.Response:
        return requests.post(
            self.url + "/v1/chat/completions", json=chat(model, prompt), timeout=60
        )

    def answered_by(self, model: str, prompt: str = "hi") -> str:
        """The pool pod that answered `prompt` to `model` through Envoy: the one the picker
        named, and the only simulator whose count of answers grew."""
        before = {at: successes(at) for at in self.pods.values()}
        r = self.chat(model, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        grew = {at for at in self.pods.values() if successes(at) > before[at]}
        assert grew == {r.headers[SERVED_HEADER]}, (grew, r.headers.get(SERVED_HEADER))
        return r.headers[SERVED_HEADER]


def test_requests_through_envoy_reach_the_pods_the_picker_chose(cluster: Cluster) -> None:
    pods = sorted(cluster.pods(), key=lambda p: p["metadata"]["name"])
    ips = [f"{POD_NET}.{n}" for n in range(1, len(pods) + 1)]
    if not all(bindable(ip, ENGINE_PORT) for ip in ips):
        pytest.skip(f"{ENGINE_PORT} is taken on an address of {POD_NET}.x")
    at = {p["metadata"]["name"]: f"{ip}:{ENGINE_PORT}" for p, ip in zip(pods, ips, strict=True)}
    with ExitStack() as started:
        # the pods' engines as the controllers rendered them: KV events, the LoRA adapter
        for pod, ip in zip(pods, ips, strict=True):
            cmd = simulator_cmd(ENGINE_PORT, *FAST_SIMULATOR, "--host", ip,
                                "--served-model-name", SERVED,
                                *engine_kv_flags(pod, ip),
                                *engine_lora_flags(cluster, pod))  # fmt: skip
            started.enter_context(running(cmd, ready_url=f"http://{ip}:{ENGINE_PORT}/health"))
            cluster.run_pod(pod, ip)

        picker = ServerPorts()
        picking = started.enter_context(running(
            picker_cmd(cluster, picker),
            ready_url=f"http://127.0.0.1:{picker.metrics}/healthz",
            env=cluster.kubeconfig_env(PICKER),
        ))  # fmt: skip
        router = ServerPorts()
        cmd, router_ca = router_cmd(cluster, router)
        started.enter_context(running(
            cmd, ready_url=f"http://127.0.0.1:{router.metrics}/healthz",
            env=cluster.kubeconfig_env(ROUTER),
        ))  # fmt: skip

        listen, admin = free_port(), free_port()
        to_local = {host: router.grpc for host in router_hosts()}
        epp = picker_host(NS, PICKER.name)
        to_local |= {epp: picker.grpc, f"{epp}.cluster.local": picker.grpc}
        path = recipe.write(envoy_config(cluster, listen, admin, to_local, router_ca),
                            cluster.tmp / "envoy.yaml")  # fmt: skip
        started.enter_context(running(
            [envoy_binary(), "-c", str(path), "--log-level", "warn", "--base-id", str(admin)],
            ready_url=f"http://127.0.0.1:{admin}/ready",
        ))  # fmt: skip
        wait_for(lambda: ready_members(picker.metrics) == len(at),
                 "the picker to count both pods", alive=(picking,))  # fmt: skip
        gateway = Gateway(listen, at)

        # the picker decides: a prompt a pod has served (its KV events reached the picker's
        # index) goes back to that pod through Envoy, for each pod
        prompts = {}
        for topic, pod in zip(TOPICS, at.values(), strict=True):
            prompts[pod] = long_prompt(topic)
            before = kv_events_applied(picker.metrics)
            direct = requests.post(f"http://{pod}/v1/chat/completions",
                                   json=chat(SERVED, prompts[pod]), timeout=60)  # fmt: skip
            assert direct.status_code == 200, direct.text
            wait_for(lambda b=before: kv_events_applied(picker.metrics) > b,
                     f"the {topic} prompt's KV events", alive=(picking,))  # fmt: skip
        for pod, prompt in prompts.items():
            assert gateway.answered_by(SERVED, prompt) == pod
        # the adapter's name: the router finds its pool, a pod of it answers
        assert gateway.answered_by(ADAPTER) in at.values()

        # a name no Model serves: the router's 404, no pod asked
        before = {a: successes(a) for a in at.values()}
        r = gateway.chat("gpt-9")
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
        assert {a: successes(a) for a in at.values()} == before

        # a pod deleted (its engine still answering): never reached again through Envoy
        gone, kept = pods[1]["metadata"]["name"], at[pods[0]["metadata"]["name"]]
        cluster.api.delete("v1", "Pod", gone, NS)
        wait_for(lambda: ready_members(picker.metrics) == len(at) - 1,
                 "the picker to drop the deleted pod", alive=(picking,))  # fmt: skip
        # even the prompt it served before, whose blocks the picker saw on it
        asked = [(SERVED, prompts[at[gone]])] * 3 + [(SERVED, "hi")] * 5 + [(ADAPTER, "hi")] * 2
        assert {gateway.answered_by(*a) for a in asked} == {kept}

    # both ran as their ServiceAccounts, watching what their Roles let them read
    assert ROUTER.name not in cluster.api.denied and PICKER.name not in cluster.api.denied
    watched = {(g, r) for g, r, v, _ in cluster.api.allowed[ROUTER.name] if v == "watch"}
    assert watched >= {("inference.networking.k8s.io", "inferencepools"),
                       ("workload.infergate.io", "models")}  # fmt: skip
