"""What one Model expands into: its ModelInfer, ModelServer, ModelRoute, InferencePool and,
when it autoscales, an AutoScalingPolicyBinding (and a policy for inline metrics). Pure
functions of the Model, so the reconciler only compares and writes.

A prefill/decode Model with `backend.kvConnector` gets llm-d's decode pod: the connector
sidecar (`infergate connector`) on the pod's serving port 8000, which the InferencePool
targets and the picker's `x-prefiller-host-port` reaches, in front of the engine moved to
port 8200. Prefill pods, workers and aggregated Models keep the engine alone on 8000. The
sidecar calls only the prefill pods of the Model's InferencePool (`--pool-name`), which it
reads with the ServiceAccount CONNECTOR_SERVICE_ACCOUNT (gateway-manifests/connector-rbac.yaml).
"""

from __future__ import annotations

import copy
import json

from api.names import DECODE, ENGINE_LABEL, GROUP_LABEL, MODEL_LABEL, PREFILL, ROLE_LABEL
from controllers.store import Obj, owner_reference

ENGINE_PORT = 8000  # the pod's serving port: the engine's, or the connector's before it
SIDECAR_ENGINE_PORT = 8200  # the engine's port behind the connector (llm-d's)
CONNECTOR_IMAGE = "ghcr.io/infergate/infergate:latest"
CONNECTOR_SERVICE_ACCOUNT = "infergate-connector"  # may read the pool and its pods, no more
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
NIXL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
PICKER_PORT = 9002
WORKLOAD = "workload.infergate.io/v1alpha1"
NETWORKING = "networking.infergate.io/v1alpha1"


def served_name(model: Obj) -> str:
    return model["spec"].get("servedModelName") or model["metadata"]["name"]


def model_arg(uri: str) -> str:
    """What vLLM's --model takes for a model URI: a hub id, or a local path."""
    scheme, _, rest = uri.partition("://")
    if scheme in ("hf", "ms"):
        return rest
    if scheme == "file":
        return rest
    return "/models/" + rest.rstrip("/").rsplit("/", 1)[-1]  # s3, obs, pvc: mounted there


def _meta(model: Obj, name: str | None = None, **labels: str) -> dict:
    m = model["metadata"]
    return {
        "name": name or m["name"],
        "namespace": m.get("namespace", "default"),
        "labels": {MODEL_LABEL: m["name"], **labels},
        "ownerReferences": [owner_reference(model)],
    }


def _container(model: Obj, role: dict, port: int = ENGINE_PORT) -> dict:
    spec = model["spec"]
    engine = spec.get("engine") or {}
    args = [
        f"--model={model_arg(spec['modelURI'])}",
        f"--served-model-name={served_name(model)}",
        f"--port={port}",
        *(engine.get("args") or []),
        *(role.get("args") or []),
    ]
    lora = spec.get("loraAdapters") or []
    if lora:
        args += ["--enable-lora", "--lora-modules"]
        args += [f"{a['name']}={model_arg(a['artifactURL'])}" for a in lora]
    # Port names are unique in a pod: behind the connector, "http" is the connector's.
    port_name = "http" if port == ENGINE_PORT else "engine"
    container = {
        "name": "engine",
        "image": spec["image"],
        "args": args,
        "ports": [{"name": port_name, "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": port_name}},
    }
    env = copy.deepcopy(spec.get("env") or [])
    if any("$(POD_IP)" in a for a in args) and not any(e.get("name") == "POD_IP" for e in env):
        # The kubelet expands $(POD_IP) in args (e.g. a KV-event topic) only when the
        # container defines it.
        env.insert(0, copy.deepcopy(POD_IP_ENV))
    if env:
        container["env"] = env
    resources = role.get("resources") or spec.get("resources")
    if resources:
        container["resources"] = copy.deepcopy(resources)
    return container


def connector_container(model: Obj, kv_connector: str) -> dict:
    """The decode pod's P/D sidecar: serves the pod's port and passes to the engine on
    SIDECAR_ENGINE_PORT, or runs the prefill leg on the pod the picker named first, if it is
    a prefill pod of the Model's pool. Its /health and /metrics are the engine's (passed
    through); its own metrics are at /connector/metrics."""
    return {
        "name": "connector",
        "image": CONNECTOR_IMAGE,
        "command": ["infergate", "connector"],
        "args": [
            "--host=$(POD_IP)",
            f"--port={ENGINE_PORT}",
            f"--engine-url=http://$(POD_IP):{SIDECAR_ENGINE_PORT}",
            f"--kv-connector={kv_connector}",
            f"--pool-name={model['metadata']['name']}",  # the InferencePool is the Model's name
            f"--pool-namespace={model['metadata'].get('namespace', 'default')}",
        ],
        "env": [copy.deepcopy(POD_IP_ENV)],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
    }


def _nixl(container: dict, kv_role: str) -> dict:
    """An engine set up for NIXL handover, as vLLM needs it: its KV connector and role
    (unless the Model's arguments already say), and the address its side channel announces
    to the other side (the pod's IP; vLLM would announce localhost)."""
    if not any(a.startswith("--kv-transfer-config") for a in container["args"]):
        config = json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role})
        container["args"].append(f"--kv-transfer-config={config}")
    env = container.setdefault("env", [])
    if not any(e.get("name") == NIXL_HOST for e in env):
        env.append({"name": NIXL_HOST, "valueFrom": copy.deepcopy(POD_IP_ENV["valueFrom"])})
    return container


