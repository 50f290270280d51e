"""The cluster manifests: what a user `kubectl apply`s to run the request path with Envoy Gateway.

Checked without a cluster: every document parses; built-in kinds pass the Kubernetes 1.30 schemas
(strict, so a misspelt field fails); InferencePool and InferenceObjective documents in the repo
pass the openAPIV3Schema of our own CRDs, and broken ones fail it; the picker's ConfigMap and
Deployment args pass the picker's own config loader and flag parser; RBAC stays read-only and
namespaced; and the Envoy Gateway objects agree with each other and with the picker protocol.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infergw.api.names import (
    DESTINATION_HEADER,
    MODEL_REWRITE_HEADER,
    OBJECTIVE_HEADER,
    USER_HEADER,
)
from infergw.api.retries import retry_budget, retry_policy
from infergw.api.yaml_files import OWN_FILES_LOADER
from infergw.cluster.certs import serving_cert
from infergw.cluster.store import ENDPOINT_SLICE
from infergw.controllers.model_objects import CONNECTOR_SERVICE_ACCOUNT
from infergw.epp import protocol
from infergw.epp.app import HEALTH_SERVICES
from infergw.epp.director import TIMEOUT_HEADER
from infergw.epp.options import build_parser, parse_options
from infergw.epp.replica_peers import SYNC_PORT_NAME
from infergw.epp.scheduling.config import ConfigError, load_config
from infergw.stack.auth import removed_headers
from infergw.stack.envoy_config import ListenerTls, render
from infergw.stack.ports import StackPorts
from tests.envoy_settings import local_envoy_settings
from tests.paths import EXAMPLES, ROOT
from tests.schema_lint import list_errors, structural_errors

MANIFESTS = ROOT / "gateway-manifests"
CRDS = ROOT / "crds"

K8S_VERSION = "1.30"
# kustomize's own files (gateway-manifests/, crds/): not Kubernetes objects;
# tests/stack/test_install.py renders them
KUSTOMIZATION = "kustomization.yaml"
BUILT_IN_KINDS = {
    "ServiceAccount",
    "Secret",
    "Deployment",
    "Service",
    "ConfigMap",
    "Role",
    "RoleBinding",
    "CustomResourceDefinition",
    "ValidatingWebhookConfiguration",
    "NetworkPolicy",
    "PodDisruptionBudget",
}
CUSTOM_KINDS = {"InferencePool", "InferenceObjective"}
READ_ONLY_VERBS = {"get", "list", "watch"}
# The namespace the few values that must spell it (gateway-manifests/README.md's table) assume;
# the objects themselves name none, so `kubectl apply -n` or kustomize's `namespace:` sets it.
INSTALL_NAMESPACE = "default"
PICKER = "vllm-pool-epp"  # the picker's ServiceAccount, Role and RoleBinding


# ---- loading ------------------------------------------------------------------------------------


def _yaml_files(folder: Path, pattern: str = "*.yaml") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.name != KUSTOMIZATION)


def _manifest_files() -> list[Path]:
    return _yaml_files(MANIFESTS) + _yaml_files(CRDS, "**/*.yaml")


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=OWN_FILES_LOADER) if d is not None]


def _docs(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in paths:
        for i, doc in enumerate(_load(path)):
            yield f"{path.relative_to(ROOT)}#{i}", doc


def _manifests() -> list[dict[str, Any]]:
    # controllers.yaml: the controllers' own objects, checked by test_controllers_deploy.py
    paths = [p for p in _yaml_files(MANIFESTS) if p.name != "controllers.yaml"]
    return [doc for _, doc in _docs(paths)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in gateway-manifests/, got {found}"
    return found[0]


def _ids(items: list[tuple[str, Any]]) -> list[str]:
    return [where for where, _ in items]


# ---- every document parses ----------------------------------------------------------------------


def test_the_expected_files_are_there() -> None:
    names = {p.name for p in MANIFESTS.glob("*.yaml")}
    assert names >= {
        "gateway.yaml",
        "httproute.yaml",
        "inferencepool.yaml",
        "epp.yaml",
        "rbac.yaml",
        "envoy-extension-policy.yaml",
        "envoy-patch-policy.yaml",
        "client-traffic-policy.yaml",
        "epp-tls.yaml",
        "gateway-tls.yaml",
        "network-policies.yaml",
    }
    assert (CRDS / "upstream" / "inferencepool.yaml").is_file()
    assert (CRDS / "upstream" / "inferenceobjective.yaml").is_file()
    assert (MANIFESTS / "README.md").is_file()


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_document_parses(path: Path) -> None:
    docs = _load(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion and kind"
        assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no name"


# ---- built-in kinds against the Kubernetes schemas ----------------------------------------------

_BUILT_IN = [(w, d) for w, d in _docs(_manifest_files()) if d["kind"] in BUILT_IN_KINDS]


def test_built_in_kinds_are_all_there() -> None:
    kinds = {d["kind"] for _, d in _BUILT_IN}
    assert kinds == BUILT_IN_KINDS


@pytest.mark.parametrize(("where", "doc"), _BUILT_IN, ids=_ids(_BUILT_IN))
def test_built_in_kind_passes_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} ({doc['kind']} {doc['metadata']['name']}): {exc}")


# ---- our CRDs' schemas against the InferencePools and InferenceObjectives in the repo -----------


def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → the CRD version's openAPIV3Schema."""
    out = {}
    for _, doc in _docs(_yaml_files(CRDS, "**/*.yaml")):
        if doc["kind"] != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            out[key] = version["schema"]["openAPIV3Schema"]
    return out


