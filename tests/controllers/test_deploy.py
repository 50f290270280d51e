"""gateway-manifests/controllers.yaml: what runs the controllers in a cluster.

Checked without a cluster: every document parses and names itself; built-in kinds pass the
Kubernetes 1.30 schemas; the RBAC grants exactly what the controllers call — the calls are
recorded while the real reconcilers (build_controllers, the leader elector) work through a
scenario that exercises every store call in their code, mapped through the Kind registry of
cluster/store.py to (group, resource, verb) as kube-apiserver authorizes them, and
compared with what the bindings give the Deployment's ServiceAccount; the Deployment's args
parse with the controllers' own parser and agree with its ports, probes, volumes, the Lease's
Role and webhook.yaml; the Dockerfile copies every package the project installs.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from aiohttp import web

from infergw import cluster, controllers
from infergw.cluster.picker_pods import picker_pods
from infergw.cluster.store import (
    AUTOSCALING_BINDING,
    EVENT,
    KINDS,
    LEASE,
    MODEL,
    MODEL_INFER,
    POD,
    POD_GROUP,
    SERVICE,
    Conflict,
    Kind,
    NotFound,
    Obj,
    controller_of,
    kind_of,
)
from infergw.controllers.app import build_controllers, build_parser
from infergw.controllers.download_logs import PodLogs
from infergw.controllers.events import EventRecorder
from infergw.controllers.leader import LeaderElector
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.object_status import write_status
from infergw.controllers.picker_demand import PickerDemand
from infergw.controllers.picker_objects import PickerSettings, picker_rules
from infergw.controllers.route_parents import read_route_parents
from infergw.controllers.runner import ControllerMetrics
from infergw.controllers.webhook import build_app, namespace_reader
from tests.conftest import free_port
from tests.controller_manifests import CONTROLLERS_YAML, MANIFESTS, Authorizer, Grant, docs, load
from tests.paths import ROOT

WEBHOOK_YAML = MANIFESTS / "webhook.yaml"
K8S_VERSION = "1.30"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOAD = "workload.infergate.io/v1alpha1"

# What each Store method sends (kube_store.py) and the verb kube-apiserver authorizes it as:
# GET of one object → get, of a collection → list (watch=true → watch), POST → create,
# PUT → update (on ".../status" the status subresource), DELETE of one object → delete.
STORE_CALLS = {
    "get": ("get", None),
    "list": ("list", None),
    "watch": ("watch", None),
    "create": ("create", None),
    "update": ("update", None),
    "update_status": ("update", "status"),
    "delete": ("delete", None),
    "container_log_tail": ("get", "log"),  # GET pods/NAME/log
}


# ---- loading ------------------------------------------------------------------------------------


def one(kind: str, source: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [d for d in (docs() if source is None else source) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def deployment() -> dict[str, Any]:
    return one("Deployment")


def container() -> dict[str, Any]:
    [c] = deployment()["spec"]["template"]["spec"]["containers"]
    return c


def deployment_args():
    c = container()
    assert c["command"][:2] == ["infergate", "controllers"], c["command"]
    return build_parser().parse_args([*c["command"][2:], *c["args"]])


# ---- RBAC as kube-apiserver evaluates it -------------------------------------------------------


def manifest_authorizer() -> Authorizer:
    account = one("ServiceAccount")["metadata"]
    return Authorizer.for_account(docs(), account["name"], account["namespace"])


# ---- what the controllers call: recorded -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    kind: Kind
    method: str  # the Store method
    module: str  # the controllers module that called it


# Where the calls the controllers make come from: their own modules and the informer.
CALLERS = (Path(controllers.__file__).parent, Path(cluster.__file__).parent)


class RecordingStore:
    """A MemoryStore that records every call with the controllers module it came from, and
    the kinds of the owners named by the objects it creates."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.calls: set[Call] = set()
        self.owner_kinds: set[str] = set()

    def _note(self, kind: Kind, method: str) -> None:
        frame = sys._getframe(2)
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if path.parent in CALLERS:
                self.calls.add(Call(kind, method, path.stem))
                return
            frame = frame.f_back
        self.calls.add(Call(kind, method, "?"))

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        self._note(kind, "get")
        return await self.inner.get(kind, namespace, name)

    async def list(self, kind: Kind, namespace=None, labels=None):
        self._note(kind, "list")
        return await self.inner.list(kind, namespace, labels)

    def watch(self, kind: Kind, namespace, resource_version, labels=None):
        self._note(kind, "watch")
        return self.inner.watch(kind, namespace, resource_version, labels)

    async def create(self, obj: Obj) -> Obj:
        self._note(kind_of(obj), "create")
        for ref in obj.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("blockOwnerDeletion"):
                self.owner_kinds.add(ref["kind"])
        return await self.inner.create(obj)

    async def update(self, obj: Obj) -> Obj:
        self._note(kind_of(obj), "update")
        return await self.inner.update(obj)

    async def update_status(self, obj: Obj) -> Obj:
        self._note(kind_of(obj), "update_status")
        return await self.inner.update_status(obj)

    async def delete(self, kind: Kind, namespace: str, name: str) -> None:
        self._note(kind, "delete")
        await self.inner.delete(kind, namespace, name)

    def container_log_tail(self, namespace: str, pod: str, container: str, *limits: int) -> str:
        self._note(POD, "container_log_tail")
        return ""


