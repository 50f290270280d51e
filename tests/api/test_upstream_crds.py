"""crds/upstream/: the InferencePool and InferenceObjective CRDs reproduce their upstream
releases field for field.

Each is compared with a table of the release's facts (tests/fixtures/upstream_crds/: the CRD's
name, annotations, names, versions and printer columns, and every schema node's keywords but
`description`), transcribed from the release's CRD and API reference apart from our file, so
an edit that drifts from upstream fails here. The CRDs also pass the apiextensions schema, their
CEL rules behave as upstream's, and a protected *.k8s.io group carries the api-approved
annotation the API server demands.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.crd_eval import K8S_VERSION, apply_defaults, cel_errors, needs_cel
from tests.paths import ROOT

UPSTREAM = ROOT / "crds" / "upstream"
FIXTURES = ROOT / "tests" / "fixtures" / "upstream_crds"

# our file → the release table it must match
RELEASES = {
    "inferencepool.yaml": "inferencepool-v1.5.0.yaml",
    "inferenceobjective.yaml": "inferenceobjective-llm-d-v0.10.0.yaml",
}

Obj = dict[str, Any]

PROTECTED = ("k8s.io", "kubernetes.io")  # and their subdomains


def _load(path: Path) -> Obj:
    return yaml.safe_load(path.read_text())


def _crd(name: str) -> Obj:
    return _load(UPSTREAM / name)


def identity(crd: Obj) -> Obj:
    """What the release table says of the CRD outside its schema."""
    spec = crd["spec"]
    annotations = dict(crd["metadata"].get("annotations") or {})
    return {
        "name": crd["metadata"]["name"],
        "annotations": annotations,
        "group": spec["group"],
        "scope": spec["scope"],
        "names": {"shortNames": [], **spec["names"]},
        "versions": [
            {
                "name": v["name"],
                "served": v["served"],
                "storage": v["storage"],
                "subresources": v.get("subresources", {}),
                "additionalPrinterColumns": v.get("additionalPrinterColumns", []),
            }
            for v in spec["versions"]
        ],
    }


def schema_table(schema: Obj, path: str = ".") -> dict[str, Obj]:
    """Every node of an openAPIV3Schema by path (`a.b` a property, `a[]` the items, `a{}` the
    additionalProperties), with every keyword but description and the child keywords."""
    children = {"properties", "items", "additionalProperties", "description"}
    table = {path: {k: v for k, v in schema.items() if k not in children}}
    prefix = "" if path == "." else f"{path}."
    for key, sub in schema.get("properties", {}).items():
        table |= schema_table(sub, f"{prefix}{key}")
    if "items" in schema:
        table |= schema_table(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        table |= schema_table(schema["additionalProperties"], f"{path}{{}}")
    return table


def drift(crd: Obj, release: Obj) -> list[str]:
    """How our CRD differs from the release table; empty when it reproduces it."""
    problems = []
    ours = identity(crd)
    for key, want in release["crd"].items():
        if ours[key] != want:
            problems.append(f"{key}: ours {ours[key]!r}, release {want!r}")
    [version] = crd["spec"]["versions"]
    table = schema_table(version["schema"]["openAPIV3Schema"])
    for path in sorted(table.keys() | release["schema"].keys()):
        have, want = table.get(path), release["schema"].get(path)
        if have != want:
            problems.append(f"schema {path}: ours {have!r}, release {want!r}")
    return problems


@pytest.mark.parametrize(("ours", "release"), RELEASES.items())
def test_crd_reproduces_its_upstream_release(ours: str, release: str) -> None:
    assert drift(_crd(ours), _load(FIXTURES / release)) == []


SPEC = "spec.versions.0.schema.openAPIV3Schema.properties.spec"
PICKER_COLUMN = {"name": "Picker", "type": "string", "jsonPath": ".spec.endpointPickerRef.name"}


# The differences the old hand copy had.
@pytest.mark.parametrize(
    ("path", "change"),
    [
        (
            f"{SPEC}.properties.targetPorts",
            {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["number"]},
        ),
        (f"{SPEC}.properties.appProtocol", {"default": None}),
        (SPEC, {"required": ["selector", "targetPorts"]}),
        ("metadata.annotations", {"api-approved.kubernetes.io": None}),
        ("spec.versions.0", {"additionalPrinterColumns": [PICKER_COLUMN]}),
    ],
)
def test_drift_from_the_release_is_caught(path: str, change: Obj) -> None:
    crd = copy.deepcopy(_crd("inferencepool.yaml"))
    node: Any = crd
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    for key, value in change.items():
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    assert drift(crd, _load(FIXTURES / RELEASES["inferencepool.yaml"]))


@pytest.mark.parametrize("name", RELEASES)
def test_crd_passes_the_apiextensions_schema(name: str) -> None:
    try:
        kubernetes_validate.validate(_crd(name), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {exc}")


@pytest.mark.parametrize("name", RELEASES)
def test_a_protected_group_carries_the_api_approval(name: str) -> None:
    """kube-apiserver refuses a CRD in *.k8s.io or *.kubernetes.io without the annotation."""
    crd = _crd(name)
    group = crd["spec"]["group"]
    approval = (crd["metadata"].get("annotations") or {}).get("api-approved.kubernetes.io")
    protected = group.endswith((".k8s.io", ".kubernetes.io")) or group in PROTECTED
    if protected:
        assert approval and approval.startswith("https://github.com/"), approval
    else:
        assert approval is None


@pytest.mark.parametrize("name", RELEASES)
def test_the_file_says_how_to_install_without_overwriting_upstream(name: str) -> None:
    text = (UPSTREAM / name).read_text()
    crd_name = _crd(name)["metadata"]["name"]
    assert f"kubectl get crd {crd_name} >/dev/null 2>&1" in text
    assert f"|| kubectl create -f crds/upstream/{name}" in text


def _pool() -> Obj:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": 8000}, {"number": 8001}],
            "endpointPickerRef": {"name": "p-epp", "port": {"number": 9002}},
        },
    }


def _pool_errors(pool: Obj) -> list[str]:
    [version] = _crd("inferencepool.yaml")["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    return cel_errors(schema, apply_defaults(schema, copy.deepcopy(pool)))


@needs_cel
def test_the_pool_cel_rules_behave_as_upstream() -> None:
    assert _pool_errors(_pool()) == []
    duplicate = _pool()
    duplicate["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    assert _pool_errors(duplicate) == ["spec.targetPorts: port number must be unique"]
    no_port = _pool()
    del no_port["spec"]["endpointPickerRef"]["port"]
    assert _pool_errors(no_port) == [
        "spec.endpointPickerRef: port is required when kind is 'Service' or unspecified "
        "(defaults to 'Service')"
    ]
    other_kind = copy.deepcopy(no_port)
    other_kind["spec"]["endpointPickerRef"]["kind"] = "Backend"
    assert _pool_errors(other_kind) == []


def test_defaults_are_upstreams() -> None:
    [version] = _crd("inferencepool.yaml")["spec"]["versions"]
    pool = apply_defaults(version["schema"]["openAPIV3Schema"], _pool())
    assert pool["spec"]["appProtocol"] == "http"
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["group"], ref["kind"], ref["failureMode"]) == ("", "Service", "FailClose")


def test_what_we_write_uses_llm_d_groups() -> None:
    """InferenceObjective and EndpointPickerConfig moved to llm-d.ai: the manifests, examples
    and the picker's default config name it (the older group is only read)."""
    from infergw.epp.scheduling.config import DEFAULT_CONFIG

    written = sorted((ROOT / "gateway-manifests").rglob("*.yaml"))
    written += sorted((ROOT / "examples").rglob("*.yaml"))
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in written}
    texts["DEFAULT_CONFIG"] = DEFAULT_CONFIG
    assert "kind: EndpointPickerConfig" in texts["DEFAULT_CONFIG"]
    stale = [where for where, text in texts.items() if "inference.networking.x-k8s.io/" in text]
    assert stale == []
    objectives = [
        doc
        for path in written
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "InferenceObjective"
    ]
    assert objectives and {o["apiVersion"] for o in objectives} == {"llm-d.ai/v1alpha2"}
