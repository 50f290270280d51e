"""The cluster path end to end, through the API emulator (tests/kubeapi.py) over real HTTP.

1. Install: `infergate install --namespace team-a`'s whole stream and the upstream CRDs,
   created as `kubectl apply` would (strict field validation, our CRDs from the stream itself).
   The kinds of other projects the emulator has no CRD for are skipped, each with its reason.
2. A multi-node Model (hf:// source, `workerReplicas: 1`), reconciled by the real
   `python -m infergw.controllers` process as the installed Deployment runs it (its args, its
   ServiceAccount's token, authorized by the RBAC the stream installed): the objects a cluster
   would run are checked against their consumers, and Reachable follows the route's and the
   picker Deployment's status as the Gateway controller and the kubelet would set them.
3. The picker process itself (`python -m infergw.epp`), with the rendered Deployment's args,
   authorized by the Role the controllers made; only what must differ on a laptop is replaced
   (ports, the TLS and config files written from the Secret and ConfigMap, the tokenizer
   directory, the pod IP). Pods come and go, served by simulators on 127.77.14.x:8000, and the
   picker, asked through ext_proc, picks only the current Ready pool members, never the worker.

No Envoy runs here (tests/e2e/test_gateway.py and the gateway recipe's own tests do that).
"""

from __future__ import annotations

import base64
import copy
import shutil
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import yaml

from infergw.api.names import DESTINATION_HEADER, ENTRY_LABEL, MODEL_LABEL
from infergw.cluster.store import labels_match
from infergw.controllers.app import build_parser as controllers_parser
from infergw.controllers.picker_objects import TOKENIZER_DIR
from infergw.epp.options import parse_options
from infergw.epp.scheduling.config import load_config, needs_kv_cache, read_config
from infergw.epp.scheduling.handle import Handle
from infergw.fetch.tokenizer import build_parser as fetch_parser
from infergw.kvindex.cache import KVCache
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.stack.install import Target, objects, upstream_crds
from tests import extproc_client as ec
from tests.cluster_install import apply
from tests.conftest import free_port, running, simulator_cmd
from tests.kube_crd import TEST_CRDS
from tests.kube_rbac import Account, RBACEmulator, stored_rbac
from tests.paths import DEFAULT_MODEL
from tests.picker_cluster import NS, SERVED, container_env, expand, model_obj
from tests.picker_fixtures import FAST_SIMULATOR
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

WORKLOAD = "workload.infergate.io/v1alpha1"
POOL_API = "inference.networking.k8s.io/v1"
GATEWAY_API = "gateway.networking.k8s.io/v1"
CONTROLLERS = Account("infergate-controllers", "infergate-system")
PICKER = Account("llama-epp", NS)
CONTROLLERS_TOKEN, PICKER_TOKEN = "controllers-token", "picker-token"
POD_NET = "127.77.14"  # the pods' addresses: a loopback range no other test uses
ENGINE_PORT = 8000  # what the Model's InferencePool targets
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


def bindable(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def kubeconfig(path: Path, server: str, token: str) -> Path:
    user = {"name": "sa", "user": {"token": token}}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": server}}],
                "users": [user],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "sa"}}],
                "current-context": "emu",
            }
        )
    )
    return path


def env_for(config: Path) -> dict[str, str]:
    # not in a pod: the in-cluster config must not apply, so the kubeconfig does
    return {"KUBECONFIG": str(config), "KUBERNETES_SERVICE_HOST": "", "PYTHONUNBUFFERED": "1"}


def with_values(args: list[str], **values: str) -> list[str]:
    """`--flag=value` args with the named flags' values replaced (flag names with _ for -);
    flags not there are added."""
    flags = {f"--{k.replace('_', '-')}": v for k, v in values.items()}
    out = [a for a in args if a.partition("=")[0] not in flags]
    return out + [f"{f}={v}" for f, v in flags.items()]


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