def model_obj() -> Obj:
    """An autoscaled prefill/decode Model with an inline policy: every kind a Model makes."""
    return {
        "apiVersion": WORKLOAD,
        "kind": "Model",
        "metadata": {"name": "llm", "namespace": "default"},
        "spec": {
            "modelURI": "hf://org/llm",
            "image": "vllm/vllm-openai:v0.11.0",
            "engine": {"type": "vLLM"},  # required by the CRD
            "replicas": 1,
            "backend": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 2,
                "metrics": [{"metricName": "vllm:num_requests_waiting", "targetValue": 1000}],
            },
        },
    }


def modelinfer_obj(name: str, replicas: int, port: int = 8000, **spec) -> Obj:
    pod = {
        "spec": {"containers": [{"name": "e", "image": "x", "ports": [{"containerPort": port}]}]}
    }
    return {
        "apiVersion": WORKLOAD,
        "kind": "ModelInfer",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "template": {"roles": [{"name": "server", "replicas": 1, "entryTemplate": pod}]},
            **spec,
        },
    }


async def kubelet_forever(store: MemoryStore) -> None:
    """Every pod runs and is ready at 127.0.0.1, where the metrics server answers."""
    while True:
        pods, _ = await store.list(POD)
        for p in pods:
            if not (p.get("status") or {}).get("phase"):
                p["status"] = {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [{"name": "e", "restartCount": 0, "ready": True}],
                }
                try:
                    await store.update_status(p)
                except (NotFound, Conflict):  # deleted or changed meanwhile: next round
                    pass
        await asyncio.sleep(0.02)


