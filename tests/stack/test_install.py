"""`infergate install` and the kustomize base it reads (gateway-manifests/kustomization.yaml).

The stream holds our CRDs, the controllers with their webhook and the Gateway-side objects,
never the upstream CRDs; `kubectl kustomize gateway-manifests` renders the same objects;
built-in kinds pass the Kubernetes schemas (strict), custom resources pass their CRD's schema
and CEL rules through the API emulator's schema module; `--namespace` and `--gateway` reach
every value that spells them.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infergw.bbr.options import parse_options
from infergw.cli import main as cli_main
from infergw.stack.install import (
    CLUSTER_SCOPED,
    DEFAULT_NAMESPACE,
    Target,
    objects,
    render_upstream_crds,
    upstream_crds,
)
from tests.crd_eval import K8S_VERSION
from tests.kube_crd import BUILTIN_GROUPS, DEFAULT_CRDS, load_crds
from tests.paths import ROOT

KUBECTL = shutil.which("kubectl")
SYSTEM_NAMESPACE = "infergate-system"
# Kinds of other projects with no CRD here (Envoy Gateway's, cert-manager's, the Gateway API's
# but HTTPRoute): tests/test_manifests.py and tests/test_bbr_manifests.py check them field by
# field. A new kind in the install must be added here or get a schema.
NO_SCHEMA_HERE = {
    "Certificate",
    "Issuer",
    "Gateway",
    "GatewayClass",
    "BackendTLSPolicy",
    "ClientTrafficPolicy",
    "EnvoyExtensionPolicy",
    "EnvoyPatchPolicy",
    "HTTPRouteFilter",
}

Obj = dict[str, Any]


def _key(doc: Obj) -> tuple[str, str, str | None, str]:
    return (
        doc["apiVersion"],
        doc["kind"],
        doc["metadata"].get("namespace"),
        doc["metadata"]["name"],
    )


def _stream(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli_main(["install", *argv]) == 0
    return capsys.readouterr().out


def _docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


# ---- what is in the stream ----------------------------------------------------------------------


def test_the_stream_holds_our_crds_the_controllers_and_the_gateway_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = _docs(_stream([], capsys))
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ValidatingWebhookConfiguration"} <= kinds
    assert {"Gateway", "ClientTrafficPolicy", "EnvoyExtensionPolicy", "Issuer"} <= kinds
    crds = {d["spec"]["group"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"workload.infergate.io", "networking.infergate.io"}
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert deployments == {"infergate-controllers", "infergate-bbr"}
    assert len({_key(d) for d in docs}) == len(docs), "an object twice"


def test_the_upstream_crds_are_printed_alone_and_named_in_the_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _stream([], capsys)
    upstream = {d["metadata"]["name"] for p in upstream_crds() for d in _docs(p.read_text())}
    assert upstream and not upstream & {d["metadata"]["name"] for d in _docs(text)}
    comment = text.split("\n---", 1)[0]
    assert "infergate install --upstream-crds" in comment
    assert "|| kubectl create -f" in comment  # created only where `kubectl get` finds none
    alone = _docs(_stream(["--upstream-crds"], capsys))
    assert {d["metadata"]["name"] for d in alone} == upstream
    assert _docs(render_upstream_crds()) == alone


def test_a_bad_namespace_is_refused_with_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["install", "--namespace", "Prod/x"]) == 2
    assert "not a DNS-1123 label" in capsys.readouterr().err


# ---- namespace and Gateway name -----------------------------------------------------------------


def test_default_namespace_puts_every_namespaced_object_in_one_of_two() -> None:
    for doc in objects():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, _key(doc)
        else:
            assert namespace in (DEFAULT_NAMESPACE, SYSTEM_NAMESPACE), _key(doc)


def test_another_namespace_and_gateway_reach_every_value_that_spells_them() -> None:
    target = Target("prod", "edge")
    docs = list(objects(target))
    text = yaml.safe_dump_all(docs)
    # gateway-manifests/README.md's table: no value in the stream still says `default`
    assert not re.search(r"\bdefault/|\.default\.svc|owning-gateway-namespace: default", text)
    assert "infergate-bbr.prod.svc" in text
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] in ("prod", SYSTEM_NAMESPACE), _key(doc)
    gateways = [d for d in docs if d["kind"] == "Gateway"]
    assert [g["metadata"]["name"] for g in gateways] == ["edge"]
    refs = [
        ref
        for d in docs
        for ref in (d.get("spec") or {}).get("targetRefs", [])
        + (d.get("spec") or {}).get("parentRefs", [])
        if ref.get("kind", "Gateway") == "Gateway"
    ]
    assert refs and all(ref["name"] == "edge" for ref in refs)
    # an EnvoyPatchPolicy's single targetRef and the xDS names it patches follow too
    patch_policies = [d for d in docs if d["kind"] == "EnvoyPatchPolicy"]
    assert patch_policies
    for policy in patch_policies:
        assert policy["spec"]["targetRef"]["name"] == "edge"
        for patch in policy["spec"]["jsonPatches"]:
            if patch["type"].endswith(("Listener", "RouteConfiguration")):
                assert patch["name"] == "prod/edge/https", patch
    assert "httproute/prod/infergate-no-model/" in text
    # the controllers stay where they are, the GatewayClass keeps its name
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "GatewayClass"} == {
        "inference-gateway"
    }
    default = list(objects())
    system = [_key(d) for d in docs if d["metadata"].get("namespace") == SYSTEM_NAMESPACE]
    assert system and system == [
        _key(d) for d in default if d["metadata"].get("namespace") == SYSTEM_NAMESPACE
    ]


# ---- schemas: Kubernetes for built-in kinds, our CRDs' with CEL for custom resources -------------


def _rendered() -> list[tuple[str, Obj]]:
    docs = list(objects(Target("prod", "edge"))) + list(objects())
    return [
        (f"{d['kind']}/{d['metadata'].get('namespace')}/{d['metadata']['name']}", d) for d in docs
    ]


def _group(doc: Obj) -> str:
    return doc["apiVersion"].rpartition("/")[0] if "/" in doc["apiVersion"] else ""


_RENDERED = _rendered()  # once: the parametrizations below split one rendering
_BUILT_IN = [(w, d) for w, d in _RENDERED if _group(d) in BUILTIN_GROUPS]
_CUSTOM = [(w, d) for w, d in _RENDERED if _group(d) not in BUILTIN_GROUPS]


@pytest.mark.parametrize(("where", "doc"), _BUILT_IN, ids=[w for w, _ in _BUILT_IN])
def test_built_in_kind_passes_kubernetes_schema(where: str, doc: Obj) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {exc}")


def _schemas() -> dict[tuple[str, str], Any]:
    crds = load_crds([*DEFAULT_CRDS, *(ROOT / "crds").glob("*.yaml")])
    return {
        (f"{crd.group}/{version}", crd.kind): schema
        for crd in crds
        for version, schema in crd.schemas.items()
    }


def test_our_crds_in_the_stream_compile_with_their_cel_rules() -> None:
    crds = [d for _, d in _BUILT_IN if d["kind"] == "CustomResourceDefinition"]
    loaded = load_crds(crds)  # a rule that does not compile raises, as the API server refuses
    assert {c.kind for c in loaded} >= {"Model", "ModelInfer", "ModelRoute", "ModelServer"}


@pytest.mark.parametrize(("where", "doc"), _CUSTOM, ids=[w for w, _ in _CUSTOM])
def test_custom_resource_passes_its_crd_schema_with_cel(where: str, doc: Obj) -> None:
    schema = _schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        assert doc["kind"] in NO_SCHEMA_HERE, f"{where}: no CRD schema here and not listed"
        return
    pruned = copy.deepcopy(doc)
    dropped = schema.prune(pruned)
    assert dropped == [], f"{where}: fields a cluster would drop: {dropped}"
    errors = schema.validate(schema.default(pruned))
    assert errors == [], f"{where}: " + "; ".join(map(str, errors))


def test_some_custom_resource_is_checked_against_a_schema() -> None:
    checked = {d["kind"] for _, d in _CUSTOM if d["kind"] not in NO_SCHEMA_HERE}
    assert "HTTPRoute" in checked


# ---- the kustomize base renders the same objects ------------------------------------------------


def _normalized(doc: Obj) -> Obj:
    """What `kubectl apply -n default` makes of a kustomize object: its namespace set."""
    doc = copy.deepcopy(doc)
    if doc["kind"] not in CLUSTER_SCOPED:
        doc["metadata"].setdefault("namespace", DEFAULT_NAMESPACE)
    return doc


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: no `kubectl kustomize`")
def test_kubectl_kustomize_renders_what_infergate_install_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "gateway-manifests")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    kustomized = {_key(d): d for d in map(_normalized, _docs(done.stdout))}
    installed = {_key(d): d for d in _docs(_stream([], capsys))}
    assert sorted(kustomized, key=str) == sorted(installed, key=str)
    for key, doc in installed.items():
        assert kustomized[key] == doc, key


def test_every_route_and_policy_names_a_listener_the_gateway_has() -> None:
    """A parentRef's sectionName that no listener has leaves the route unattached."""
    for target in (Target(), Target("prod", "edge")):
        docs = list(objects(target))
        [gateway] = [d for d in docs if d["kind"] == "Gateway"]
        listeners = {listener["name"] for listener in gateway["spec"]["listeners"]}
        for doc in docs:
            spec = doc.get("spec") or {}
            single = [spec["targetRef"]] if "targetRef" in spec else []
            for ref in single + spec.get("parentRefs", []) + spec.get("targetRefs", []):
                if ref.get("kind", "Gateway") != "Gateway":
                    continue
                assert ref["name"] == gateway["metadata"]["name"], _key(doc)
                assert ref.get("sectionName", next(iter(listeners))) in listeners, _key(doc)


