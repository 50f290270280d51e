"""What one Model expands into: its ModelInfer, ModelServer, ModelRoute, InferencePool and,
when it autoscales, an AutoScalingPolicyBinding (and a policy for inline metrics). Pure
functions of the Model, so the reconciler only compares and writes.

A Model with `loraAdapters` gets the runtime sidecar beside each serving engine and, in a
cluster, the ConfigMap of the adapters it loads (adapters.py).

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
from typing import Any, overload

import msgspec

from infergw.api import (
    AutoScalingPolicy,
    AutoScalingPolicyBinding,
    InferencePool,
    Model,
    ModelInfer,
    ModelRoute,
    ModelServer,
    ObjectMeta,
)
from infergw.api.autoscaling import (
    AutoScalingPolicyBindingSpec,
    AutoScalingPolicySpec,
    BoundedTarget,
    ScaleTargetRef,
)
from infergw.api.engines import INFERGATE_IMAGE, METRIC_VOCABULARY
from infergw.api.lora_adapters import VLLM_API
from infergw.api.meta import ApiStruct, LocalRef
from infergw.api.names import (
    CONNECTOR_SIDECAR,
    DECODE,
    ENGINE_LABEL,
    GROUP_LABEL,
    MODEL_LABEL,
    PREFILL,
    ROLE_LABEL,
    SIDECAR_LABEL,
)
from infergw.api.networking import (
    DEFAULT_KV_CONNECTOR,
    PARENT_GROUP,
    PARENT_KIND,
    ModelRouteSpec,
    ModelServerSpec,
    ParentRef,
    PDGroup,
    RouteRule,
    TargetModel,
    WorkloadPort,
    WorkloadSelector,
)
from infergw.api.object_names import dns_label, label_value
from infergw.api.parents import model_gateway
from infergw.api.upstream import (
    DEFAULT_FAILURE_MODE,
    EndpointPickerRef,
    InferencePoolSpec,
    PoolSelector,
    Port,
)
from infergw.api.workload import (
    DEFAULT_MAX_UNAVAILABLE,
    DEFAULT_MIN_REPLICAS,
    DEFAULT_RECOVERY_POLICY,
    DEFAULT_REPLICAS,
    DEFAULT_ROLE_REPLICAS,
    DEFAULT_WORKER_REPLICAS,
    ROLLOUT_TYPES,
    GroupTemplate,
    ModelInferSpec,
    ModelRole,
    Role,
    RollingUpdateConfiguration,
    RolloutStrategy,
)
from infergw.cluster.store import owner_reference_of
from infergw.controllers import adapters as adapter_objects
from infergw.controllers import weights as weights_objects
from infergw.controllers.engine_command import (
    ENGINE_PORT,
    PER_POD,
    KVEventSockets,
    Node,
    engine_type,
    render,
)
from infergw.controllers.weights import CLUSTER, WeightsLayout

SIDECAR_ENGINE_PORT = 8200  # the engine's port behind the connector (llm-d's)
CONNECTOR_IMAGE = INFERGATE_IMAGE
CONNECTOR_SERVICE_ACCOUNT = "infergate-connector"  # may read the pool and its pods, no more
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
NIXL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
PICKER_PORT = 9002


def served_name(model: Model) -> str:
    return model.spec.served_model_name or _name(model)


def _name(model: Model) -> str:
    return model.metadata.name or ""


def _namespace(model: Model) -> str:
    return model.metadata.namespace or "default"


def model_label(model: Model) -> dict[str, str]:
    """MODEL_LABEL on the Model's objects and pods, what its pool selects by: the Model's
    name, bounded as a label value."""
    return {MODEL_LABEL: label_value(_name(model))}


def picker_name(model: Model) -> str:
    """The picker's Service (what the InferencePool's endpointPickerRef names), and its
    Deployment, ServiceAccount and Role (controllers/picker_objects.py)."""
    return dns_label(_name(model), "-epp")


@overload
def _plain(value: ApiStruct) -> dict[str, Any]: ...
@overload
def _plain(value: None) -> None: ...
def _plain(value: ApiStruct | None) -> dict[str, Any] | None:
    """A typed part of the Model as it goes into a pod (a core kind, kept as a dict)."""
    return None if value is None else msgspec.to_builtins(value)


def _meta(model: Model) -> ObjectMeta:
    return ObjectMeta(
        name=_name(model),
        namespace=_namespace(model),
        labels=model_label(model),
        owner_references=[owner_reference_of(model)],
    )


def _container(
    model: Model,
    role: ModelRole,
    sockets: KVEventSockets,
    port: int = ENGINE_PORT,
    node: Node | None = None,
    weights: WeightsLayout = CLUSTER,
) -> dict:
    """The engine container: its command and flags (engine_command.py), port, probe, env,
    resources and its view of the weights (weights.py). A worker node serves nothing: no
    port, no readiness probe (it is ready while it runs; its entry is ready once the workers
    joined)."""
    spec = model.spec
    engine = render(model, role, served_name(model), port, sockets, node, weights)
    args = engine.args
    # Port names are unique in a pod: behind the connector, "http" is the connector's.
    port_name = "http" if port == ENGINE_PORT else "engine"
    container = {
        "name": "engine",
        "image": spec.image,
        "command": engine.command,
        "args": args,
        "ports": [{"name": port_name, "containerPort": port}, *engine.kv_ports],
        "readinessProbe": {"httpGet": {"path": "/health", "port": port_name}},
    }
    if node is not None and not node.entry:
        del container["ports"], container["readinessProbe"]
    env = [_plain(e) for e in spec.env or []]
    if adapter_objects.loads_at_run_time(model) and adapter_objects.engine_api(model) == VLLM_API:
        # vLLM serves its load/unload routes only when told to (the simulator ignores it)
        if not any(e.get("name") == adapter_objects.RUNTIME_LORA_ENV for e in env):
            env.append({"name": adapter_objects.RUNTIME_LORA_ENV, "value": "True"})
    if any("$(POD_IP)" in a for a in args) and not any(e.get("name") == "POD_IP" for e in env):
        # The kubelet expands $(POD_IP) in args (e.g. a KV-event topic) only when the
        # container defines it.
        env.insert(0, copy.deepcopy(POD_IP_ENV))
    if env:
        container["env"] = env
    resources = _plain(role.resources) or _plain(spec.resources)
    if resources:
        container["resources"] = resources
    if mounts := weights_objects.engine_mounts(model, weights):
        container["volumeMounts"] = mounts
    return container


def _pod(model: Model, weights: WeightsLayout, labels: dict, spec: dict) -> dict:
    """A pod template: its engine (and sidecars) `spec`, after the downloads of its weights."""
    if init := weights_objects.init_containers(model, weights):
        spec = {**spec, "initContainers": init}
    volumes = weights_objects.volumes(model, weights)
    if any(c["name"] == adapter_objects.RUNTIME_CONTAINER for c in spec["containers"]):
        volumes += adapter_objects.volumes(model, weights)
    if volumes:
        spec = {**spec, "volumes": volumes}
    return {"metadata": {"labels": labels}, "spec": spec}


def _with_runtime(
    model: Model, weights: WeightsLayout, containers: list[dict], engine_port: int
) -> list[dict]:
    """The serving pod's containers, and the runtime sidecar beside its engine when the Model
    loads LoRA adapters at run time (adapters.py)."""
    if not adapter_objects.loads_at_run_time(model):
        return containers
    runtime = adapter_objects.runtime_container(model, weights, served_name(model), engine_port)
    runtime["env"].insert(0, copy.deepcopy(POD_IP_ENV))
    return [*containers, runtime]


def connector_container(model: Model, kv_connector: str) -> dict:
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
            f"--pool-name={_name(model)}",  # the InferencePool is the Model's name
            f"--pool-namespace={_namespace(model)}",
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
    model: Model,
    name: str,
    role: ModelRole,
    sockets: KVEventSockets,
    kv_connector: str | None = None,
    nixl_role: str | None = None,
    weights: WeightsLayout = CLUSTER,
) -> Role:
    labels = {ENGINE_LABEL: METRIC_VOCABULARY[engine_type(model)]}
    workers = DEFAULT_WORKER_REPLICAS if role.worker_replicas is None else role.worker_replicas
    nodes = 1 + workers
    serving = _container(model, role, sockets, node=Node(nodes, entry=True), weights=weights)
    if nixl_role:
        _nixl(serving, nixl_role)
    entry = _pod(
        model,
        weights,
        labels,
        {"containers": _with_runtime(model, weights, [serving], ENGINE_PORT)},
    )
    worker = None
    if workers:  # every node loads its part of the weights
        joining = _container(model, role, sockets, node=Node(nodes, entry=False), weights=weights)
        spec = {"containers": [_nixl(joining, nixl_role) if nixl_role else joining]}
        worker = _pod(model, weights, dict(labels), spec)
    if kv_connector:  # only the entry pod serves, so only it gets the sidecar
        behind = _container(
            model, role, sockets, SIDECAR_ENGINE_PORT, Node(nodes, entry=True), weights
        )
        containers = _with_runtime(
            model,
            weights,
            [
                _nixl(behind, nixl_role) if nixl_role else behind,
                connector_container(model, kv_connector),
            ],
            SIDECAR_ENGINE_PORT,
        )
        spec = {"serviceAccountName": CONNECTOR_SERVICE_ACCOUNT, "containers": containers}
        entry = _pod(model, weights, {**labels, SIDECAR_LABEL: CONNECTOR_SIDECAR}, spec)
    return Role(
        name=name,
        replicas=DEFAULT_ROLE_REPLICAS if role.replicas is None else role.replicas,
        worker_replicas=workers,
        entry_template=entry,
        worker_template=worker,
    )


def roles(
    model: Model, sockets: KVEventSockets = PER_POD, weights: WeightsLayout = CLUSTER
) -> list[Role]:
    """The ModelInfer's roles; `sockets`: where the engines' KV events go (the picker's
    --kv-events-mode); `weights`: where the downloads put the weights."""
    backend = model.spec.backend
    if backend.aggregated is not None:
        return [_role(model, "server", backend.aggregated, sockets, weights=weights)]
    connector = backend.kv_connector
    kv_connector = None if connector is None else connector.type or DEFAULT_KV_CONNECTOR
    nixl = kv_connector == "nixl"  # vLLM's NixlConnector; other connectors: the Model's args
    prefill, decode = backend.prefill, backend.decode
    if prefill is None or decode is None:  # validate_model's rule, for a Model it never saw
        raise ValueError("spec.backend: set either aggregated, or both prefill and decode")
    return [
        _role(model, PREFILL, prefill, sockets, None, "kv_producer" if nixl else None, weights),
        _role(
            model, DECODE, decode, sockets, kv_connector, "kv_consumer" if nixl else None, weights
        ),
    ]


def modelinfer(
    model: Model, sockets: KVEventSockets = PER_POD, weights: WeightsLayout = CLUSTER
) -> ModelInfer:
    replicas = model.spec.replicas
    return ModelInfer(
        metadata=_meta(model),
        spec=ModelInferSpec(
            replicas=DEFAULT_REPLICAS if replicas is None else replicas,
            recovery_policy=DEFAULT_RECOVERY_POLICY,
            rollout_strategy=RolloutStrategy(
                type=ROLLOUT_TYPES[0],
                rolling_update_configuration=RollingUpdateConfiguration(
                    max_unavailable=DEFAULT_MAX_UNAVAILABLE
                ),
            ),
            template=GroupTemplate(roles=roles(model, sockets, weights)),
        ),
    )


def modelserver(model: Model) -> ModelServer:
    backend = model.spec.backend
    selector = WorkloadSelector(match_labels=model_label(model))
    if backend.aggregated is None:
        selector.pd_group = PDGroup(
            group_key=GROUP_LABEL,
            prefill_labels={ROLE_LABEL: PREFILL},
            decode_labels={ROLE_LABEL: DECODE},
        )
    return ModelServer(
        metadata=_meta(model),
        spec=ModelServerSpec(
            model=served_name(model),
            inference_engine=engine_type(model),
            workload_selector=selector,
            workload_port=WorkloadPort(port=ENGINE_PORT, protocol="http"),
        ),
    )


def modelroute(model: Model) -> ModelRoute:
    """The Model's names → its ModelServer, served on the Model's Gateway only: the router of
    another Gateway answers them 404 (api/parents.py)."""
    lora = [a.name for a in model.spec.lora_adapters or []]
    gateway = model_gateway(model)
    parent = ParentRef(
        group=PARENT_GROUP,
        kind=PARENT_KIND,
        name=gateway.name,
        namespace=gateway.namespace,
        section_name=model.spec.gateway.section_name if model.spec.gateway else None,
    )
    return ModelRoute(
        metadata=_meta(model),
        spec=ModelRouteSpec(
            model_name=served_name(model),
            rules=[
                RouteRule(
                    name="default", target_models=[TargetModel(model_server_name=_name(model))]
                )
            ],
            # always written, [] too: an update only writes what differs from the stored
            # route (model.py's covers), so a field left out would keep the last adapters
            lora_adapters=lora,
            parent_refs=[parent],
        ),
    )


def inferencepool(model: Model) -> InferencePool:
    return InferencePool(
        metadata=_meta(model),
        spec=InferencePoolSpec(
            selector=PoolSelector(match_labels=model_label(model)),
            target_ports=[Port(number=ENGINE_PORT)],
            endpoint_picker_ref=EndpointPickerRef(
                name=picker_name(model),
                port=Port(number=PICKER_PORT),
                failure_mode=DEFAULT_FAILURE_MODE,
            ),
        ),
    )


def autoscaling(model: Model) -> list[AutoScalingPolicy | AutoScalingPolicyBinding]:
    """A binding of the Model's ModelInfer to its policy; an inline policy becomes a
    policy object of the Model's name."""
    scaling = model.spec.autoscaling
    if scaling is None:
        return []
    name = _name(model)
    out: list[AutoScalingPolicy | AutoScalingPolicyBinding] = []
    policy = scaling.policy_ref.name if scaling.policy_ref is not None else None
    if policy is None:
        policy = name
        metrics = scaling.metrics or []  # shared with the Model: to_dict copies it
        out.append(
            AutoScalingPolicy(metadata=_meta(model), spec=AutoScalingPolicySpec(metrics=metrics))
        )
    low = DEFAULT_MIN_REPLICAS if scaling.min_replicas is None else scaling.min_replicas
    target = BoundedTarget(
        target=ScaleTargetRef(kind="ModelInfer", name=name),
        min_replicas=low,
        max_replicas=scaling.max_replicas,
    )
    out.append(
        AutoScalingPolicyBinding(
            metadata=_meta(model),
            spec=AutoScalingPolicyBindingSpec(
                policy_ref=LocalRef(name=policy), homogeneous_target=target
            ),
        )
    )
    return out


