"""gateway.networking.k8s.io/v1 HTTPRoute: the fields a Model's route writes, and the status its
Gateway's controller reports back (read to tell whether the Model is reachable).

Not one of our kinds: no validation here (the Gateway API's CRD does it) and not in
`api.KINDS`; `read_http_route` decodes one the API server returned.
"""

from __future__ import annotations

import msgspec

from infergw.api.core import StatusCondition
from infergw.api.meta import ApiStruct, ObjectMeta
from infergw.api.networking import ParentRef

GROUP = "gateway.networking.k8s.io"
GROUP_VERSION = f"{GROUP}/v1"


class PathMatch(ApiStruct):
    type: str  # Exact | PathPrefix | RegularExpression
    value: str


class HeaderMatch(ApiStruct):
    name: str
    value: str
    type: str | None = None  # Exact (the default) | RegularExpression


class RouteMatch(ApiStruct):
    path: PathMatch | None = None
    headers: list[HeaderMatch] | None = None


class BackendRef(ApiStruct):
    name: str
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    port: int | None = None


class RouteTimeouts(ApiStruct):
    request: str | None = None


class HTTPRouteRule(ApiStruct):
    matches: list[RouteMatch] | None = None
    backend_refs: list[BackendRef] | None = None
    timeouts: RouteTimeouts | None = None


class HTTPRouteSpec(ApiStruct):
    parent_refs: list[ParentRef] | None = None
    rules: list[HTTPRouteRule] | None = None


class RouteParentStatus(ApiStruct):
    parent_ref: ParentRef
    controller_name: str | None = None
    conditions: list[StatusCondition] | None = None


class HTTPRouteStatus(ApiStruct):
    parents: list[RouteParentStatus] | None = None


class HTTPRoute(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "HTTPRoute"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: HTTPRouteSpec
    status: HTTPRouteStatus | None = None


def read_http_route(obj: dict) -> HTTPRoute:
    """An HTTPRoute as the API server returned it; msgspec.ValidationError if it is not one."""
    return msgspec.convert(obj, HTTPRoute)