async def until(check, what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


async def record_a_scenario() -> RecordingStore:
    """The kubernetes-mode parts over a recording store: the three controllers as
    build_controllers wires them, and the leader elector. A Model that autoscales; a
    gang-scheduled ModelInfer scaled from 2 groups to 1 and its role from 1 instance to 2;
    a ModelInfer whose pods report load, so the autoscaler resizes it; a binding whose
    policy is missing."""
    rec = RecordingStore()
    store = rec.inner
    elector = LeaderElector(rec, name="infergate-controllers", namespace="ns", identity="me")
    await elector.acquire()
    await namespace_reader(rec)("default")  # the webhook reads a namespace's opt-in label
    await PodLogs(rec)("default", "llm-0", "weights")  # a download's progress, from its log

    port = free_port()
    app = web.Application()

    async def metrics(_req):
        return web.Response(text='vllm:num_requests_waiting{model_name="m"} 30\n')

    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    # as kubernetes mode builds them: every Model gets its picker and HTTPRoute
    ctrls, scaler = build_controllers(
        rec, ControllerMetrics(), autoscale_interval=0.2, picker=PickerSettings()
    )
    kubelet = asyncio.create_task(kubelet_forever(store))
    try:
        for c in ctrls:
            await c.start()
        await store.create(model_obj())
        await store.create(modelinfer_obj("gang", 2, gangPolicy={"enabled": True}))
        await store.create(modelinfer_obj("busy", 1, port=port))
        policy = {"metrics": [{"metricName": "vllm:num_requests_waiting", "targetValue": 10}]}
        await store.create(
            {
                "apiVersion": WORKLOAD,
                "kind": "AutoScalingPolicy",
                "metadata": {"name": "busy", "namespace": "default"},
                "spec": policy,
            }
        )
        target = {"target": {"kind": "ModelInfer", "name": "busy"}, "maxReplicas": 3}
        for name, ref in (("busy", "busy"), ("orphan", "missing")):
            await store.create(
                {
                    "apiVersion": WORKLOAD,
                    "kind": "AutoScalingPolicyBinding",
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"policyRef": {"name": ref}, "homogeneousTarget": target},
                }
            )

        async def model_ready():
            m = await store.get(MODEL, "default", "llm")
            return (m.get("status") or {}).get("readyReplicas") == 1

        async def gang_ready():
            pgs, _ = await store.list(POD_GROUP, "default")
            mi = await store.get(MODEL_INFER, "default", "gang")
            return len(pgs) == 2 and (mi.get("status") or {}).get("readyReplicas") == 2

        async def busy_scaled():
            mi = await store.get(MODEL_INFER, "default", "busy")
            b = await store.get(AUTOSCALING_BINDING, "default", "busy")
            return mi["spec"]["replicas"] > 1 and (b.get("status") or {}).get("targets")

        await until(model_ready, "the Model's group ready")
        # every object the Model owns drifts (its model label removed), then the Model is
        # edited: the next pass writes each of them back
        model = await store.get(MODEL, "default", "llm")
        owned = []
        for kind in KINDS.values():
            for obj in (await store.list(kind, "default"))[0]:
                ref = controller_of(obj)
                if ref and ref["uid"] == model["metadata"]["uid"]:
                    del obj["metadata"]["labels"]["infergate.io/model"]
                    await store.update(obj)
                    owned.append((kind, obj["metadata"]["name"]))
        # ModelInfer, ModelServer, ModelRoute, InferencePool, the policy and its binding; the
        # picker's ServiceAccount, Role, RoleBinding, ConfigMap, Deployment, two Services and
        # budget; the HTTPRoute; the picker's TLS Secret and EnvoyPatchPolicy
        assert len(owned) == 17, owned
        model["spec"]["image"] = "vllm/vllm-openai:v0.12.0"
        await store.update(model)

        async def edit_propagated():
            for kind, name in owned:
                obj = await store.get(kind, "default", name)
                if "infergate.io/model" not in obj["metadata"]["labels"]:
                    return False
            return True

        await until(edit_propagated, "the Model's objects written back")
        await until(gang_ready, "the gang ModelInfer's groups ready, with PodGroups")
        await until(busy_scaled, "the autoscaler resized ModelInfer busy")

        # one group fewer, and its role scaled in place: the PodGroup left is updated
        mi = await store.get(MODEL_INFER, "default", "gang")
        mi["spec"]["replicas"] = 1
        mi["spec"]["template"]["roles"][0]["replicas"] = 2
        await store.update(mi)

        async def gang_shrunk():
            pods, _ = await store.list(POD, "default", {"infergate.io/modelinfer": "gang"})
            svcs, _ = await store.list(SERVICE, "default", {"infergate.io/modelinfer": "gang"})
            pgs, _ = await store.list(POD_GROUP, "default")
            return (
                len(pods) == 2 and len(svcs) == 2 and [pg["spec"]["minMember"] for pg in pgs] == [2]
            )

        await until(gang_shrunk, "the gang ModelInfer scaled to one group of two instances")

        # a ModelInfer its reconciler cannot read, met twice: an InvalidSpec Event, then the
        # same again as a series (the recorder reads and updates it)
        broken = modelinfer_obj("broken", 1)
        broken["spec"]["replicas"] = "two"
        await store.create(broken)

        async def invalid_events(count: int):
            found, _ = await store.list(EVENT, "default")
            return [e for e in found if e["reason"] == "InvalidSpec"
                    and (e.get("series") or {}).get("count", 1) == count]  # fmt: skip

        await until(lambda: invalid_events(1), "an InvalidSpec Event")
        broken = await store.get(MODEL_INFER, "default", "broken")
        broken["metadata"].setdefault("labels", {})["touched"] = "yes"
        await store.update(broken)
        await until(lambda: invalid_events(2), "the InvalidSpec Event counted twice")
    finally:
        kubelet.cancel()
        (kubelet_end,) = await asyncio.gather(kubelet, return_exceptions=True)
        for c in ctrls:
            await c.stop()
        await scaler.close()
        await elector.release()
        await runner.cleanup()
        if isinstance(kubelet_end, Exception):  # not the CancelledError of a normal end
            raise kubelet_end
    return rec


