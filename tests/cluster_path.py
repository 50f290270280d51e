"""The cluster path through the API emulator, for the end-to-end tests that share it
(tests/e2e/test_cluster_path.py, tests/e2e/test_cluster_gateway.py): the install applied as
`kubectl apply` would, the real controllers' process running with the installed Deployment's
args and ServiceAccount, and the command lines of the processes a cluster would run (the
picker, the body-based router) with only what must differ on a laptop replaced (ports, the
files their volumes would hold, the pod IP)."""

from __future__ import annotations

import base64
import copy
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from infergw.api.lora_adapters import parse
from infergw.cluster.certs import serving_cert
from infergw.controllers.adapters import ADAPTERS_FILE, ADAPTERS_VOLUME
from infergw.controllers.app import build_parser as controllers_parser
from infergw.controllers.weights import POD_MODELS_DIR
from infergw.stack.install import Target, objects, upstream_crds
from tests.cluster_install import apply
from tests.conftest import free_port, running
from tests.envoy_gateway_status import patch_policy_status
from tests.kube_crd import TEST_CRDS
from tests.kube_rbac import Account, RBACEmulator, stored_rbac
from tests.kubeapi import kubeconfig_env
from tests.paths import DEFAULT_MODEL
from tests.picker_cluster import NS, container_env, expand
from tests.waiting import wait_for

WORKLOAD = "workload.infergate.io/v1alpha1"
POOL_API = "inference.networking.k8s.io/v1"
GATEWAY_API = "gateway.networking.k8s.io/v1"
EG_API = "gateway.envoyproxy.io/v1alpha1"
CONTROLLERS = Account("infergate-controllers", "infergate-system")
PICKER = Account("llama-epp", NS)
ROUTER = Account("infergate-bbr", NS)  # gateway-manifests/bbr/bbr.yaml
TOKENS = {CONTROLLERS: "controllers-token", PICKER: "picker-token", ROUTER: "router-token"}
ENGINE_PORT = 8000  # what the Model's InferencePool targets
KV_EVENTS_APPLIED = 'infergate_kvindex_messages_total{outcome="events"}'


