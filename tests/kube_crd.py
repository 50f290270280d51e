"""CustomResourceDefinitions as the API emulator (tests/kubeapi.py) installs them: which
group/version/plural each serves, its scope and kind, its subresources and, per version, the
structural schema every write goes through.

By default the emulator installs ours (crds/*.yaml) and the upstream ones we ship
(crds/upstream/*.yaml); a test that needs another project's CRD (Volcano's PodGroup, …)
passes its file too (TEST_CRDS has the ones tests use).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.kube_schema import StructuralSchema
from tests.paths import FIXTURES, ROOT

Obj = dict[str, Any]
OUR_CRDS = tuple(sorted((ROOT / "crds").glob("*.yaml"))) + tuple(
    sorted((ROOT / "crds" / "upstream").glob("*.yaml"))
)
# Other projects' CRDs our controllers write to, reproduced for tests (see each file's header).
TEST_CRDS = tuple(sorted((FIXTURES / "crds").glob("*.yaml")))
DEFAULT_CRDS = OUR_CRDS + TEST_CRDS
# API groups kube-apiserver serves itself: objects of these need no CRD (and get no schema here).
BUILTIN_GROUPS = frozenset(
    {
        "",
        "admissionregistration.k8s.io",
        "apiextensions.k8s.io",
        "apps",
        "autoscaling",
        "batch",
        "certificates.k8s.io",
        "coordination.k8s.io",
        "discovery.k8s.io",
        "events.k8s.io",
        "networking.k8s.io",
        "node.k8s.io",
        "policy",
        "rbac.authorization.k8s.io",
        "scheduling.k8s.io",
        "storage.k8s.io",
    }
)


@dataclass(frozen=True)
class ScalePaths:
    """A scale subresource's JSON paths (CRD `subresources.scale`), dotted."""

    spec_replicas: str = ".spec.replicas"
    status_replicas: str = ".status.replicas"
    label_selector: str | None = ".status.labelSelector"


@dataclass(frozen=True)
class CustomResource:
    group: str
    kind: str
    plural: str
    namespaced: bool
    storage_version: str
    schemas: dict[str, StructuralSchema]  # served version -> schema
    status: bool  # has a status subresource
    scale: ScalePaths | None

    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}"


def load_crds(sources: Iterable[Path | Obj]) -> list[CustomResource]:
    """Each path may hold several YAML documents; non-CRD documents are ignored."""
    out = []
    for source in sources:
        docs = (
            [source] if isinstance(source, dict) else yaml.safe_load_all(Path(source).read_text())
        )
        for doc in docs:
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out.append(custom_resource(doc))
    return out


def custom_resource(crd: Obj) -> CustomResource:
    spec, name = crd["spec"], crd["metadata"]["name"]
    if name != f"{spec['names']['plural']}.{spec['group']}":
        raise ValueError(f"CRD {name}: the name must be <plural>.<group>")
    served = [v for v in spec["versions"] if v.get("served")]
    [storage] = [v["name"] for v in spec["versions"] if v.get("storage")]
    first = served[0] if served else spec["versions"][0]
    subresources = first.get("subresources") or {}
    scale = subresources.get("scale")
    return CustomResource(
        group=spec["group"],
        kind=spec["names"]["kind"],
        plural=spec["names"]["plural"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        storage_version=storage,
        schemas={
            v["name"]: StructuralSchema(
                v["schema"]["openAPIV3Schema"], f"{name}/{v['name']}.openAPIV3Schema"
            )
            for v in served
        },
        status="status" in subresources,
        scale=scale
        and ScalePaths(
            scale["specReplicasPath"], scale["statusReplicasPath"], scale.get("labelSelectorPath")
        ),
    )