def _router_gateway(docs: list[dict]) -> str:
    """The router Deployment's --gateway, as `infergate bbr` reads it (namespace included)."""
    [router] = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "infergate-bbr"
    ]
    [container] = router["spec"]["template"]["spec"]["containers"]
    namespace = router["metadata"]["namespace"]
    args = [a.replace("$(POD_NAMESPACE)", namespace) for a in container["args"]]
    gateway = parse_options(args).gateway
    assert gateway is not None, "the installed router must know its Gateway"
    return str(gateway)


def _extension_policy_gateway(docs: list[dict]) -> str:
    [policy] = [
        d
        for d in docs
        if d["kind"] == "EnvoyExtensionPolicy" and d["metadata"]["name"] == "infergate-bbr"
    ]
    [ref] = policy["spec"]["targetRefs"]
    assert ref["kind"] == "Gateway"
    return f"{policy['metadata']['namespace']}/{ref['name']}"


@pytest.mark.parametrize("target", [Target(), Target("prod", "edge")], ids=str)
def test_the_router_runs_for_the_gateway_its_extension_policy_targets(target: Target) -> None:
    docs = list(objects(target))
    gateway = f"{target.namespace}/{target.gateway}"
    assert _router_gateway(docs) == _extension_policy_gateway(docs) == gateway