# The CEL rules our CRDs carry (x-kubernetes-validations), in Python; the apiserver runs the
# CEL. A new rule must be added here, or the test fails.
_CEL: dict[str, Callable[[Any], bool]] = {
    "self.kind != 'Service' || has(self.port)": lambda o: (
        o.get("kind", "Service") != "Service" or "port" in o
    ),
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))": lambda ports: (
        len({p.get("number") for p in ports}) == len(ports)
    ),
}


def _cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The CEL rules of `schema` and its subschemas, through their Python equivalents."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        check = _CEL.get(rule["rule"])
        if check is None:
            errors.append(f"{path or '/'}: no Python equivalent for CEL rule {rule['rule']!r}")
        elif isinstance(value, dict | list) and not check(value):
            errors.append(f"{path or '/'}: {rule['message']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += _cel_errors(sub, item, f"{path}/{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}/{i}")
    return errors


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = _crds().get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"no CRD serves {doc.get('apiVersion')} {doc.get('kind')}"]
    # OpenAPI v3.0 schemas are JSON Schema draft 4 in what our CRDs use; x-kubernetes-*
    # keywords are unknown to it and ignored, then checked by list_errors and _cel_errors.
    validator = jsonschema.Draft4Validator(schema)
    errors = [
        f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    return errors + list_errors(schema, doc) + _cel_errors(schema, doc)


def _custom_resources() -> list[tuple[str, dict[str, Any]]]:
    paths = _yaml_files(MANIFESTS) + sorted(EXAMPLES.rglob("*.yaml"))
    return [(w, d) for w, d in _docs(paths) if d.get("kind") in CUSTOM_KINDS]


_CUSTOM = _custom_resources()


def test_crds_serve_the_upstream_api_versions() -> None:
    crds = {d["spec"]["names"]["kind"]: d for _, d in _docs(_yaml_files(CRDS, "**/*.yaml"))}
    pool = crds["InferencePool"]["spec"]
    assert pool["group"] == "inference.networking.k8s.io"
    assert pool["scope"] == "Namespaced"
    assert "infpool" in pool["names"]["shortNames"]
    assert pool["names"]["plural"] == "inferencepools"
    [v1] = pool["versions"]
    assert (v1["name"], v1["served"], v1["storage"]) == ("v1", True, True)
    assert v1["subresources"] == {"status": {}}
    objective = crds["InferenceObjective"]["spec"]
    assert objective["group"] == "llm-d.ai"
    assert objective["names"]["plural"] == "inferenceobjectives"
    assert [v["name"] for v in objective["versions"]] == ["v1alpha2"]


@pytest.mark.parametrize("key", sorted(_crds()), ids=lambda k: k[1])
def test_crd_schema_is_structural(key: tuple[str, str]) -> None:
    assert structural_errors(_crds()[key]) == []


def test_the_repo_pools_are_found() -> None:
    where = {w.split("#")[0] for w, _ in _CUSTOM}
    assert "gateway-manifests/inferencepool.yaml" in where


@pytest.mark.parametrize(("where", "doc"), _CUSTOM, ids=_ids(_CUSTOM))
def test_repo_custom_resource_passes_our_crd_schema(where: str, doc: dict[str, Any]) -> None:
    assert _schema_errors(doc) == [], where


def _example_pool() -> dict[str, Any]:
    return copy.deepcopy(_one("InferencePool", "vllm-pool"))


def _no_target_ports(pool: dict[str, Any]) -> None:
    del pool["spec"]["targetPorts"]


def _failure_mode_sometimes(pool: dict[str, Any]) -> None:
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"


def _nine_target_ports(pool: dict[str, Any]) -> None:
    pool["spec"]["targetPorts"] = [{"number": 8000 + i} for i in range(9)]


def _duplicate_target_port(pool: dict[str, Any]) -> None:
    pool["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]


def _port_zero(pool: dict[str, Any]) -> None:
    pool["spec"]["targetPorts"] = [{"number": 0}]


def _no_selector_labels(pool: dict[str, Any]) -> None:
    pool["spec"]["selector"]["matchLabels"] = {}


def _service_without_port(pool: dict[str, Any]) -> None:
    del pool["spec"]["endpointPickerRef"]["port"]


def _unknown_app_protocol(pool: dict[str, Any]) -> None:
    pool["spec"]["appProtocol"] = "grpc"


def _no_endpoint_picker_ref(pool: dict[str, Any]) -> None:
    del pool["spec"]["endpointPickerRef"]  # required until GIE v1.6.0


_BROKEN_POOLS = [
    _no_target_ports,
    _no_endpoint_picker_ref,
    _failure_mode_sometimes,
    _nine_target_ports,
    _duplicate_target_port,
    _port_zero,
    _no_selector_labels,
    _service_without_port,
    _unknown_app_protocol,
]


@pytest.mark.parametrize("breakage", _BROKEN_POOLS, ids=lambda f: f.__name__.lstrip("_"))
def test_broken_inference_pool_fails_our_crd_schema(breakage: Callable[..., None]) -> None:
    pool = _example_pool()
    assert _schema_errors(pool) == []
    breakage(pool)
    assert _schema_errors(pool), f"{breakage.__name__} passed the schema"


def test_inference_objective_schema() -> None:
    objective = {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": "batch", "namespace": "default"},
        "spec": {"priority": -1, "poolRef": {"name": "vllm-pool"}},
    }
    assert _schema_errors(objective) == []
    no_pool = copy.deepcopy(objective)
    del no_pool["spec"]["poolRef"]
    assert _schema_errors(no_pool)
    fractional = copy.deepcopy(objective)
    fractional["spec"]["priority"] = 1.5
    assert _schema_errors(fractional)


# ---- the picker: its config and flags through its own loader and parser -------------------------


def _picker() -> dict[str, Any]:
    return _one("Deployment", "vllm-pool-epp")


def _container() -> dict[str, Any]:
    [container] = _picker()["spec"]["template"]["spec"]["containers"]
    return container


def _picker_args() -> Any:
    container = _container()
    assert container["command"] == ["infergate", "epp"]
    assert container["image"] == "ghcr.io/infergate/infergate:latest"
    parser = build_parser()
    try:
        return parser.parse_args(container["args"])
    except SystemExit:
        pytest.fail(f"infergate epp rejects the Deployment's args: {container['args']}")


def _config_text() -> str:
    """The EndpointPickerConfig the Deployment passes with --config, read from its ConfigMap."""
    args = _picker_args()
    pod = _picker()["spec"]["template"]["spec"]
    config = PurePosixPath(str(args.config_file))
    [mount] = [
        m for m in _container()["volumeMounts"] if config.parent == PurePosixPath(m["mountPath"])
    ]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    assert config.name in config_map["data"], f"ConfigMap has no key {config.name}"
    return config_map["data"][config.name]


def test_endpoint_picker_config_loads_with_the_pickers_loader() -> None:
    text = _config_text()
    try:
        config = load_config(text)
    except ConfigError as exc:
        pytest.fail(f"the picker would not start with this EndpointPickerConfig: {exc}")
    raw = yaml.safe_load(text)
    assert raw["apiVersion"] == "llm-d.ai/v1alpha1"  # llm-d router's group since 2026
    assert raw["kind"] == "EndpointPickerConfig"
    [profile] = config.profiles.values()
    weights = {ws.scorer.type_name: ws.weight for ws in profile.scorers}
    assert weights == {
        "queue-scorer": 2.0,
        "kv-cache-utilization-scorer": 2.0,
        "least-request": 2.0,
        "prefix-cache-scorer": 3.0,
    }
    assert profile.picker is not None and profile.picker.type_name == "max-score-picker"


def test_the_loader_would_catch_a_broken_config() -> None:
    raw = yaml.safe_load(_config_text())
    raw["schedulingProfiles"][0]["plugins"][0]["pluginRef"] = "no-such-plugin"
    with pytest.raises(ConfigError):
        load_config(yaml.safe_dump(raw))


def test_deployment_args_parse_with_the_pickers_parser() -> None:
    args = _picker_args()
    pool = _one("InferencePool")
    assert args.provider == "kubernetes"
    assert args.pool_name == pool["metadata"]["name"]
    assert args.secure_serving is True
    assert (args.grpc_port, args.grpc_health_port, args.metrics_port) == (9002, 9003, 9090)
    assert args.refresh_metrics_interval == pytest.approx(0.05)
    # ORIGINAL_DST takes a single ip:port from x-gateway-destination-endpoint.
    assert args.fallback_endpoints == 0
    # $(VAR) in args is expanded by the kubelet from the container's env.
    env = {e["name"] for e in _container().get("env", [])}
    for arg in _container()["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{arg} refers to ${var}, which the container does not define"


def test_deployment_probes_ports_and_hardening() -> None:
    container = _container()
    pod = _picker()["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 9002, "grpc-health": 9003, "http-metrics": 9090, "replica-sync": 9004}
    assert container["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert container["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == _one("ServiceAccount", PICKER)["metadata"]["name"]


def test_picker_service_matches_pool_and_deployment() -> None:
    service = _one("Service", "vllm-pool-epp")
    pool = _one("InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref["name"] == service["metadata"]["name"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == ref["port"]["number"] == 9002
    assert ports["grpc"]["appProtocol"] == "http2"
    assert ports["http-metrics"]["port"] == 9090
    labels = _picker()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_picker_runs_active_active() -> None:
    """Several replicas, each a full picker: per-pod KV events (every replica connects to every
    pod; in central mode the pods would publish to one of them), a rollout that never leaves
    fewer ready replicas, and a PodDisruptionBudget that keeps one through drains."""
    spec = _picker()["spec"]
    replicas = spec["replicas"]
    assert replicas >= 2
    assert _picker_args().kv_events_mode == "per-pod"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = _one("PodDisruptionBudget", PICKER)
    labels = spec["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["spec"]["minAvailable"] < replicas  # a drain can still take one


def test_the_replicas_find_each_other_for_the_replica_sync() -> None:
    """Each replica binds its sync PUB on its pod IP at the container's replica-sync port, and
    follows the ready endpoints of a headless Service over the picker's pods whose port of
    that name leads there; the args pass the picker's own checks once the kubelet expands
    them."""
    container = _container()
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expanded = [
        a.replace("$(POD_IP)", "10.0.0.5").replace("$(POD_NAMESPACE)", "default")
        for a in container["args"]
    ]
    opts = parse_options([a for a in expanded if not a.startswith("--config=")])
    assert opts.replica_sync_bind == f"tcp://10.0.0.5:{ports[SYNC_PORT_NAME]}"
    assert opts.replica_sync_peers == ()
    service_ref = opts.replica_sync_discovery
    assert service_ref is not None and service_ref.namespace == "default"
    service = _one("Service", service_ref.name)
    assert service["metadata"].get("namespace") == _picker()["metadata"].get("namespace")
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: the pods' own addresses, no virtual IP
    assert not spec.get("publishNotReadyAddresses")  # only ready replicas are followed
    assert spec["selector"].items() <= _picker()["spec"]["template"]["metadata"]["labels"].items()
    [port] = spec["ports"]
    assert port["name"] == SYNC_PORT_NAME and port["targetPort"] == SYNC_PORT_NAME
    assert port["port"] == ports[SYNC_PORT_NAME]
    # Envoy's Service (the InferencePool's picker) does not carry the sync port.
    picker_service = _one("Service", "vllm-pool-epp")
    assert SYNC_PORT_NAME not in {p["name"] for p in picker_service["spec"]["ports"]}


def test_envoy_health_checks_and_ejects_each_picker_replica() -> None:
    """Envoy Gateway's ext_proc cluster holds one host per replica: each is actively checked
    (gRPC health on the port it dials, a service the picker serves there) and ejected at its
    first refused connection, so a dead replica gets no new stream."""
    [ext_proc] = _one("EnvoyExtensionPolicy")["spec"]["extProc"]
    check = ext_proc["backendSettings"]["healthCheck"]
    active = check["active"]
    assert active["type"] == "GRPC"
    assert active["grpc"]["service"] in HEALTH_SERVICES
    assert active["unhealthyThreshold"] >= 2  # one slow check does not take a picker down
    passive = check["passive"]
    assert passive["splitExternalLocalOriginErrors"] is True
    assert passive["consecutiveLocalOriginFailures"] == 1
    assert passive["maxEjectionPercent"] == 100  # every replica may be ejected (then fail)
    # The readiness the kubelet probes is the one Envoy checks.
    assert _container()["readinessProbe"]["grpc"]["service"] == active["grpc"]["service"]


# ---- RBAC: read-only, namespaced ----------------------------------------------------------------


def test_no_cluster_wide_rbac() -> None:
    kinds = {d["kind"] for d in _manifests()}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


def test_role_grants_only_read_verbs_on_what_the_picker_reads() -> None:
    roles = [d for d in _manifests() if d["kind"] == "Role"]
    assert roles
    granted = set()
    for role in roles:
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= READ_ONLY_VERBS, rule
            assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
            granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    # Everything the Kubernetes provider and the replicas' discovery list or watch, and
    # nothing else.
    from infergw.epp.providers.kubernetes import OPTIONAL_KINDS

    assert granted == {
        ("", "pods"),
        ("inference.networking.k8s.io", "inferencepools"),
        *((kind.group, kind.plural) for kind in OPTIONAL_KINDS.values()),
        (ENDPOINT_SLICE.group, ENDPOINT_SLICE.plural),
    }


@pytest.mark.parametrize("name", [PICKER, CONNECTOR_SERVICE_ACCOUNT])
def test_role_binding_binds_its_service_account(name: str) -> None:
    binding = _one("RoleBinding", name)
    account = _one("ServiceAccount", name)
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["roleRef"]["name"] == _one("Role", name)["metadata"]["name"]
    # no namespace on either: the subject is the binding's namespace's ServiceAccount
    assert "namespace" not in account["metadata"] and "namespace" not in binding["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]


def test_the_decode_sidecar_reads_only_its_pool_and_pods() -> None:
    rules = _one("Role", CONNECTOR_SERVICE_ACCOUNT)["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}  # fmt: skip
    assert granted == {
        (group, resource, verb)
        for group, resource in (("", "pods"), ("inference.networking.k8s.io", "inferencepools"))
        for verb in READ_ONLY_VERBS
    }


# ---- Envoy Gateway wiring -----------------------------------------------------------------------


def _listener(gateway: dict[str, Any], name: str) -> dict[str, Any]:
    [listener] = [lst for lst in gateway["spec"]["listeners"] if lst["name"] == name]
    return listener


def test_httproute_sends_v1_to_the_inference_pool() -> None:
    route = _one("HTTPRoute")
    gateway = _one("Gateway")
    [parent] = route["spec"]["parentRefs"]
    assert parent["name"] == gateway["metadata"]["name"]
    assert _listener(gateway, parent["sectionName"])["protocol"] == "HTTPS"
    [rule] = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    [backend] = rule["backendRefs"]
    assert backend["kind"] == "InferencePool"
    assert backend["group"] == "inference.networking.k8s.io"
    assert backend["name"] == _one("InferencePool")["metadata"]["name"]
    assert rule["timeouts"]["request"]


def test_gateway_uses_envoy_gateway() -> None:
    gateway_class = _one("GatewayClass")
    gateway = _one("Gateway")
    assert (
        gateway_class["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    )
    assert gateway["spec"]["gatewayClassName"] == gateway_class["metadata"]["name"]


# ---- HTTPS for clients --------------------------------------------------------------------------


def test_clients_reach_the_gateway_by_https_only() -> None:
    """One listener, HTTPS on 443, terminating TLS with a kubernetes.io/tls Secret; no plain
    HTTP listener (nor a redirect from one: the key would cross in the clear first)."""
    gateway = _one("Gateway")
    [listener] = gateway["spec"]["listeners"]
    assert (listener["protocol"], listener["port"]) == ("HTTPS", 443)
    assert listener["tls"]["mode"] == "Terminate"
    [ref] = listener["tls"]["certificateRefs"]
    assert (ref["group"], ref["kind"]) == ("", "Secret")
    assert "namespace" not in ref  # the Gateway's own: no ReferenceGrant needed


def test_the_gateways_certificate_is_cert_manager_ready() -> None:
    """gateway-tls.yaml's Certificate writes the Secret the listener serves: a server
    certificate (not a CA) from an Issuer the user names, for the names clients dial."""
    gateway = _one("Gateway")
    [ref] = _listener(gateway, "https")["tls"]["certificateRefs"]
    [cert] = [d for d in _load(MANIFESTS / "gateway-tls.yaml") if d["kind"] == "Certificate"]
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["metadata"].get("namespace") == gateway["metadata"].get("namespace")
    assert cert["spec"]["secretName"] == ref["name"]
    assert "server auth" in cert["spec"]["usages"] and not cert["spec"].get("isCA")
    assert cert["spec"]["dnsNames"]
    issuer = cert["spec"]["issuerRef"]
    assert issuer["group"] == "cert-manager.io"
    assert issuer["kind"] in ("Issuer", "ClusterIssuer")
    # The issuer is the user's: a placeholder the file's header explains, no Issuer shipped.
    assert "REPLACE" in issuer["name"]
    assert not [
        d
        for d in _manifests()
        if d["kind"] in ("Issuer", "ClusterIssuer") and d["metadata"]["name"] == issuer["name"]
    ]


def test_the_https_listener_negotiates_what_the_local_stack_does(tmp_path: Path) -> None:
    """TLS 1.2 or later and ALPN h2, http/1.1 on the Gateway, as the local Envoy's client
    listener with `infergate up --tls`."""
    tls = _one("ClientTrafficPolicy")["spec"]["tls"]
    made = serving_cert(("127.0.0.1",)).write(tmp_path)
    listener_tls = ListenerTls(made / "tls.crt", made / "tls.key")
    config = yaml.safe_load(render(local_envoy_settings(listener_tls=listener_tls)))
    [listener] = config["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    local = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert (
        f"TLSv{tls['minVersion'].replace('.', '_')}"
        == (local["tls_params"]["tls_minimum_protocol_version"])
    )
    assert tls["alpnProtocols"] == local["alpn_protocols"]


def test_extension_policy_streams_both_bodies_to_the_picker() -> None:
    policy = _one("EnvoyExtensionPolicy")
    route = _one("HTTPRoute")
    assert {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}.items() <= policy["spec"][
        "targetRefs"
    ][0].items()
    assert policy["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    [ext_proc] = policy["spec"]["extProc"]
    mode = ext_proc["processingMode"]
    assert mode["request"]["body"] == "FullDuplexStreamed"
    assert mode["response"]["body"] == "FullDuplexStreamed"
    # Envoy ignores mode_override while the request body is FULL_DUPLEX_STREAMED
    # (tests/e2e/test_extproc_modes.py): allowing it would promise what does not happen.
    assert "allowModeOverride" not in mode
    assert ext_proc["failOpen"] is False
    assert ext_proc["messageTimeout"] == "1000s"
    [backend] = ext_proc["backendRefs"]
    assert (backend["kind"], backend["name"], backend["port"]) == ("Service", "vllm-pool-epp", 9002)
    assert protocol.LB_NAMESPACE in ext_proc["metadata"]["writableNamespaces"]
    assert set(ext_proc["metadata"]["accessibleNamespaces"]) == {
        protocol.LB_NAMESPACE,
        protocol.SUBSET_NAMESPACE,
    }


def test_patch_policy_routes_by_the_pickers_header() -> None:
    policy = _one("EnvoyPatchPolicy")
    gateway = _one("Gateway")
    assert policy["spec"]["type"] == "JSONPatch"
    assert policy["spec"]["targetRef"]["kind"] == "Gateway"
    assert policy["spec"]["targetRef"]["name"] == gateway["metadata"]["name"]
    patches = {(p["type"].rsplit(".", 1)[-1], p["name"]): p for p in policy["spec"]["jsonPatches"]}

    cluster = patches[("Cluster", "original_destination_cluster")]["operation"]["value"]
    assert cluster["type"] == "ORIGINAL_DST"
    assert cluster["lb_policy"] == "CLUSTER_PROVIDED"
    assert cluster["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": DESTINATION_HEADER,
    }

    # Envoy Gateway names the route configuration <namespace>/<gateway>/<listener>.
    ns, name = gateway["metadata"].get("namespace", INSTALL_NAMESPACE), gateway["metadata"]["name"]
    listener = gateway["spec"]["listeners"][0]["name"]
    xds_name = f"{ns}/{name}/{listener}"
    route_patches = {
        p["operation"]["path"]: p["operation"]
        for p in policy["spec"]["jsonPatches"]
        if p["type"].endswith("RouteConfiguration")
    }
    route = route_patches["/virtual_hosts/0/routes/0/route/cluster"]
    assert route["value"] == "original_destination_cluster"

    # TLS to the picker comes from the BackendTLSPolicy (verified), never from a patch.
    assert set(patches) == {
        ("Cluster", "original_destination_cluster"),
        ("RouteConfiguration", xds_name),
        ("Listener", xds_name),
    }
    assert "transport_socket" not in yaml.safe_dump(policy)


def test_patch_policy_retries_what_the_local_stack_retries() -> None:
    policy = _one("EnvoyPatchPolicy")
    ops = [p["operation"] for p in policy["spec"]["jsonPatches"]]
    [retry] = [o for o in ops if o["path"].endswith("/route/retry_policy")]
    assert retry["op"] == "add"
    assert retry["value"] == retry_policy(retry["value"]["num_retries"])
    assert retry["value"]["num_retries"] >= 1
    [cluster] = [o["value"] for o in ops if o.get("value", {}) and "type" in o["value"]]
    [threshold] = cluster["circuit_breakers"]["thresholds"]
    assert threshold["retry_budget"] == retry_budget()


def test_patch_policy_lets_the_picker_set_the_request_timeout() -> None:
    """The ModelServer's timeout reaches Envoy as x-envoy-upstream-rq-timeout-ms, which
    ext_proc passes on only with mutation_rules.allow_envoy: the patch must name the filter
    Envoy Gateway makes of our EnvoyExtensionPolicy, on the Gateway's listener."""
    policy = _one("EnvoyPatchPolicy")
    extension = _one("EnvoyExtensionPolicy")
    gateway = _one("Gateway")
    meta = extension["metadata"]
    assert len(extension["spec"]["extProc"]) == 1
    namespace = meta.get("namespace", "default")  # spelled out: the README's namespace table
    filter_name = (
        f"envoy.filters.http.ext_proc/envoyextensionpolicy/{namespace}/{meta['name']}/extproc/0"
    )
    listener = (
        f"{gateway['metadata'].get('namespace', 'default')}/{gateway['metadata']['name']}/"
        f"{gateway['spec']['listeners'][0]['name']}"
    )
    [patch] = [p for p in policy["spec"]["jsonPatches"] if p["type"].endswith("Listener")]
    assert patch["name"] == listener
    operation = patch["operation"]
    assert operation["jsonPath"] == f"..http_filters[?(@.name=='{filter_name}')]"
    assert (operation["op"], operation["path"]) == ("add", "/typed_config/mutation_rules")
    assert operation["value"] == {"allow_envoy": True}
    # What the picker sets is what that rule lets through.
    assert TIMEOUT_HEADER.startswith("x-envoy-")


def test_namespaced_objects_name_no_namespace_but_the_controllers() -> None:
    cluster_scoped = {"GatewayClass", "ValidatingWebhookConfiguration"}
    # The picker's objects go where they are applied; the controllers' (webhook.yaml) live in
    # infergate-system.
    namespaces = {
        d["metadata"].get("namespace") for d in _manifests() if d["kind"] not in cluster_scoped
    }
    assert namespaces == {None, "infergate-system"}


# A value that spells the install namespace: `default/…`, `….default.svc`, a label or flag.
_NAMESPACE_VALUE = re.compile(r"\bdefault/|\.default\.svc|namespace: default\b|-n default\b")


def test_every_value_that_names_the_namespace_is_documented() -> None:
    """What a user installing elsewhere must change is in the README's table, all of it."""
    readme = (MANIFESTS / "README.md").read_text()
    table = readme.split("still say the namespace", 1)[1].split("\n\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z-]+\.yaml)`", table))
    spelled = {
        path.name
        for path in _yaml_files(MANIFESTS)
        if path.name not in ("controllers.yaml", "webhook.yaml")
        and _NAMESPACE_VALUE.search(path.read_text())
    }
    assert spelled - documented == set()


# ---- headers a client may not set ---------------------------------------------------------------


def test_client_traffic_policy_strips_what_the_local_stack_strips_on_every_route() -> None:
    policy = _one("ClientTrafficPolicy")
    gateway = _one("Gateway")
    # The Gateway, not a route: every route and path on it.
    [target] = policy["spec"]["targetRefs"]
    assert (target["group"], target["kind"], target["name"]) == (
        "gateway.networking.k8s.io",
        "Gateway",
        gateway["metadata"]["name"],
    )
    assert policy["metadata"].get("namespace") == gateway["metadata"].get("namespace")
    # Early header mutation: before routing, auth and the picker's ext_proc filter.
    assert set(policy["spec"]["headers"]) == {"earlyRequestHeaders"}
    early = policy["spec"]["headers"]["earlyRequestHeaders"]
    assert set(early) == {"remove"}
    assert sorted(early["remove"]) == removed_headers(None)
    assert {USER_HEADER, MODEL_REWRITE_HEADER, OBJECTIVE_HEADER} <= set(early["remove"])


def test_client_traffic_policy_bounds_the_request_as_the_local_envoy_does() -> None:
    policy = _one("ClientTrafficPolicy")
    local = (MANIFESTS / "local" / "envoy.yaml.j2").read_text()
    [local_timeout] = re.findall(r"^\s*request_timeout: (\S+)$", local, re.M)
    assert policy["spec"]["timeout"]["http"]["requestReceivedTimeout"] == local_timeout != "0s"


# ---- TLS to the picker: our CA, verified by Envoy -------------------------------------------


def _issuer(ref: dict[str, Any]) -> dict[str, Any]:
    assert (ref.get("group"), ref.get("kind")) == ("cert-manager.io", "Issuer"), ref
    return _one("Issuer", ref["name"])


def test_the_pickers_certificate_comes_from_our_ca_and_is_what_it_serves() -> None:
    args = _picker_args()
    assert args.secure_serving is True and args.cert_path is not None
    pod = _picker()["spec"]["template"]["spec"]
    [mount] = [
        m for m in _container()["volumeMounts"] if PurePosixPath(m["mountPath"]) == args.cert_path
    ]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert {i["key"] for i in secret["items"]} == {"tls.crt", "tls.key"}
    [cert] = [
        c
        for c in _manifests()
        if c["kind"] == "Certificate" and c["spec"]["secretName"] == secret["secretName"]
    ]
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert "server auth" in cert["spec"]["usages"]
    assert not cert["spec"].get("isCA")
    # Signed by a CA Issuer whose key is a self-signed CA Certificate's.
    ca_issuer = _issuer(cert["spec"]["issuerRef"])
    [ca] = [
        c
        for c in _manifests()
        if c["kind"] == "Certificate"
        and c["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"]
    ]
    assert ca["spec"]["isCA"] is True
    assert "selfSigned" in _issuer(ca["spec"]["issuerRef"])["spec"]


def test_envoy_verifies_the_picker_by_our_ca_and_the_service_name() -> None:
    policy = _one("BackendTLSPolicy")
    service = _one("Service", "vllm-pool-epp")
    pool = _one("InferencePool")
    assert policy["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert policy["metadata"].get("namespace") == service["metadata"].get("namespace")
    # The Service port the pool's endpointPickerRef names (ext_proc).
    [target] = policy["spec"]["targetRefs"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == target["sectionName"]]
    assert (target["group"], target["kind"], target["name"]) == ("", "Service", "vllm-pool-epp")
    assert port["port"] == pool["spec"]["endpointPickerRef"]["port"]["number"]
    # The name Envoy dials is the certificate's SAN, and the CA is the one that signed it.
    validation = policy["spec"]["validation"]
    assert set(validation) == {"caCertificateRefs", "hostname"}  # no well-known CAs
    meta = service["metadata"]
    assert validation["hostname"] == f"{meta['name']}.{INSTALL_NAMESPACE}.svc"
    [ca_ref] = validation["caCertificateRefs"]
    assert (ca_ref["group"], ca_ref["kind"]) == ("", "Secret")
    [cert] = [
        c
        for c in _manifests()
        if c["kind"] == "Certificate" and c["spec"]["secretName"] == ca_ref["name"]
    ]  # cert-manager's ca.crt in it
    assert not cert["spec"].get("isCA")
    assert validation["hostname"] in cert["spec"]["dnsNames"]


# ---- NetworkPolicies ----------------------------------------------------------------------------

ENVOY_PODS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "envoy-gateway-system"}},
    "podSelector": {
        "matchLabels": {
            "gateway.envoyproxy.io/owning-gateway-name": "inference-gateway",
            "gateway.envoyproxy.io/owning-gateway-namespace": INSTALL_NAMESPACE,
        }
    },
}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
# the autoscaler reads the pickers' held requests (scale from zero)
CONTROLLERS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "infergate-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "infergate-controllers"}},
}


def _network_policy(selects: dict[str, str]) -> dict[str, Any]:
    [policy] = [
        d
        for d in _manifests()
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"].items() <= selects.items()
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy


def _admitted(policy: dict[str, Any]) -> dict[tuple[Any, Any], list[dict[str, Any]]]:
    """(port, endPort) → the peers that may connect to it. Every rule names both its peers and
    its ports (a rule without them admits everyone), and no peer selects everything."""
    out: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), rule
        for peer in rule["from"]:
            for selector in peer.values():
                assert selector.get("matchLabels"), f"{peer} selects everything"
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            out.setdefault((port["port"], port.get("endPort")), []).extend(rule["from"])
    return out


def test_the_envoy_peer_is_the_gateways_proxy() -> None:
    gateway = _one("Gateway")
    labels = ENVOY_PODS["podSelector"]["matchLabels"]
    assert labels["gateway.envoyproxy.io/owning-gateway-name"] == gateway["metadata"]["name"]
    assert labels["gateway.envoyproxy.io/owning-gateway-namespace"] == gateway["metadata"].get(
        "namespace", INSTALL_NAMESPACE
    )


def test_only_envoy_reaches_ext_proc_and_only_monitoring_and_the_controllers_the_metrics() -> None:
    labels = _picker()["spec"]["template"]["metadata"]["labels"]
    pool_pods = {"podSelector": _one("InferencePool")["spec"]["selector"]}
    admitted = _admitted(_network_policy(labels))
    # Named ports resolve to the picker container's ports.
    ports = {p["name"] for p in _container()["ports"]}
    assert {p for p, _ in admitted if isinstance(p, str)} <= ports
    kv_bind = _picker_args().kv_events_bind
    pickers = {"podSelector": {"matchLabels": _one("Service", "vllm-pool-epp")["spec"]["selector"]}}
    assert admitted == {
        ("grpc", None): [ENVOY_PODS],
        ("http-metrics", None): [MONITORING, CONTROLLERS],
        (int(kv_bind.rsplit(":", 1)[1]), None): [pool_pods],  # central mode's SUB
        (SYNC_PORT_NAME, None): [pickers],  # the replica sync's PUB: other pickers only
    }


def test_model_pods_admit_envoy_the_picker_and_the_pool_only() -> None:
    pool = _one("InferencePool")
    picker = {"podSelector": {"matchLabels": _one("Service", "vllm-pool-epp")["spec"]["selector"]}}
    admitted = _admitted(_network_policy(pool["spec"]["selector"]["matchLabels"]))
    [target_port] = [p["number"] for p in pool["spec"]["targetPorts"]]
    defaults = _picker_args()
    pub, replay = defaults.kv_events_pub_port, StackPorts().kv_replay_base
    assert admitted == {
        (target_port, None): [ENVOY_PODS, picker, {"podSelector": pool["spec"]["selector"]}],
        (pub, pub + 7): [picker],  # per-pod mode: ranks 0-7
        (replay, replay + 7): [picker],
    }


def _rule_without_peers(policy: dict[str, Any]) -> None:
    del policy["spec"]["ingress"][0]["from"]


def _rule_without_ports(policy: dict[str, Any]) -> None:
    del policy["spec"]["ingress"][1]["ports"]


def _peer_selecting_every_pod(policy: dict[str, Any]) -> None:
    policy["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]


@pytest.mark.parametrize(
    "breakage",
    [_rule_without_peers, _rule_without_ports, _peer_selecting_every_pod],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_the_checks_catch_a_network_policy_that_admits_everyone(breakage) -> None:
    policy = copy.deepcopy(_network_policy(_picker()["spec"]["template"]["metadata"]["labels"]))
    _admitted(policy)
    breakage(policy)
    with pytest.raises(AssertionError):
        _admitted(policy)


def test_the_kubernetes_schema_catches_a_misspelt_network_policy() -> None:
    policy = copy.deepcopy(_network_policy(_picker()["spec"]["template"]["metadata"]["labels"]))
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
