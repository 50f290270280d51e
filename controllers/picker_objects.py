"""What a Model needs in a cluster besides its serving pods: its endpoint picker and the
HTTPRoute that attaches its InferencePool to a Gateway. Pure functions of the Model, like
model_objects.py; the Model reconciler writes them in kubernetes mode (standalone mode runs
its own picker and Envoy).

Per Model `m` (gateway-manifests/epp.yaml is the same picker written by hand):
- ServiceAccount, Role and RoleBinding `m-epp`: read-only, in the Model's namespace, on what
  the picker's Kubernetes provider and replica discovery watch (PICKER_READS);
- ConfigMap `m-epp-config`: the EndpointPickerConfig (queue 2, KV-cache utilization 2, in-flight
  requests 2, the precise prefix scorer 3, as examples/quickstart/epp-config.yaml), with the
  approximate prefix scorer instead when the Model's tokenizer cannot be fetched;
- Deployment `m-epp`: 2 replicas active-active, spread over nodes, never below 2 during a
  rollout, gRPC health probes, per-pod KV subscription (nothing listens for events), replica
  sync over the headless Service, TLS from the Secret `m-epp-tls`, and an init container
  fetching the tokenizer files (`infergate fetch tokenizer`) for `--tokenizer`;
- Service `m-epp` (ext_proc, what the InferencePool's endpointPickerRef names), headless
  Service `m-epp-replicas` (replica sync), PodDisruptionBudget `m-epp` (minAvailable 1);
- HTTPRoute `m` on the Model's Gateway: the inference paths, for requests whose
  MODEL_NAME_HEADER (set by the body-based router) names the Model's pool, to the pool;
- Secret `m-epp-tls` (picker_tls.py: made by the controllers, rotated before it ends) and
  EnvoyPatchPolicy `m-epp` (picker_patch.py: Envoy Gateway runs the picker for the route,
  verifying it against the Secret's CA).

The picker's pods carry no MODEL_LABEL: the pool selects the Model's serving pods by it.
For a long Model name each name is bounded by api/object_names.py (Services 63 characters,
starting with a letter; other objects 253; label values 63): truncated, with a hash.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from infergw.api import Model, ObjectMeta
from infergw.api.core import (
    RBAC_GROUP,
    ConfigMap,
    Deployment,
    DeploymentSpec,
    DeploymentStrategy,
    LabelSelector,
    PodDisruptionBudget,
    PodDisruptionBudgetSpec,
    PolicyRule,
    Role,
    RoleBinding,
    RoleRef,
    RollingUpdate,
    Secret,
    Service,
    ServiceAccount,
    ServicePort,
    ServiceSpec,
    Subject,
)
from infergw.api.engine_keys import ENGINE_KEYS, TOKEN_KEYS, NotReproducible, engine_hash_settings
from infergw.api.envoy_gateway import EnvoyPatchPolicy
from infergw.api.gateway import (
    GROUP as GATEWAY_GROUP,
)
from infergw.api.gateway import (
    BackendRef,
    HeaderMatch,
    HTTPRoute,
    HTTPRouteRule,
    HTTPRouteSpec,
    PathMatch,
    RouteMatch,
    RouteTimeouts,
)
from infergw.api.meta import ApiStruct
from infergw.api.names import (
    COMPONENT_LABEL,
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    MODEL_NAME_HEADER,
    PICKER_COMPONENT,
    PICKER_METRICS_PORT,
    PICKER_METRICS_PORT_NAME,
)
from infergw.api.networking import ParentRef
from infergw.api.object_names import dns_label, subdomain
from infergw.api.upstream import POOL_GROUP_VERSION
from infergw.api.workload import DEFAULT_GATEWAY
from infergw.cluster.certs import ServingCert
from infergw.cluster.store import (
    ENDPOINT_SLICE,
    INFERENCE_OBJECTIVE,
    INFERENCE_POOL,
    LEGACY_INFERENCE_OBJECTIVE,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
    Kind,
    owner_reference_of,
)
from infergw.controllers import adapters, picker_patch, picker_tls
from infergw.controllers.engine_command import PER_POD, KVEventSockets
from infergw.controllers.model_objects import (
    CONNECTOR_IMAGE,
    PICKER_PORT,
    POD_IP_ENV,
    model_label,
    picker_name,
    served_name,
)
from infergw.controllers.picker_tls import RESPONSE_ID_KEY, TLS_ANNOTATION
from infergw.controllers.route_parents import merge_parents
from infergw.controllers.weights import CLUSTER, WeightsLayout, fetch_env
from infergw.fetch.tokenizer import fetchable as tokenizer_fetchable

PICKER_IMAGE = CONNECTOR_IMAGE  # the infergate image: `infergate epp`, `infergate fetch`
PICKER_REPLICAS = 2
HEALTH_PORT = 9003
REPLICA_SYNC_PORT = 9004
CONFIG_DIR = "/etc/infergate/epp"
CONFIG_KEY = "epp-config.yaml"
TLS_DIR = "/etc/infergate/tls"
TOKENIZER_DIR = "/var/lib/infergate/tokenizer"
# The request paths whose body names a model (the picker's APIs, epp/request.py): the body-based
# router can set MODEL_NAME_HEADER on these only.
INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/conversations",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/rerank",
    "/v1/score",
    "/v1/messages",
)
# A stored response's paths (`/v1/responses/{id}`, `…/cancel`, `…/input_items`) have no body:
# the router sets MODEL_NAME_HEADER to the pool the response id names (epp/response_ids.py).
STORED_RESPONSES_PREFIX = "/v1/responses/"
# The HTTPRoute's matches, in its order (the EnvoyPatchPolicy patches the Envoy route of each).
ROUTE_PATHS = (
    *(PathMatch(type="Exact", value=path) for path in INFERENCE_PATHS),
    PathMatch(type="PathPrefix", value=STORED_RESPONSES_PREFIX),
)
ROUTE_TIMEOUT = "3600s"  # generation streams for minutes; the Gateway's default would cut it
# What the picker's Kubernetes provider (epp/providers/kubernetes.py, cluster/pool_watch.py)
# and its replica discovery (epp/replica_peers.py) list and watch: its Role grants these only.
PICKER_READS: tuple[Kind, ...] = (
    POD,
    INFERENCE_POOL,
    INFERENCE_OBJECTIVE,
    LEGACY_INFERENCE_OBJECTIVE,
    MODEL_ROUTE,
    MODEL_SERVER,
    ENDPOINT_SLICE,
)
READ_VERBS = ["get", "list", "watch"]
SCORER_WEIGHTS = (  # examples/quickstart/epp-config.yaml's
    ("queue-scorer", 2),
    ("kv-cache-utilization-scorer", 2),
    ("least-request", 2),
)
# The prefix scorer's weight by kind: the precise one as much as the load scorers together
# (the quickstart's, issue 16's bench); the approximate one, whose holdings are guesses, as
# before (not measured at 6).
PREFIX_WEIGHTS = {"precise-prefix-cache-scorer": 6, "prefix-cache-scorer": 3}
PICKER_CONFIG_API = "llm-d.ai/v1alpha1"  # EndpointPickerConfig's current group


@dataclass(frozen=True, slots=True)
class PickerTLS:
    """The picker's certificate as the controllers made it (picker_tls.py): the CA bundle Envoy
    trusts, and the certificate's fingerprint (a new one rolls the replicas)."""

    ca_bundle: str
    cert_sha256: str


