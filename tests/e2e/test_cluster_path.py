"""The cluster path end to end, through the API emulator (tests/kubeapi.py) over real HTTP.

1. Install: `infergate install --namespace team-a`'s whole stream and the upstream CRDs,
   created as `kubectl apply` would (strict field validation, our CRDs from the stream itself).
   The kinds of other projects the emulator has no CRD for are skipped, each with its reason.
2. A multi-node Model (hf:// source, `workerReplicas: 1`), reconciled by the real
   `python -m infergw.controllers` process as the installed Deployment runs it (its args, its
   ServiceAccount's token, authorized by the RBAC the stream installed): the objects a cluster
   would run are checked against their consumers, and Reachable follows the route's, the
   EnvoyPatchPolicies' and the picker Deployment's status as the Gateway controller (Envoy
   Gateway) and the kubelet would set them.
3. The picker process itself (`python -m infergw.epp`), with the rendered Deployment's args,
   authorized by the Role the controllers made; only what must differ on a laptop is replaced
   (ports, the TLS and config files written from the Secret and ConfigMap, the tokenizer
   directory, the pod IP). Pods come and go, served by simulators on 127.77.14.x:8000, and the
   picker, asked through ext_proc, picks only the current Ready pool members, never the worker,
   and sends a prompt back to the pod that served it (the pods' KV events, configured as the
   controllers rendered their engines, reach the picker's per-pod subscription).

No Envoy runs here: tests/e2e/test_cluster_gateway.py runs this path through Envoy configured
as the gateway recipe renders it.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infergw.api.names import (
    DESTINATION_HEADER,
    ENTRY_LABEL,
    MODEL_LABEL,
    PICKER_FILTER_POLICY,
)
from infergw.cluster.store import labels_match
from infergw.controllers.picker_objects import TOKENIZER_DIR
from infergw.epp.options import parse_options
from infergw.epp.scheduling.config import load_config, needs_kv_cache, read_config
from infergw.epp.scheduling.handle import Handle
from infergw.fetch.tokenizer import build_parser as fetch_parser
from infergw.kvindex.cache import KVCache
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from tests import extproc_client as ec
from tests.cluster_path import (
    CONTROLLERS,
    ENGINE_PORT,
    GATEWAY_API,
    PICKER,
    POOL_API,
    WORKLOAD,
    Cluster,
    ServerPorts,
    bindable,
    engine_kv_flags,
    installed,
    kv_events_applied,
    long_prompt,
    picker_cmd,
    picker_container,
    picker_files,
)
from tests.conftest import running, simulator_cmd
from tests.controller_manifests import expand as expand_rules
from tests.kube_rbac import stored_rbac
from tests.paths import DEFAULT_MODEL
from tests.picker_cluster import NS, SERVED, container_env, expand, model_obj
from tests.picker_fixtures import FAST_SIMULATOR
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

POD_NET = "127.77.14"  # the pods' addresses: a loopback range no other test uses
TOPICS = ("rivers", "mountains", "deserts", "glaciers")  # a prompt each, no prefix shared
# Kinds in the install the emulator serves no CRD for, and why that is acceptable here.
SKIPPED_KINDS = {
    ("cert-manager.io", "Issuer"): "cert-manager's; no cert-manager runs here",
    ("cert-manager.io", "Certificate"): "cert-manager's; no cert-manager runs here",
    ("gateway.networking.k8s.io", "GatewayClass"): "the Gateway controller's input",
    ("gateway.networking.k8s.io", "Gateway"): "the Gateway controller's input",
    ("gateway.networking.k8s.io", "BackendTLSPolicy"): "the Gateway controller's input",
    ("gateway.envoyproxy.io", "ClientTrafficPolicy"): "Envoy Gateway's input",
    ("gateway.envoyproxy.io", "EnvoyExtensionPolicy"): "Envoy Gateway's input",
    ("gateway.envoyproxy.io", "HTTPRouteFilter"): "Envoy Gateway's input",
}


def pod_ip(n: int) -> str:
    return f"{POD_NET}.{n}"


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def route_status(generation: int) -> dict:
    """What Envoy Gateway reports for a route it accepted with every backend resolved."""
    ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "inference-gateway",
           "namespace": NS}  # fmt: skip
    return {
        "parents": [
            {
                "parentRef": ref,
                "controllerName": "gateway.envoyproxy.io/gatewayclass-controller",
                "conditions": [
                    {"type": t, "status": "True", "reason": t, "message": "",
                     "observedGeneration": generation,
                     "lastTransitionTime": "2030-01-01T00:00:00Z"}
                    for t in ("Accepted", "ResolvedRefs")
                ],
            }
        ]
    }  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = model_obj(backend={"aggregated": {"replicas": 1, "workerReplicas": 1}})
    with installed(tmp_path_factory.mktemp("cluster"), model) as c:
        yield c


# ---- 1. the install -----------------------------------------------------------------------------


def test_the_install_applies_and_only_other_projects_kinds_are_skipped(cluster: Cluster) -> None:
    assert {(g, k) for g, k, _ in cluster.skipped} == set(SKIPPED_KINDS)
    for plural_group in (
        "models.workload.infergate.io",
        "inferencepools.inference.networking.k8s.io",
    ):
        crd = cluster.api.get(
            "apiextensions.k8s.io/v1", "CustomResourceDefinition", plural_group, ""
        )
        assert crd is not None, plural_group


# ---- 2. what the controllers made ---------------------------------------------------------------


def test_the_pickers_objects_fit_what_consumes_them(cluster: Cluster) -> None:
    dep = cluster.get("apps/v1", "Deployment", "llama-epp")
    pod_spec = dep["spec"]["template"]["spec"]
    c = picker_container(dep)
    args = [expand(a, container_env(c, "10.0.0.7")) for a in c["args"]]
    # the Secret's, the ConfigMap's and the tokenizer's files where its volumes put them
    for mounted, local in picker_files(cluster, c).items():
        args = [a.replace(mounted, str(local)) for a in args]
    opts = parse_options(args)
    assert opts.response_id_key is not None  # every replica's, from the Secret
    assert (opts.pool_name, opts.pool_namespace, opts.provider) == ("llama", NS, "kubernetes")
    assert opts.tokenizers == {SERVED: DEFAULT_MODEL}
    assert pod_spec["serviceAccountName"] == PICKER.name

    # its ConfigMap, where --config reads it, loads: the precise scorer with the tokenizer
    [config_volume] = [v for v in pod_spec["volumes"] if "configMap" in v]
    cm = cluster.get("v1", "ConfigMap", config_volume["configMap"]["name"])
    text = cm["data"][opts.config_file.name]
    assert needs_kv_cache(read_config(text))
    kv_cache = KVCache(tokenizers=PromptTokenizers(opts.tokenizers), index=KVBlockIndex())
    assert "precise-prefix-cache-scorer" in load_config(text, Handle(kv_cache=kv_cache)).plugins

    # the init container fetches the tokenizer of the Model's own source
    [init] = pod_spec["initContainers"]
    assert init["command"] == ["infergate", "fetch", "tokenizer"]
    fetch = fetch_parser().parse_args(init["args"])
    assert fetch.source == model_obj()["spec"]["modelURI"]
    assert str(fetch.dest) == TOKENIZER_DIR

    # HTTPRoute → InferencePool → picker Service → the Deployment's pods
    route = cluster.get(GATEWAY_API, "HTTPRoute", "llama")
    [rule] = route["spec"]["rules"]
    [backend] = rule["backendRefs"]
    assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    pool = cluster.get(POOL_API, "InferencePool", backend["name"])
    ref = pool["spec"]["endpointPickerRef"]
    svc = cluster.get("v1", "Service", ref["name"])
    [port] = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert not labels_match(
        {"metadata": {"labels": labels}}, pool["spec"]["selector"]["matchLabels"]
    )

    # the Model's pods: the entry is a pool member, the worker is not
    selector = pool["spec"]["selector"]["matchLabels"]
    entries = [p for p in cluster.pods() if p["metadata"]["labels"].get(ENTRY_LABEL) == "true"]
    workers = [p for p in cluster.pods() if p["metadata"]["labels"].get(ENTRY_LABEL) == "false"]
    assert len(entries) == len(workers) == 1
    assert labels_match(entries[0], selector)
    assert not labels_match(workers[0], selector)
    assert MODEL_LABEL not in workers[0]["metadata"]["labels"]

    # kube-apiserver lets the controllers create the picker's Role only if they hold every
    # permission it grants (RBAC's escalation check, which the emulator does not make)
    controllers = stored_rbac(cluster.api, CONTROLLERS)()
    role = cluster.get("rbac.authorization.k8s.io/v1", "Role", PICKER.name)
    for group, resource, verb in expand_rules(role["rules"]):
        assert controllers.allows(group, resource, verb, NS), (group, resource, verb)


def test_reachable_once_the_gateway_accepts_the_route_and_the_picker_is_available(
    cluster: Cluster,
) -> None:
    def reachable() -> dict:
        return conditions(cluster.get(WORKLOAD, "Model", "llama")).get("Reachable") or {}

    wait_for(lambda: reachable().get("status") == "False", "Reachable False",
             alive=(cluster.controllers,), within=30)  # fmt: skip
    assert reachable()["reason"] == "RouteNotSeen"
    generation = cluster.get(GATEWAY_API, "HTTPRoute", "llama")["metadata"]["generation"]
    cluster.set_status(GATEWAY_API, "HTTPRoute", "llama", route_status(generation))
    # the install's picker filter and the Model's patch, both waiting for Envoy Gateway
    wait_for(lambda: reachable().get("reason") == "PatchNotSeen", "PatchNotSeen",
             alive=(cluster.controllers,), within=30)  # fmt: skip
    assert PICKER_FILTER_POLICY in reachable()["message"]
    assert "EnvoyPatchPolicy llama-epp" in reachable()["message"]
    cluster.patches_applied(PICKER_FILTER_POLICY, "llama-epp")
    wait_for(lambda: reachable().get("reason") == "PickerUnavailable", "PickerUnavailable",
             alive=(cluster.controllers,), within=30)  # fmt: skip
    available = {"readyReplicas": 2, "conditions": [
        {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}  # fmt: skip
    cluster.set_status("apps/v1", "Deployment", "llama-epp", available)
    wait_for(lambda: reachable().get("status") == "True", "Reachable True",
             alive=(cluster.controllers,), within=30)  # fmt: skip


# ---- 3. the picker process, while pods come and go ----------------------------------------------


def probe_answers(container: dict, health_port: int) -> dict[str, str]:
    """What the kubelet's gRPC probes of the container hear from a picker (on our port)."""
    out = {}
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for probe in ("readinessProbe", "livenessProbe"):
            service = container[probe]["grpc"]["service"]
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            out[probe] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return out