# The containers of ours in a Model's pods, which read the OTEL_* variables (api/tracing.py).
OUR_SIDECARS = ("connector", adapter_objects.RUNTIME_CONTAINER)


def pass_trace_env(wants: list[ApiStruct], env: tuple[tuple[str, str], ...]) -> None:
    """Our sidecars in the pods of the ModelInfer among `wants` (the P/D connector, the LoRA
    runtime) get `env`, the controllers' own OTEL_* (api/tracing.py passed_on), so they trace
    where the controllers do. The engine's env is the Model's to set."""
    for want in wants:
        if not env or not isinstance(want, ModelInfer):
            continue
        for role in want.spec.template.roles:
            for template in (role.entry_template, role.worker_template):
                for c in (template or {}).get("spec", {}).get("containers", []):
                    if c.get("name") in OUR_SIDECARS:
                        c.setdefault("env", []).extend({"name": n, "value": v} for n, v in env)


def desired(
    model: Model, sockets: KVEventSockets = PER_POD, weights: WeightsLayout = CLUSTER
) -> list[ApiStruct]:
    """Every object the Model owns, typed; the reconciler turns each into a dict to write.
    In a cluster, a Model with LoRA adapters also owns the ConfigMap its runtime sidecars read
    (standalone mode writes that file itself: adapters.write_local)."""
    adapters = adapter_objects.loads_at_run_time(model) and weights.in_pod
    return [
        modelinfer(model, sockets, weights),
        modelserver(model),
        modelroute(model),
        inferencepool(model),
        *autoscaling(model),
        *([adapter_objects.configmap(model, weights)] if adapters else []),
    ]