@dataclass(frozen=True, slots=True)
class PickerSettings:
    """What the controllers' flags say about every Model's picker: its image, a shared KV
    index in Redis (`--picker-kv-index-redis HOST:PORT`; opt-in, default each replica's own
    index) and the index's keys (`--picker-kv-index-keys`: token ids, or the engines' own
    block hashes where the picker can hash as the Model's engines do, engine_key_args).
    (Where the engines publish KV events, which it subscribes to, is the reconciler's
    `sockets`.)"""

    image: str = PICKER_IMAGE
    kv_index_redis: str | None = None
    kv_index_keys: str = TOKEN_KEYS
    # Where the Models' adapters are, as their engines load them (the reconciler's layout):
    # engine keys hash an adapter's path.
    weights: WeightsLayout = CLUSTER
    # The controllers' own OTEL_* (api/tracing.py passed_on): their pickers (and the Model
    # pods' sidecars, model_objects.pass_trace_env) trace where they do.
    trace_env: tuple[tuple[str, str], ...] = ()


# ---- names --------------------------------------------------------------------------------------


def replicas_service(model: Model) -> str:
    return dns_label(model.metadata.name or "", "-epp-replicas")


def config_map_name(model: Model) -> str:
    return subdomain(model.metadata.name or "", "-epp-config")