def bindable(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the simulator binds
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def with_values(args: list[str], **values: str) -> list[str]:
    """`--flag=value` args with the named flags' values replaced (flag names with _ for -);
    flags not there are added."""
    flags = {f"--{k.replace('_', '-')}": v for k, v in values.items()}
    out = [a for a in args if a.partition("=")[0] not in flags]
    return out + [f"{f}={v}" for f, v in flags.items()]


class Cluster:
    """The emulator after the install, with the controllers' process running."""

    def __init__(
        self, api: RBACEmulator, controllers: subprocess.Popen, tmp: Path, skipped: list
    ) -> None:
        self.api, self.controllers, self.tmp = api, controllers, tmp
        self.skipped = skipped  # (group, kind, name) of the install's objects not applied

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

    def patches_applied(self, *names: str) -> None:
        """What Envoy Gateway reports once it applied the EnvoyPatchPolicies `names` to the
        Gateway, each for its current generation."""
        for name in names:
            generation = self.get(EG_API, "EnvoyPatchPolicy", name)["metadata"]["generation"]
            self.set_status(EG_API, "EnvoyPatchPolicy", name, patch_policy_status(NS, generation))

    def run_pod(self, pod: dict, ip: str, ready: bool = True) -> None:
        """What the kubelet reports for a running pod at `ip`."""
        pod = copy.deepcopy(pod)
        pod["status"] = {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        self.api.put(pod)

    def kubeconfig_env(self, account: Account) -> dict[str, str]:
        """The environment of a process running as `account`."""
        path = self.tmp / f"{account.name}.kubeconfig"
        return kubeconfig_env(self.api.write_kubeconfig(path, TOKENS[account]))


def install(api: RBACEmulator) -> list[tuple[str, str, str]]:
    """The upstream CRDs (`kubectl create`, where the cluster has none) and the install stream,
    as the README's cluster section says; the objects skipped."""
    upstream = [d for p in upstream_crds() for d in yaml.safe_load_all(p.read_text()) if d]
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    apply(api, [*upstream, namespace])  # the install's header: create the namespace first
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


@contextmanager
def installed(tmp: Path, model: dict) -> Iterator[Cluster]:
    """The emulator with the install applied, the controllers running and `model` reconciled
    into its picker's Deployment, Secret and HTTPRoute; on exit, no call was refused."""
    # other projects' CRDs our objects use (HTTPRoute, EnvoyPatchPolicy, ...); ours come
    # from the install stream
    api = RBACEmulator({}, crds=TEST_CRDS)
    api.tokens = {token: (who, stored_rbac(api, who)) for who, token in TOKENS.items()}
    with api.threaded():
        skipped = install(api)
        env = kubeconfig_env(api.write_kubeconfig(tmp / "controllers.kubeconfig",
                                                  TOKENS[CONTROLLERS]))  # fmt: skip
        with running(controllers_cmd(api), env=env) as proc:
            c = Cluster(api, proc, tmp, skipped)
            apply(api, [model])
            c.wait(WORKLOAD, "Model", model["metadata"]["name"])
            c.wait("apps/v1", "Deployment", "llama-epp")
            c.wait("v1", "Secret", "llama-epp-tls")
            c.wait(GATEWAY_API, "HTTPRoute", "llama")
            yield c
    assert not api.denied, f"RBAC refused {api.denied}"


# ---- the picker ----------------------------------------------------------------------------------


def picker_container(dep: dict) -> dict:
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["infergate", "epp"]
    return c


def picker_files(cluster: Cluster, c: dict) -> dict[str, Path]:
    """The files the picker's volumes would hold, from the objects the controllers made."""
    root = cluster.tmp / "picker"
    tls, config = root / "tls", root / "config"
    tls.mkdir(parents=True, exist_ok=True)
    config.mkdir(exist_ok=True)
    secret = cluster.get("v1", "Secret", "llama-epp-tls")
    for key, value in secret["data"].items():
        (tls / key).write_bytes(base64.b64decode(value))
    cm = cluster.get("v1", "ConfigMap", "llama-epp-config")
    for key, value in cm["data"].items():
        (config / key).write_text(value)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    return {mounts["tls"]: tls, mounts["config"]: config, mounts["tokenizer"]: DEFAULT_MODEL}


@dataclass(frozen=True)
class ServerPorts:
    """An ext_proc server's ports on this machine (the picker's, the router's)."""

    grpc: int = field(default_factory=free_port)
    health: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)

    def values(self) -> dict[str, str]:
        """`with_values` arguments: listen on 127.0.0.1, on these ports."""
        return {
            "host": "127.0.0.1",
            "grpc_port": str(self.grpc),
            "grpc_health_port": str(self.health),
            "metrics_port": str(self.metrics),
        }


def picker_cmd(cluster: Cluster, ports: ServerPorts) -> list[str]:
    """The rendered Deployment's command line with the laptop's ports, files and pod IP."""
    c = picker_container(cluster.get("apps/v1", "Deployment", "llama-epp"))
    args = [expand(a, container_env(c, "127.0.0.1")) for a in c["args"]]
    for mounted, local in picker_files(cluster, c).items():
        args = [a.replace(mounted, str(local)) for a in args]
    args = with_values(args, **ports.values(), replica_sync_bind=f"tcp://127.0.0.1:{free_port()}")
    return [sys.executable, "-m", "infergw.epp", *args]


def long_prompt(topic: str) -> str:
    """Enough tokens for several KV blocks, different from the first word on."""
    return " ".join(f"{topic} paragraph {i} says something about {topic}." for i in range(40))


def kv_events_applied(metrics_port: int) -> float:
    """KV events the picker's index applied (its metrics)."""
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(KV_EVENTS_APPLIED):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- the pods ------------------------------------------------------------------------------------


def engine_args(pod: dict) -> list[str]:
    [engine] = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    return engine["args"]


def engine_kv_flags(pod: dict, ip: str) -> list[str]:
    """The pod's rendered --kv-events-config as its engine would read it at `ip`, binding on
    that address rather than `*` (the pods share this machine; the simulator's bind flag)."""
    [engine] = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    [flag] = [a for a in engine["args"] if a.startswith("--kv-events-config=")]
    flag = expand(flag, container_env(engine, ip)).replace("tcp://*:", f"tcp://{ip}:")
    assert "$(" not in flag, f"unexpanded in {flag}"
    return [flag, "--sim-kv-events-bind"]


def engine_lora_flags(cluster: Cluster, pod: dict) -> list[str]:
    """The adapters the pod's runtime sidecar would load (its Model's adapters ConfigMap,
    controllers/adapters.py) as the simulator's start flags, or none: this path runs the
    engines alone, without their sidecars, and loads at start what they would at run time."""
    if "--enable-lora" not in engine_args(pod):
        return []
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == ADAPTERS_VOLUME]
    configmap = cluster.get("v1", "ConfigMap", volume["configMap"]["name"])
    wanted, _ = parse(configmap["data"][ADAPTERS_FILE], POD_MODELS_DIR)
    modules = [f"{a.name}={a.path}" for a in wanted.values()]
    return ["--enable-lora", "--lora-modules", *modules, "--max-loras", str(len(modules))]


# ---- the body-based router -----------------------------------------------------------------------


def router_container(cluster: Cluster) -> dict:
    dep = cluster.get("apps/v1", "Deployment", ROUTER.name)
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["infergate", "bbr"]
    return c


def router_hosts() -> tuple[str, ...]:
    """The names the install's Certificate for the router covers (cert-manager issues it; none
    runs here), the first the one its BackendTLSPolicy has Envoy verify."""
    docs = list(objects(Target(namespace=NS)))
    [cert] = [d for d in docs if d["kind"] == "Certificate"
              and d["metadata"]["name"] == f"{ROUTER.name}-tls"]  # fmt: skip
    [verified] = [d for d in docs if d["kind"] == "BackendTLSPolicy"
                  and d["metadata"]["name"] == f"{ROUTER.name}-tls"]  # fmt: skip
    hosts = tuple(cert["spec"]["dnsNames"])
    assert hosts[0] == verified["spec"]["validation"]["hostname"], hosts
    return hosts


def router_cmd(cluster: Cluster, ports: ServerPorts) -> tuple[list[str], bytes]:
    """The installed router Deployment's command line with the laptop's ports and a certificate
    for the names the install's Certificate asks for; and that certificate's CA."""
    c = router_container(cluster)
    args = [expand(a, container_env(c, "127.0.0.1")) for a in c["args"]]
    assert "$(" not in " ".join(args), args
    made = serving_cert(router_hosts(), ROUTER.name)
    cert_dir = made.write(cluster.tmp / "router-tls")
    [mount] = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls"]
    args = [a.replace(mount, str(cert_dir)) for a in args]
    args = with_values(args, **ports.values())
    return [sys.executable, "-m", "infergw.bbr", *args], made.ca