def chat(prompt: str) -> dict:
    return {"model": SERVED, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}


class Picker:
    """Asks the picker process as Envoy does, over TLS verified with the Secret's CA."""

    def __init__(self, cluster: Cluster, grpc_port: int) -> None:
        ca = (cluster.tmp / "picker" / "tls" / "ca.crt").read_bytes()
        self.target = f"127.0.0.1:{grpc_port}"
        self.credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        self.options = (("grpc.ssl_target_name_override", f"llama-epp.{NS}.svc"),)

    async def pick(self, subset: list[str] | None = None, prompt: str = "hi") -> str | None:
        """The endpoint picked for a chat completion (restricted to `subset`), or None."""
        out = await ec.exchange(
            self.target,
            [ec.headers("/v1/chat/completions", subset=subset), ec.body(chat(prompt))],
            credentials=self.credentials,
            options=self.options,
        )
        return ec.set_headers(out[0]).get(DESTINATION_HEADER) if out else None

    async def picks(self, n: int, prompt: str = "hi") -> set[str | None]:
        return {await self.pick(prompt=prompt) for _ in range(n)}


async def eventually(check, what: str, proc, within: float = 15.0) -> None:
    """Await `check()` until truthy (a watch event takes a moment to reach the picker)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert proc.poll() is None, f"the picker exited while waiting for {what}"
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_the_picker_process_picks_only_current_ready_pool_members(cluster: Cluster) -> None:
    ips = [pod_ip(n) for n in (1, 2, 3)]
    if not all(bindable(ip, ENGINE_PORT) for ip in ips):
        pytest.skip(f"{ENGINE_PORT} is taken on an address of {POD_NET}.x")
    [entry] = [p for p in cluster.pods() if p["metadata"]["labels"].get(ENTRY_LABEL) == "true"]
    [worker] = [p for p in cluster.pods() if p["metadata"]["labels"].get(ENTRY_LABEL) == "false"]
    extra = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "llama-extra", "namespace": NS,
                     "labels": dict(entry["metadata"]["labels"])},
        "spec": entry["spec"],
    }  # fmt: skip
    at = {ip: f"{ip}:{ENGINE_PORT}" for ip in ips}
    entry_at, worker_at, extra_at = at.values()
    with ExitStack() as started:
        # every pod is served, so a wrong pick would be answered too; the pool's members
        # publish KV events as the controllers configured their engines
        for ip, pod in zip(ips, (entry, worker, extra), strict=True):
            kv = [] if pod is worker else engine_kv_flags(pod, ip)
            cmd = simulator_cmd(ENGINE_PORT, *FAST_SIMULATOR, "--host", ip,
                                "--served-model-name", SERVED, *kv)  # fmt: skip
            started.enter_context(running(cmd, ready_url=f"http://{ip}:{ENGINE_PORT}/health"))
        cluster.run_pod(entry, ips[0])
        cluster.run_pod(worker, ips[1])
        ports = ServerPorts()
        cmd = picker_cmd(cluster, ports)
        proc = started.enter_context(
            running(
                cmd,
                ready_url=f"http://127.0.0.1:{ports.metrics}/healthz",
                env=cluster.kubeconfig_env(PICKER),
            )
        )
        picker = Picker(cluster, ports.grpc)
        container = picker_container(cluster.get("apps/v1", "Deployment", "llama-epp"))
        assert probe_answers(container, ports.health) == dict.fromkeys(
            ("readinessProbe", "livenessProbe"), "SERVING"
        )

        # the Model's entry pod only; the worker is never a candidate, even when asked for
        await eventually(lambda: _equals(picker.picks(5), {entry_at}), "the entry pod", proc)
        assert await picker.pick(subset=[worker_at]) is None

        # a pod joins the pool: picked
        cluster.run_pod(extra, ips[2])
        await eventually(lambda: _equals(picker.pick([extra_at]), extra_at), "the new pod", proc)
        assert await picker.picks(10) <= {entry_at, extra_at}

        # precise prefix routing: a prompt a pod has served goes back to it, decided at the
        # first ask (its KV events, on the port and topic its engine was given, reached the
        # picker's subscription); twice each way, so a lucky tie-break would not pass
        for served_by, topic in zip([extra_at, entry_at] * 2, TOPICS, strict=True):
            prompt = long_prompt(topic)
            before = kv_events_applied(ports.metrics)
            answer = requests.post(f"http://{served_by}/v1/chat/completions",
                                   json=chat(prompt), timeout=30)  # fmt: skip
            assert answer.status_code == 200, answer.text
            wait_for(lambda b=before: kv_events_applied(ports.metrics) > b,
                     f"the {topic} prompt's KV events", alive=(proc,))  # fmt: skip
            assert await picker.pick(prompt=prompt) == served_by, topic

        # not ready: never picked again; ready again, then deleted: never picked again
        cluster.run_pod(extra, ips[2], ready=False)
        await eventually(lambda: _equals(picker.pick([extra_at]), None), "NotReady", proc)
        assert await picker.picks(10) == {entry_at}
        cluster.run_pod(extra, ips[2])
        await eventually(lambda: _equals(picker.pick([extra_at]), extra_at), "Ready", proc)
        cluster.api.delete("v1", "Pod", "llama-extra", NS)
        await eventually(lambda: _equals(picker.pick([extra_at]), None), "deleted", proc)
        assert await picker.picks(10) == {entry_at}

    # the Role the controllers made covers every call the picker made, and it made them
    assert PICKER.name not in cluster.api.denied
    calls = cluster.api.allowed[PICKER.name]
    assert {(g, r) for g, r, v, ns in calls if v == "watch"} >= {
        ("", "pods"), ("inference.networking.k8s.io", "inferencepools")
    }  # fmt: skip
    assert {ns for *_, ns in calls} == {NS}


async def _equals(got, want) -> bool:
    return await got == want