def tls_secret(model: Model) -> str:
    """The picker's serving certificate (tls.crt, tls.key, ca.crt): the controllers make it
    (picker_tls.py); the pods start once it exists."""
    return subdomain(model.metadata.name or "", "-epp-tls")


def gateway_of(model: Model) -> ParentRef:
    """The Gateway the Model's route attaches to: spec.gateway with its defaults."""
    ref = model.spec.gateway
    return ParentRef(
        group=GATEWAY_GROUP,
        kind="Gateway",
        name=(ref.name if ref else None) or DEFAULT_GATEWAY,
        namespace=(ref.namespace if ref else None) or model.metadata.namespace or "default",
        section_name=ref.section_name if ref else None,
    )


def fetches_tokenizer(model: Model) -> bool:
    """Whether the picker gets the Model's tokenizer: a source `infergate fetch` reads, and a
    served name `--tokenizer MODEL=DIR` can spell."""
    # Other Models' pickers score prefixes approximately.
    return tokenizer_fetchable(model.spec.model_uri) and "=" not in served_name(model)


def _pod_labels(model: Model) -> dict[str, str]:
    """The picker pods' labels, and the selector of its Deployment, Services and budget."""
    return {"app.kubernetes.io/name": picker_name(model), "app.kubernetes.io/part-of": "infergate"}


def _meta(model: Model, name: str) -> ObjectMeta:
    return ObjectMeta(
        name=name,
        namespace=model.metadata.namespace or "default",
        labels={**_pod_labels(model), **model_label(model)},
        owner_references=[owner_reference_of(model)],
    )


# ---- identity and permissions ------------------------------------------------------------------


def picker_rules() -> list[PolicyRule]:
    """Read-only rules on PICKER_READS, one per API group."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for kind in PICKER_READS:
        by_group[kind.group].append(kind.plural)
    return [
        PolicyRule(api_groups=[g], resources=r, verbs=list(READ_VERBS)) for g, r in by_group.items()
    ]


def service_account(model: Model) -> ServiceAccount:
    return ServiceAccount(metadata=_meta(model, picker_name(model)))


def role(model: Model) -> Role:
    return Role(metadata=_meta(model, picker_name(model)), rules=picker_rules())


def role_binding(model: Model) -> RoleBinding:
    return RoleBinding(
        metadata=_meta(model, picker_name(model)),
        role_ref=RoleRef(api_group=RBAC_GROUP, kind="Role", name=picker_name(model)),
        subjects=[
            Subject(
                kind="ServiceAccount",
                name=picker_name(model),
                namespace=model.metadata.namespace or "default",
            )
        ],
    )


# ---- configuration -----------------------------------------------------------------------------


def picker_config(model: Model) -> str:
    """The EndpointPickerConfig: the load scorers and a prefix scorer, precise (from the pods'
    KV events, tokenizing as the engine does) when the picker has the tokenizer, else
    approximate."""
    prefix = "precise-prefix-cache-scorer" if fetches_tokenizer(model) else "prefix-cache-scorer"
    scorers = [*SCORER_WEIGHTS, (prefix, PREFIX_WEIGHTS[prefix])]
    doc = {
        "apiVersion": PICKER_CONFIG_API,
        "kind": "EndpointPickerConfig",
        "plugins": [{"type": t} for t, _ in scorers] + [{"type": "max-score-picker"}],
        "schedulingProfiles": [
            {
                "name": "default",
                "plugins": [{"pluginRef": t, "weight": w} for t, w in scorers]
                + [{"pluginRef": "max-score-picker"}],
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def config_map(model: Model) -> ConfigMap:
    return ConfigMap(
        metadata=_meta(model, config_map_name(model)), data={CONFIG_KEY: picker_config(model)}
    )


# ---- the Deployment ----------------------------------------------------------------------------


def kv_event_args(sockets: KVEventSockets) -> list[str]:
    """The picker's side of the engines' --kv-events-config (engine_command.py): per pod, it
    connects to each pod's PUB and replay ports; central, pods connect to its SUB."""
    mode = "per-pod" if sockets.pub_binds else "central"
    return [
        f"--kv-events-mode={mode}",
        f"--kv-events-pub-port={KV_EVENTS_PORT}",
        f"--kv-events-replay-port={KV_REPLAY_PORT}",
    ]