def _role(
    model: Obj,
    name: str,
    role: dict,
    kv_connector: str | None = None,
    nixl_role: str | None = None,
) -> dict:
    engine = ((model["spec"].get("engine") or {}).get("type") or "vLLM").lower()
    labels = {ENGINE_LABEL: engine}
    serving = _container(model, role)
    if nixl_role:
        _nixl(serving, nixl_role)
    pod = {"metadata": {"labels": labels}, "spec": {"containers": [serving]}}
    entry = pod
    if kv_connector:  # only the entry pod serves, so only it gets the sidecar
        behind = _container(model, role, SIDECAR_ENGINE_PORT)
        containers = [
            _nixl(behind, nixl_role) if nixl_role else behind,
            connector_container(model, kv_connector),
        ]
        spec = {"serviceAccountName": CONNECTOR_SERVICE_ACCOUNT, "containers": containers}
        entry = {"metadata": {"labels": dict(labels)}, "spec": spec}
    out = {
        "name": name,
        "replicas": int(role.get("replicas", 1)),
        "workerReplicas": int(role.get("workerReplicas", 0)),
        "entryTemplate": entry,
    }
    if out["workerReplicas"]:
        out["workerTemplate"] = copy.deepcopy(pod)
    return out


def roles(model: Obj) -> list[dict]:
    backend = model["spec"]["backend"]
    if backend.get("aggregated") is not None:
        return [_role(model, "server", backend["aggregated"])]
    kv_connector = (backend.get("kvConnector") or {}).get("type")
    if backend.get("kvConnector") is not None and not kv_connector:
        kv_connector = "nixl"  # the CRD's default
    nixl = kv_connector == "nixl"  # vLLM's NixlConnector; other connectors: the Model's args
    return [
        _role(model, PREFILL, backend["prefill"], nixl_role="kv_producer" if nixl else None),
        _role(model, DECODE, backend["decode"], kv_connector, "kv_consumer" if nixl else None),
    ]


def modelinfer(model: Obj) -> Obj:
    return {
        "apiVersion": WORKLOAD,
        "kind": "ModelInfer",
        "metadata": _meta(model),
        "spec": {
            "replicas": int(model["spec"].get("replicas", 1)),
            "recoveryPolicy": "RoleRecreate",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxUnavailable": 1},
            },
            "template": {"roles": roles(model)},
        },
    }


def modelserver(model: Obj) -> Obj:
    spec = model["spec"]
    backend = spec["backend"]
    selector: dict = {"matchLabels": {MODEL_LABEL: model["metadata"]["name"]}}
    if backend.get("aggregated") is None:
        selector["pdGroup"] = {
            "groupKey": GROUP_LABEL,
            "prefillLabels": {ROLE_LABEL: PREFILL},
            "decodeLabels": {ROLE_LABEL: DECODE},
        }
    out = {
        "apiVersion": NETWORKING,
        "kind": "ModelServer",
        "metadata": _meta(model),
        "spec": {
            "model": served_name(model),
            "inferenceEngine": (spec.get("engine") or {}).get("type", "vLLM"),
            "workloadSelector": selector,
            "workloadPort": {"port": ENGINE_PORT, "protocol": "http"},
        },
    }
    if backend.get("kvConnector"):
        out["spec"]["kvConnector"] = copy.deepcopy(backend["kvConnector"])
    return out


def modelroute(model: Obj) -> Obj:
    spec: dict = {
        "modelName": served_name(model),
        "rules": [
            {"name": "default", "targetModels": [{"modelServerName": model["metadata"]["name"]}]}
        ],
    }
    lora = [a["name"] for a in model["spec"].get("loraAdapters") or []]
    if lora:
        spec["loraAdapters"] = lora
    return {"apiVersion": NETWORKING, "kind": "ModelRoute", "metadata": _meta(model), "spec": spec}


def inferencepool(model: Obj) -> Obj:
    name = model["metadata"]["name"]
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": _meta(model),
        "spec": {
            "selector": {"matchLabels": {MODEL_LABEL: name}},
            "targetPorts": [{"number": ENGINE_PORT}],
            "endpointPickerRef": {
                "name": f"{name}-epp",
                "port": {"number": PICKER_PORT},
                "failureMode": "FailClose",
            },
        },
    }


def autoscaling(model: Obj) -> list[Obj]:
    """A binding of the Model's ModelInfer to its policy; an inline policy becomes a
    policy object of the Model's name."""
    scaling = model["spec"].get("autoscaling")
    if not scaling:
        return []
    name = model["metadata"]["name"]
    out = []
    policy = (scaling.get("policyRef") or {}).get("name")
    if policy is None:
        policy = name
        out.append(
            {
                "apiVersion": WORKLOAD,
                "kind": "AutoScalingPolicy",
                "metadata": _meta(model),
                "spec": {"metrics": copy.deepcopy(scaling.get("metrics") or [])},
            }
        )
    out.append(
        {
            "apiVersion": WORKLOAD,
            "kind": "AutoScalingPolicyBinding",
            "metadata": _meta(model),
            "spec": {
                "policyRef": {"name": policy},
                "homogeneousTarget": {
                    "target": {"kind": "ModelInfer", "name": name},
                    "minReplicas": int(scaling.get("minReplicas", 1)),
                    "maxReplicas": int(scaling["maxReplicas"]),
                },
            },
        }
    )
    return out


def desired(model: Obj) -> list[Obj]:
    return [
        modelinfer(model),
        modelserver(model),
        modelroute(model),
        inferencepool(model),
        *autoscaling(model),
    ]