@pytest.fixture(scope="module")
def recorded() -> RecordingStore:
    return asyncio.run(record_a_scenario())


def kubernetes_mode_modules() -> set[str]:
    """The controllers modules whose store calls kubernetes mode makes."""
    ctrls, _ = build_controllers(MemoryStore(), ControllerMetrics(), picker=PickerSettings())
    mods = {type(c.reconciler).__module__ for c in ctrls}
    mods |= {type(i).__module__ for c in ctrls for i in c.informers}
    mods |= {type(c).__module__ for c in ctrls}  # an unreadable object's Event
    mods.add(LeaderElector.__module__)
    mods.add(namespace_reader.__module__)
    mods.add(PodLogs.__module__)  # the ModelInfer reconciler reads download logs through it
    mods.add(read_route_parents.__module__)  # the Model reconciler reads ModelRoutes through it
    mods.add(PickerDemand.__module__)  # the autoscaler reads the pickers' demand through it
    mods.add(picker_pods.__module__)  # … from the picker pods it finds there
    mods.add(EventRecorder.__module__)  # every controller reports through it
    mods.add(write_status.__module__)  # the status of the kinds only status is written for
    return {m.rpartition(".")[2] for m in mods}


def store_calls_in(module: str) -> set[str]:
    """The Store methods a module's source calls (`self.store.X(...)` or `store.X(...)`)."""
    [source] = [folder / f"{module}.py" for folder in CALLERS if (folder / f"{module}.py").exists()]
    tree = ast.parse(source.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            is_store = (isinstance(owner, ast.Attribute) and owner.attr == "store") or (
                isinstance(owner, ast.Name) and owner.id == "store"
            )
            if is_store and node.func.attr in STORE_CALLS:
                found.add(node.func.attr)
    return found


def needed(rec: RecordingStore) -> tuple[set[Grant], set[Grant]]:
    """(cluster-wide grants, grants in the Lease's namespace) the recorded calls need."""
    cluster, lease = set(), set()
    for call in rec.calls:
        verb, sub = STORE_CALLS[call.method]
        kind = KINDS.get(call.kind.kind, call.kind)  # the registry's entry for it, if any
        resource = f"{kind.plural}/{sub}" if sub else kind.plural
        (lease if kind is LEASE else cluster).add((kind.group, resource, verb))
    for owner in rec.owner_kinds:  # blockOwnerDeletion: update on the owner's finalizers
        kind = KINDS[owner]
        cluster.add((kind.group, f"{kind.plural}/finalizers", "update"))
    # RBAC's escalation check: the controllers may create the pickers' Roles (and bind them)
    # only if they hold every permission those Roles grant.
    for rule in picker_rules():
        cluster |= {(g, r, v) for g in rule.api_groups for r in rule.resources for v in rule.verbs}
    return cluster, lease


# ---- tests: documents ---------------------------------------------------------------------------


def test_every_document_parses_and_names_itself() -> None:
    found = docs()
    assert found, "controllers.yaml holds no document"
    for doc in found:
        assert isinstance(doc, dict)
        assert doc.get("apiVersion") and doc.get("kind"), doc
        meta = doc.get("metadata") or {}
        assert meta.get("name"), f"{doc['kind']} without a name"
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{doc['kind']} {meta['name']} is cluster-scoped"
        else:
            assert meta.get("namespace"), f"{doc['kind']} {meta['name']} has no namespace"
    kinds = sorted(d["kind"] for d in found)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
        ]
    )


@pytest.mark.parametrize("index", range(len(load(CONTROLLERS_YAML))))
def test_document_passes_the_kubernetes_schema(index: int) -> None:
    doc = docs()[index]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}")


def test_namespaces_agree_with_the_webhook() -> None:
    ns = one("Namespace")["metadata"]["name"]
    assert ns == "infergate-system"
    for doc in docs():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == ns, doc["metadata"]
    webhook = load(WEBHOOK_YAML)
    service = one("Service", webhook)
    assert service["metadata"]["namespace"] == ns
    config = one("ValidatingWebhookConfiguration", webhook)
    for hook in config["webhooks"]:
        ref = hook["clientConfig"]["service"]
        assert (ref["namespace"], ref["name"]) == (ns, service["metadata"]["name"])
    # the CA injector's Certificate lives beside the controllers too
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")[0] == ns