def kv_index_args(redis: str | None, sockets: KVEventSockets) -> list[str]:
    """A shared index in Redis: the replicas split the pods' KV events between them (per
    pod: each pod's by one replica, epp/kv_shards.py) and all read it from Redis."""
    if redis is None:
        return []
    args = ["--kv-index-backend=redis", f"--kv-index-redis-url={redis}"]
    return [*args, "--kv-index-redis-shard"] if sockets.pub_binds else args


def engine_keys_problem(model: Model, settings: PickerSettings) -> str | None:
    """Why the Model's picker keeps token-id keys though engine keys were asked for, or None
    (asked for and given, or not asked for)."""
    if settings.kv_index_keys != ENGINE_KEYS:
        return None
    found = engine_hash_settings(model)
    return found.reason if isinstance(found, NotReproducible) else None


def engine_key_args(model: Model, settings: PickerSettings) -> list[str]:
    """With `--picker-kv-index-keys engine`, the picker's flags to hash prompts as the Model's
    engines hash blocks (api/engine_keys.py), each `loraAdapters` entry with the path its
    engine loads it from (adapters.py: vLLM hashes that path); none where it cannot
    (engine_keys_problem: the Model's EngineKeys condition says why)."""
    if settings.kv_index_keys != ENGINE_KEYS:
        return []
    found = engine_hash_settings(model)
    if isinstance(found, NotReproducible):
        return []
    lora = adapters.wanted(model, settings.weights)
    return [*found.picker_args(), *(f"--kv-engine-lora-path={a.name}={a.path}" for a in lora)]


