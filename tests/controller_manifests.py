"""The controllers' deployment manifests (gateway-manifests/controllers.yaml) as documents, and
RBAC as kube-apiserver evaluates it over them: what a ServiceAccount may do. Shared by the
manifest checks and the kubernetes-mode CLI test, whose API emulator authorizes with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infergw.api.yaml_files import OWN_FILES_LOADER
from tests.paths import ROOT

MANIFESTS = ROOT / "gateway-manifests"
CONTROLLERS_YAML = MANIFESTS / "controllers.yaml"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=OWN_FILES_LOADER) if d is not None]


def docs() -> list[dict[str, Any]]:
    return load(CONTROLLERS_YAML)


Grant = tuple[str, str, str]  # apiGroup, resource[/subresource], verb


@dataclass(slots=True)
class Authorizer:
    """What a ServiceAccount may do through the (Cluster)RoleBindings among `documents`:
    ClusterRole rules bound by a ClusterRoleBinding hold in every namespace, Role rules bound
    by a RoleBinding in that namespace only. No wildcards: the manifests use none."""

    cluster: set[Grant] = field(default_factory=set)
    namespaced: dict[str, set[Grant]] = field(default_factory=dict)

    @classmethod
    def for_account(cls, documents: list[dict[str, Any]], name: str, namespace: str) -> Authorizer:
        roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
                 for d in documents if d["kind"] in ("Role", "ClusterRole")}  # fmt: skip
        auth = cls()
        for b in documents:
            if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not binds(b, name, namespace):
                continue
            ref = b["roleRef"]
            assert ref["apiGroup"] == "rbac.authorization.k8s.io", ref
            bns = b["metadata"].get("namespace", "")
            role = roles.get(
                (ref["kind"], "" if ref["kind"] == "ClusterRole" else bns, ref["name"])
            )
            assert role is not None, f"{b['kind']} {b['metadata']['name']} binds a missing {ref}"
            grants = set(expand(role["rules"]))
            if b["kind"] == "ClusterRoleBinding":
                auth.cluster |= grants
            else:
                auth.namespaced.setdefault(bns, set()).update(grants)
        return auth

    def allows(self, group: str, resource: str, verb: str, namespace: str) -> bool:
        grant = (group, resource, verb)
        return grant in self.cluster or grant in self.namespaced.get(namespace, set())


def binds(binding: dict[str, Any], name: str, namespace: str) -> bool:
    """Whether the (Cluster)RoleBinding names ServiceAccount `namespace`/`name`. As
    kube-apiserver's RBAC (appliesToUser), a ServiceAccount subject without a namespace is in
    the RoleBinding's own namespace; a ClusterRoleBinding has none to lend."""
    own = binding["metadata"].get("namespace", "") if binding["kind"] == "RoleBinding" else ""
    return any(
        s.get("kind") == "ServiceAccount"
        and s.get("apiGroup", "") == ""
        and s.get("name") == name
        and (s.get("namespace") or own) == namespace
        for s in binding.get("subjects") or []
    )


def expand(rules: list[dict[str, Any]]) -> Iterator[Grant]:
    for rule in rules:
        for part in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[part], f"wildcard in {rule}"
        assert not rule.get("resourceNames"), rule
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    yield g, r, v