def test_service_accounts_match_between_bindings_and_deployment() -> None:
    account = one("ServiceAccount")["metadata"]
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    assert deployment()["metadata"]["namespace"] == account["namespace"]
    subject = {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(kind)
        assert binding["subjects"] == [subject]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": one(role_kind)["metadata"]["name"],
        }
    assert one("RoleBinding")["metadata"]["namespace"] == one("Role")["metadata"]["namespace"]


# ---- tests: RBAC against what the code calls --------------------------------------------------


def test_the_scenario_makes_every_store_call_the_code_has(recorded: RecordingStore) -> None:
    """Otherwise a call added to a reconciler could need a verb no test notices."""
    modules = kubernetes_mode_modules()
    assert modules == {
        "model",
        "modelinfer",
        "autoscaler",
        "informer",
        "leader",
        "webhook",
        "route_parents",
        "picker_demand",
        "picker_pods",
        "networking_status",
        "policy_status",
        "events",
        "runner",
        "object_status",
        "download_logs",
    }
    for module in sorted(modules):
        in_code = store_calls_in(module)
        assert in_code, f"no store calls found in {module}.py"
        seen = {c.method for c in recorded.calls if c.module == module}
        assert in_code <= seen, f"{module}.py calls {in_code - seen} unrecorded"
    assert {c.module for c in recorded.calls} <= modules, recorded.calls


def test_cluster_role_grants_exactly_what_the_controllers_call(recorded: RecordingStore) -> None:
    cluster, _ = needed(recorded)
    auth = manifest_authorizer()
    # the Model controller made every kind a Model expands into; the ModelInfer controller
    # pods, services and PodGroups
    created = {c.kind.kind for c in recorded.calls if c.method == "create"}
    assert created >= {
        "ModelInfer", "ModelServer", "ModelRoute", "InferencePool", "AutoScalingPolicy",
        "AutoScalingPolicyBinding", "Pod", "Service", "PodGroup", "Lease", "ServiceAccount",
        "Role", "RoleBinding", "ConfigMap", "Deployment", "PodDisruptionBudget", "HTTPRoute",
    }  # fmt: skip
    missing = cluster - auth.cluster
    assert not missing, f"the ClusterRole lacks {sorted(missing)}"
    extra = auth.cluster - cluster
    assert not extra, f"the ClusterRole grants {sorted(extra)} that nothing calls"


def test_the_lease_role_is_where_the_deployment_elects_its_leader(
    recorded: RecordingStore,
) -> None:
    _, lease = needed(recorded)
    assert lease == {(LEASE.group, LEASE.plural, v) for v in ("get", "create", "update")}
    args = deployment_args()
    assert args.leader_elect
    auth = manifest_authorizer()
    assert auth.namespaced == {args.leader_namespace: lease}
    assert not {g for g in auth.cluster if g[1] == LEASE.plural}, "leases cluster-wide"


def test_the_authorizer_refuses_what_is_not_granted() -> None:
    """The check above is only as good as this evaluation of the rules."""
    auth = manifest_authorizer()
    assert auth.allows("", "pods", "create", "default")
    assert not auth.allows("", "pods", "update", "default")
    assert not auth.allows("", "secrets", "list", "default")
    assert auth.allows("coordination.k8s.io", "leases", "update", "infergate-system")
    assert not auth.allows("coordination.k8s.io", "leases", "update", "default")
    broken = copy.deepcopy(docs())
    for d in broken:
        if d["kind"] == "ClusterRoleBinding":
            d["subjects"][0]["name"] = "someone-else"
    account = one("ServiceAccount")["metadata"]
    assert Authorizer.for_account(broken, account["name"], account["namespace"]).cluster == set()


def test_a_service_account_subject_without_a_namespace_is_the_role_bindings() -> None:
    """kube-apiserver's reading (gateway-manifests/bbr/bbr.yaml's RoleBinding relies on it):
    in a RoleBinding the binding's namespace, in a ClusterRoleBinding no namespace at all."""
    ref = {"apiGroup": "rbac.authorization.k8s.io", "name": "reader"}
    role = {"kind": "Role", "metadata": {"name": "reader", "namespace": "team-a"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}  # fmt: skip
    cluster_role = {**role, "kind": "ClusterRole", "metadata": {"name": "reader"}}
    unqualified = [{"kind": "ServiceAccount", "name": "sa"}]
    binding = {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "team-a"},
               "roleRef": {**ref, "kind": "Role"}, "subjects": unqualified}  # fmt: skip
    auth = Authorizer.for_account([role, binding], "sa", "team-a")
    assert auth.allows("", "pods", "list", "team-a")
    assert not Authorizer.for_account([role, binding], "sa", "team-b").namespaced
    cluster_binding = {
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "b"},
        "roleRef": {**ref, "kind": "ClusterRole"},
        "subjects": unqualified,
    }
    assert not Authorizer.for_account([cluster_role, cluster_binding], "sa", "team-a").cluster