def picker_args(
    model: Model, sockets: KVEventSockets = PER_POD, settings: PickerSettings | None = None
) -> list[str]:
    """`infergate epp`'s flags (the kubelet expands $(POD_IP) and $(POD_NAMESPACE))."""
    settings = settings or PickerSettings()
    args = [
        f"--pool-name={model.metadata.name}",  # the InferencePool is the Model's name
        "--pool-namespace=$(POD_NAMESPACE)",
        "--provider=kubernetes",
        f"--config={CONFIG_DIR}/{CONFIG_KEY}",
        f"--grpc-port={PICKER_PORT}",
        f"--grpc-health-port={HEALTH_PORT}",
        f"--metrics-port={PICKER_METRICS_PORT}",
        "--secure-serving=true",
        f"--cert-path={TLS_DIR}",
        # Every replica's Responses API ids under one key (picker_tls.py keeps it).
        f"--response-id-key-file={TLS_DIR}/{RESPONSE_ID_KEY}",
        "--refresh-metrics-interval=50ms",
        # One endpoint per request: Envoy's ORIGINAL_DST reads the header as one ip:port.
        "--fallback-endpoints=0",
        *kv_event_args(sockets),
        # A PUB on this pod's IP; the peers are the headless Service's ready endpoints.
        f"--replica-sync-bind=tcp://$(POD_IP):{REPLICA_SYNC_PORT}",
        f"--replica-sync-discovery={replicas_service(model)}",
        *kv_index_args(settings.kv_index_redis, sockets),
        *engine_key_args(model, settings),
    ]
    if fetches_tokenizer(model):
        args.append(f"--tokenizer={served_name(model)}={TOKENIZER_DIR}")
    return args


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def _fetch_container(model: Model, settings: PickerSettings) -> dict:
    """Fetches the tokenizer files alone into the shared volume, with the Model's source
    credentials (FETCH_ENV entries of its env, e.g. HF_TOKEN from a Secret) and at its
    revision: the picker's pod has no access to the node's weights cache, so it reads the
    same source at the same revision rather than the engine's copy (a commit pins both to
    the same files; a branch is resolved by each as it runs)."""
    env = fetch_env(model)
    revision = [f"--revision={model.spec.model_revision}"] if model.spec.model_revision else []
    container = {
        "name": "fetch-tokenizer",
        "image": settings.image,
        "command": ["infergate", "fetch", "tokenizer"],
        "args": [f"--source={model.spec.model_uri}", f"--dest={TOKENIZER_DIR}", *revision],
        "env": [{"name": "HOME", "value": "/tmp"}, *env],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": dict(_CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "tokenizer", "mountPath": TOKENIZER_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return container


def _picker_container(model: Model, settings: PickerSettings, sockets: KVEventSockets) -> dict:
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if fetches_tokenizer(model):
        mounts.append({"name": "tokenizer", "mountPath": TOKENIZER_DIR, "readOnly": True})
    return {
        "name": "epp",
        "image": settings.image,
        "command": ["infergate", "epp"],
        "args": picker_args(model, sockets, settings),
        "env": [
            dict(POD_IP_ENV),
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": "HOME", "value": "/tmp"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            *({"name": name, "value": value} for name, value in settings.trace_env),
        ],
        "ports": [
            {"name": "grpc", "containerPort": PICKER_PORT, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {
                "name": PICKER_METRICS_PORT_NAME,
                "containerPort": PICKER_METRICS_PORT,
                "protocol": "TCP",
            },
            {"name": "replica-sync", "containerPort": REPLICA_SYNC_PORT, "protocol": "TCP"},
        ],
        # "readiness" is SERVING once the pool and its pods are synced; "liveness" while it runs.
        "readinessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "readiness"},
            "initialDelaySeconds": 2,
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "liveness"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        },
        "securityContext": dict(_CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }


def _volumes(model: Model) -> list[dict]:
    volumes = [
        {"name": "config", "configMap": {"name": config_map_name(model)}},
        {
            "name": "tls",
            "secret": {
                "secretName": tls_secret(model),
                "defaultMode": 0o440,  # the key: readable by the picker's group (fsGroup) only
                "items": [
                    {"key": "tls.crt", "path": "tls.crt"},
                    {"key": "tls.key", "path": "tls.key"},
                    {"key": RESPONSE_ID_KEY, "path": RESPONSE_ID_KEY},
                ],
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    if fetches_tokenizer(model):
        volumes.append({"name": "tokenizer", "emptyDir": {"sizeLimit": "512Mi"}})
    return volumes


def deployment(
    model: Model,
    settings: PickerSettings,
    sockets: KVEventSockets = PER_POD,
    tls: PickerTLS | None = None,
) -> Deployment:
    labels = _pod_labels(model)
    pod_spec: dict = {
        "serviceAccountName": picker_name(model),
        "terminationGracePeriodSeconds": 30,
        # Replicas on different nodes where there are several: one node's loss leaves a picker.
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": dict(labels)},
            }
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_picker_container(model, settings, sockets)],
        "volumes": _volumes(model),
    }
    if fetches_tokenizer(model):
        pod_spec["initContainers"] = [_fetch_container(model, settings)]
    template_meta: dict = {"labels": dict(labels)}
    if tls is not None:  # the picker reads its certificate at start: a new one restarts it
        template_meta["annotations"] = {TLS_ANNOTATION: tls.cert_sha256}
    return Deployment(
        metadata=_meta(model, picker_name(model)),
        spec=DeploymentSpec(
            replicas=PICKER_REPLICAS,
            selector=LabelSelector(match_labels=dict(labels)),
            # A new replica must be ready (synced the pool) before an old one goes.
            strategy=DeploymentStrategy(
                type="RollingUpdate", rolling_update=RollingUpdate(max_surge=1, max_unavailable=0)
            ),
            template={"metadata": template_meta, "spec": pod_spec},
        ),
    )


# ---- Services and the disruption budget --------------------------------------------------------


def _port(name: str, number: int, app_protocol: str | None = None) -> ServicePort:
    """A Service port to the container port of the same name."""
    return ServicePort(
        name=name, port=number, target_port=name, protocol="TCP", app_protocol=app_protocol
    )


def service(model: Model) -> Service:
    """What the InferencePool's endpointPickerRef names, and Envoy's ext_proc cluster dials
    (one host per ready replica)."""
    meta = _meta(model, picker_name(model))
    meta.labels[COMPONENT_LABEL] = PICKER_COMPONENT  # what the pickers' ServiceMonitor selects
    return Service(
        metadata=meta,
        spec=ServiceSpec(
            type="ClusterIP",
            selector=_pod_labels(model),
            ports=[
                _port("grpc", PICKER_PORT, "http2"),
                _port(PICKER_METRICS_PORT_NAME, PICKER_METRICS_PORT, "http"),
            ],
        ),
    )


def replicas_headless_service(model: Model) -> Service:
    """The replicas, for each other: its EndpointSlices list each ready replica's pod IP with
    the port replica-sync, which --replica-sync-discovery watches."""
    return Service(
        metadata=_meta(model, replicas_service(model)),
        spec=ServiceSpec(
            cluster_ip="None",
            selector=_pod_labels(model),
            ports=[_port("replica-sync", REPLICA_SYNC_PORT)],
        ),
    )


def disruption_budget(model: Model) -> PodDisruptionBudget:
    """Voluntary disruptions (drains, upgrades) take at most one replica at a time."""
    return PodDisruptionBudget(
        metadata=_meta(model, picker_name(model)),
        spec=PodDisruptionBudgetSpec(
            min_available=1, selector=LabelSelector(match_labels=_pod_labels(model))
        ),
    )


# ---- the route -----------------------------------------------------------------------------------


def http_route(model: Model, route_parents: Sequence[ParentRef] = ()) -> HTTPRoute:
    """The Model's Gateway → its InferencePool, for the inference paths whose body's model
    the body-based router in front resolved to this pool: it sets MODEL_NAME_HEADER to the
    pool's name (the Model's), whichever name the client used — the served name, a LoRA
    adapter or a ModelRoute (bbr/) — or the one a stored response's id named.
    `route_parents`: the other Gateways of the ModelRoutes that target the Model
    (route_parents.py), attached after its own."""
    header = HeaderMatch(type="Exact", name=MODEL_NAME_HEADER, value=model.metadata.name or "")
    matches = [RouteMatch(path=path, headers=[header]) for path in ROUTE_PATHS]
    pool = BackendRef(
        group=POOL_GROUP_VERSION.rpartition("/")[0],
        kind="InferencePool",
        name=model.metadata.name or "",
    )
    return HTTPRoute(
        metadata=_meta(model, model.metadata.name or ""),
        spec=HTTPRouteSpec(
            parent_refs=merge_parents(
                gateway_of(model), list(route_parents), model.metadata.name or ""
            ),
            rules=[
                HTTPRouteRule(
                    matches=matches,
                    backend_refs=[pool],
                    timeouts=RouteTimeouts(request=ROUTE_TIMEOUT),
                )
            ],
        ),
    )


def tls_secret_object(model: Model, cert: ServingCert, response_id_key: bytes) -> Secret:
    """The Secret `m-epp-tls`, owned by the Model like the rest."""
    return picker_tls.secret(tls_secret_meta(model), cert, response_id_key)


def tls_secret_meta(model: Model) -> ObjectMeta:
    return _meta(model, tls_secret(model))


def writes_patch(model: Model) -> bool:
    """Whether the Model gets an EnvoyPatchPolicy: not when its Gateway is in another
    namespace, since Envoy Gateway reads the policy in the Gateway's namespace, where the
    Model cannot own it."""
    return gateway_of(model).namespace == (model.metadata.namespace or "default")


def patch_policy(model: Model, tls: PickerTLS) -> EnvoyPatchPolicy | None:
    """The Model's EnvoyPatchPolicy (picker_patch.py), or None when it writes none
    (writes_patch)."""
    if not writes_patch(model):
        return None
    gw = gateway_of(model)
    policy = picker_patch.envoy_patch_policy(
        model,
        picker_name(model),
        (gw.namespace, gw.name, gw.section_name),
        len(ROUTE_PATHS),  # http_route's matches, in its order
        tls.ca_bundle,
    )
    policy.metadata = _meta(model, picker_name(model))
    return policy


def desired(
    model: Model,
    settings: PickerSettings,
    sockets: KVEventSockets = PER_POD,
    tls: PickerTLS | None = None,
    route_parents: Sequence[ParentRef] = (),
) -> list[ApiStruct]:
    """The picker's objects, then the route and (with the picker's certificate made) the
    EnvoyPatchPolicy; the Role before its binding, the ConfigMap and the ServiceAccount before
    the Deployment that uses them. The Secret itself is written by the reconciler
    (picker_tls.py: its contents are new keys, not a function of the Model)."""
    patch = patch_policy(model, tls) if tls is not None else None
    return [
        service_account(model),
        role(model),
        role_binding(model),
        config_map(model),
        service(model),
        replicas_headless_service(model),
        deployment(model, settings, sockets, tls),
        disruption_budget(model),
        http_route(model, route_parents),
        *([patch] if patch is not None else []),
    ]