class Cluster:
    """The emulator after the install, with the controllers' process running."""

    def __init__(self, api: RBACEmulator, controllers, tmp: Path) -> None:
        self.api, self.controllers, self.tmp = api, controllers, tmp

    def get(self, api_version: str, kind: str, name: str) -> dict:
        return self.api.get(api_version, kind, name, NS)

    def wait(self, api_version: str, kind: str, name: str) -> dict:
        return wait_for(
            lambda: self.get(api_version, kind, name),
            f"{kind} {name}",
            alive=(self.controllers,),
            within=30,
        )

    def pods(self) -> list[dict]:
        return [p for p in self.api.list_objects("v1", "Pod") if p["metadata"]["namespace"] == NS]

    def set_status(self, api_version: str, kind: str, name: str, status: dict) -> None:
        obj = self.get(api_version, kind, name)
        obj["status"] = status
        self.api.put(obj)

    def run_pod(self, pod: dict, ip: str, ready: bool = True) -> None:
        """What the kubelet reports for a running pod at `ip`."""
        pod = copy.deepcopy(pod)
        pod["status"] = {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        self.api.put(pod)


def install(api: RBACEmulator) -> list[tuple[str, str, str]]:
    """The upstream CRDs (`kubectl create`, where the cluster has none) and the install stream,
    as the README's cluster section says; the objects skipped."""
    upstream = [d for p in upstream_crds() for d in yaml.safe_load_all(p.read_text()) if d]
    apply(api, upstream)
    api.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            cluster_scoped=True)  # fmt: skip
    return apply(api, objects(Target(namespace=NS))).skipped


def controllers_cmd(api: RBACEmulator) -> list[str]:
    """The installed controllers Deployment's command line, with the laptop's ports."""
    dep = api.get("apps/v1", "Deployment", "infergate-controllers", CONTROLLERS.namespace)
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["infergate", "controllers"]
    controllers_parser().parse_args(c["args"])
    args = [a for a in c["args"] if not a.startswith("--webhook-cert-dir")]  # a generated one
    args = with_values(
        args, host="127.0.0.1", metrics_port=str(free_port()), webhook_port=str(free_port())
    )
    return [sys.executable, "-m", "infergw.controllers", *args]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    # other projects' CRDs our objects use (HTTPRoute, EnvoyPatchPolicy, ...); ours come
    # from the install stream
    api = RBACEmulator({}, crds=TEST_CRDS)
    api.tokens = {
        CONTROLLERS_TOKEN: (CONTROLLERS, stored_rbac(api, CONTROLLERS)),
        PICKER_TOKEN: (PICKER, stored_rbac(api, PICKER)),
    }
    with api.threaded():
        skipped = install(api)
        config = kubeconfig(tmp / "controllers.kubeconfig", api.url, CONTROLLERS_TOKEN)
        with running(controllers_cmd(api), env=env_for(config)) as proc:
            c = Cluster(api, proc, tmp)
            c.skipped = skipped
            model = model_obj(backend={"aggregated": {"replicas": 1, "workerReplicas": 1}})
            apply(api, [model])
            c.wait(WORKLOAD, "Model", "llama")
            c.wait("apps/v1", "Deployment", "llama-epp")
            c.wait("v1", "Secret", "llama-epp-tls")
            c.wait(GATEWAY_API, "HTTPRoute", "llama")
            yield c
    assert not api.denied, f"RBAC refused {api.denied}"


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


def picker_container(dep: dict) -> dict:
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["infergate", "epp"]
    return c


def test_the_pickers_objects_fit_what_consumes_them(cluster: Cluster) -> None:
    dep = cluster.get("apps/v1", "Deployment", "llama-epp")
    pod_spec = dep["spec"]["template"]["spec"]
    c = picker_container(dep)
    args = [expand(a, container_env(c, "10.0.0.7")) for a in c["args"]]
    opts = parse_options([a.replace(TOKENIZER_DIR, str(DEFAULT_MODEL)) for a in args])
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
    wait_for(lambda: reachable().get("reason") == "PickerUnavailable", "PickerUnavailable",
             alive=(cluster.controllers,), within=30)  # fmt: skip
    available = {"readyReplicas": 2, "conditions": [
        {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}  # fmt: skip
    cluster.set_status("apps/v1", "Deployment", "llama-epp", available)
    wait_for(lambda: reachable().get("status") == "True", "Reachable True",
             alive=(cluster.controllers,), within=30)  # fmt: skip