# ---- tests: the Deployment --------------------------------------------------------------------


def test_deployment_args_parse_with_the_controllers_parser() -> None:
    args = deployment_args()
    assert args.mode == "kubernetes"
    assert args.leader_elect and args.leader_namespace == one("Namespace")["metadata"]["name"]
    assert args.namespace is None  # every namespace, as the ClusterRole allows
    assert args.host == "0.0.0.0"  # the kubelet's probes and the Services reach the pod's IP
    assert deployment()["spec"]["replicas"] == 2
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http-metrics": args.metrics_port, "webhook": args.webhook_port}


def test_the_infergate_command_dispatches_to_the_controllers(capsys) -> None:
    from infergw.cli import main

    c = container()
    with pytest.raises(SystemExit) as exit_:
        main([*c["command"][1:], *c["args"], "--help"])
    assert exit_.value.code == 0
    assert "infergate controllers" in capsys.readouterr().out


def test_webhook_port_cert_and_service_agree() -> None:
    args = deployment_args()
    pod = deployment()["spec"]["template"]
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volume = next(
        v for v in pod["spec"]["volumes"] if v["name"] == mounts[str(args.webhook_cert_dir)]
    )
    secret = volume["secret"]["secretName"]
    webhook_text = WEBHOOK_YAML.read_text()
    assert f"secretName: {secret}" in webhook_text  # the Certificate webhook.yaml describes
    service = one("Service", load(WEBHOOK_YAML))
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == args.webhook_port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    metrics = one("Service")
    assert metrics["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["http-metrics"]
    selector = deployment()["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()


def test_probes_ask_paths_the_controllers_serve() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ready = c["readinessProbe"]["httpGet"]
    assert ready["port"] == "webhook" and ready["scheme"] == "HTTPS"
    served = {(r.method, r.resource.canonical) for r in build_app().router.routes() if r.resource}
    assert ("GET", ready["path"]) in served
    live = c["livenessProbe"]["httpGet"]
    assert live["port"] in ports and live["port"] == "http-metrics"
    assert live["path"] == "/metrics"  # prometheus_client answers it (the CLI test asks it)


def test_image_matches_the_pickers() -> None:
    epp = one("Deployment", load(MANIFESTS / "epp.yaml"))
    [epp_container] = epp["spec"]["template"]["spec"]["containers"]
    assert container()["image"] == epp_container["image"]


def dockerfile_lines() -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_dockerfile_copies_and_installs_every_package() -> None:
    lines = dockerfile_lines()
    copied = set()
    for words in lines:
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            for src in (w for w in words[1:-1] if not w.startswith("--")):
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
                copied.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Each folder mapped under the namespace (`infergw.epp` -> `epp/`) must be in the image.
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied, f"not copied: {folders - copied}"
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both
    # the project with its s3 extra (the tokenizer fetch's boto3)
    assert any(w[:4] == ["RUN", "pip", "install", "'.[s3]'"] for w in lines)
    user = next(w for w in lines if w[0] == "USER")[1]
    security = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{security['runAsUser']}:{security['runAsGroup']}"


def test_dockerfile_entrypoint_runs_infergate_or_the_simulator(tmp_path: Path) -> None:
    """Run the image's ENTRYPOINT with a stand-in `infergate` that prints its arguments."""
    import json
    import os
    import subprocess

    text = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(
        next(ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT"))[10:]
    )
    stub = tmp_path / "infergate"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def run(*args: str) -> list[str]:
        out = subprocess.run([*entrypoint, *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert run("controllers", "--mode=kubernetes") == ["controllers", "--mode=kubernetes"]
    # a Model's pod: no command, the engine args the controllers write
    engine = ["--model=/m", "--served-model-name=x y", "--port=8000"]
    assert run(*engine) == ["simulate", "--host=0.0.0.0", *engine]
    assert run() == []
