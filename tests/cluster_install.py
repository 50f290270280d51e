"""`kubectl apply` of a YAML stream against the API emulator (tests/kubeapi.py), over HTTP as
kubectl sends it: one create per object, in the stream's order, with strict field validation
(kubectl's default since 1.27), so a CRD in the stream serves its kind to the objects after it.

Objects of a kind the emulator serves no CRD for are not sent: `Applied.skipped` lists them,
for the test to say why each is acceptable (the emulator has no schema for Envoy Gateway's or
cert-manager's kinds, whose controllers do not run here).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import requests

from infergw.stack.install import CLUSTER_SCOPED
from tests.kube_crd import BUILTIN_GROUPS
from tests.kubeapi import KubeAPIEmulator, plural_of, split_api_version

Obj = dict[str, Any]
TIMEOUT = 10.0


class ApplyError(RuntimeError):
    pass


@dataclass
class Applied:
    created: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (group, kind, name)


def resource_path(api: KubeAPIEmulator, doc: Obj) -> str | None:
    """The collection URL path kubectl would POST `doc` to, or None where nothing serves it."""
    group, version = split_api_version(doc["apiVersion"])
    kind = doc["kind"]
    if group in BUILTIN_GROUPS:
        plural, namespaced = plural_of(kind), kind not in CLUSTER_SCOPED
    else:
        crd = api.resource_of(group, kind)
        if crd is None:
            return None
        plural, namespaced = crd.plural, crd.namespaced
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespaced:
        return f"{prefix}/namespaces/{doc['metadata'].get('namespace', 'default')}/{plural}"
    return f"{prefix}/{plural}"


def apply(api: KubeAPIEmulator, docs: Iterable[Obj], token: str | None = None) -> Applied:
    """Create every object of `docs`; the first refusal raises ApplyError with the server's
    message."""
    out = Applied()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with requests.Session() as session:
        for doc in docs:
            path = resource_path(api, doc)
            meta = doc["metadata"]
            if path is None:
                group = split_api_version(doc["apiVersion"])[0]
                out.skipped.append((group, doc["kind"], meta["name"]))
                continue
            resp = session.post(
                api.url + path,
                json=doc,
                params={"fieldValidation": "Strict"},
                headers=headers,
                timeout=TIMEOUT,
            )
            if resp.status_code != 201:
                raise ApplyError(f"{doc['kind']} {meta['name']}: {resp.status_code} {resp.text}")
            out.created.append((doc["kind"], meta["name"]))
    return out
