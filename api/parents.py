"""Which Gateways a ModelRoute and a Model are served on, and which pool a ModelServer's pods
are in: what the body-based router (bbr/) and the controllers (controllers/route_parents.py)
must agree on, so the one never routes a name through a Gateway the other did not attach.

A ModelRoute's `parentRefs` are Gateway API ParentReferences: a Gateway's name, its namespace
(default: the route's) and optionally a listener (`sectionName`). No parentRefs: the Gateways
of the route's own namespace. A Model's Gateway is its `spec.gateway` (DEFAULT_GATEWAY in the
Model's namespace when it names none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from infergw.api.meta import DNS_LABEL, DNS_SUBDOMAIN
from infergw.api.networking import ModelRoute
from infergw.api.workload import DEFAULT_GATEWAY, Model


@dataclass(frozen=True, slots=True, order=True)
class GatewayName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_gateway(text: str, default_namespace: str) -> GatewayName:
    """`[NAMESPACE/]NAME` (the router's --gateway); ValueError naming what is wrong."""
    namespace, _, name = text.rpartition("/")
    namespace = namespace or default_namespace
    if not DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise ValueError(f"{namespace!r} is not a namespace (a DNS label)")
    if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        raise ValueError(f"{name!r} is not a Gateway name (a DNS subdomain)")
    return GatewayName(namespace, name)


def route_gateways(route: ModelRoute) -> frozenset[GatewayName] | None:
    """The Gateways a (valid) ModelRoute's parentRefs name; None when it names none, which
    means every Gateway of its own namespace."""
    refs = route.spec.parent_refs
    if not refs:
        return None
    own = route.metadata.namespace or "default"
    return frozenset(GatewayName(ref.namespace or own, ref.name) for ref in refs)


def route_served_on(route: ModelRoute, gateway: GatewayName) -> bool:
    names = route_gateways(route)
    if names is None:
        return gateway.namespace == (route.metadata.namespace or "default")
    return gateway in names


def model_gateway(model: Model) -> GatewayName:
    ref = model.spec.gateway
    return GatewayName(
        (ref.namespace if ref else None) or model.metadata.namespace or "default",
        (ref.name if ref else None) or DEFAULT_GATEWAY,
    )


def pool_of_server(
    server_labels: Mapping[str, str], pools: Mapping[str, Mapping[str, str]]
) -> str | None:
    """The pool (name -> its selector's matchLabels) whose members include every pod a
    ModelServer selects: its selector is a subset of the server's labels. Several: the most
    specific (most labels), then by name."""
    fits = [
        (-len(selector), name)
        for name, selector in pools.items()
        if all(server_labels.get(k) == v for k, v in selector.items())
    ]
    return min(fits)[1] if fits else None
