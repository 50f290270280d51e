"""The API emulator (tests/kubeapi.py) authorizing as kube-apiserver does: a request carrying a
known bearer token is a ServiceAccount's, allowed only what its RBAC grants (else 403, as
kube-apiserver answers); requests without one (the test's own) pass.

Each token names an authorizer: fixed rules (tests/controller_manifests.py's Authorizer over
manifest files), or `stored_rbac`, which reads the Roles, ClusterRoles and bindings stored in
the emulator at each request, as a cluster evaluates what was applied to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from tests.controller_manifests import Authorizer
from tests.kubeapi import KubeAPIEmulator, status_object

Attributes = tuple[str, str, str, str]  # apiGroup, resource[/subresource], verb, namespace
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


@dataclass(frozen=True)
class Account:
    name: str
    namespace: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def request_attributes(request: web.Request) -> Attributes:
    """kube-apiserver's request attributes: the verb from the method and whether a name or
    watch=true is given, the resource with its subresource, the namespace."""
    m = request.match_info
    name, sub = m.get("name"), m.get("sub")
    if request.method == "GET":
        watch = request.query.get("watch") in ("true", "1")
        verb = "get" if name else "watch" if watch else "list"
    elif request.method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(request.method, "")
    resource = f"{m['plural']}/{sub}" if sub else m["plural"]
    return m.get("group", ""), resource, verb, m.get("namespace", "")


class RBACEmulator(KubeAPIEmulator):
    """`tokens`: bearer token → (account, its authorizer, asked at each request). What each
    account was allowed and refused is recorded by account name."""

    def __init__(
        self,
        tokens: Mapping[str, tuple[Account, Callable[[], Authorizer]]],
        **emulator: object,
    ) -> None:
        super().__init__(**emulator)
        self.tokens = dict(tokens)
        self.denied: dict[str, list[Attributes]] = {}
        self.allowed: dict[str, set[Attributes]] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token in self.tokens:
            account, authorizer = self.tokens[token]
            attrs = request_attributes(request)
            if not authorizer().allows(*attrs):
                self.denied.setdefault(account.name, []).append(attrs)
                group, resource, verb, _ = attrs
                message = (
                    f'{account.user} cannot {verb} resource "{resource}" in API group "{group}"'
                )
                return web.json_response(status_object(403, "Forbidden", message), status=403)
            self.allowed.setdefault(account.name, set()).add(attrs)
        return await super()._handle(request)


def stored_rbac(api: KubeAPIEmulator, account: Account) -> Callable[[], Authorizer]:
    """An authorizer over the RBAC objects stored in `api` when it is asked."""

    def authorizer() -> Authorizer:
        documents = []
        for kind in RBAC_KINDS:
            documents += api.list_objects("rbac.authorization.k8s.io/v1", kind)
        return Authorizer.for_account(documents, account.name, account.namespace)

    return authorizer
