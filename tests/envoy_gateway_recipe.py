"""Our rendering of the cluster recipe's Envoy config, for tests: what Envoy Gateway and Envoy
AI Gateway's extension server would send Envoy for the install's Gateway and several Models'
HTTPRoutes, with our EnvoyPatchPolicies applied between them as Envoy Gateway applies them.

No Envoy Gateway or AI Gateway control plane runs here: the shapes and names below are ours,
written from their releases' translators (README, "A Model in a cluster"), not their output.
Whose part is whose:
- Envoy Gateway (`base`): the Listener and RouteConfiguration `<ns>/<gateway>/https` (V1 names),
  a route per HTTPRoute match `httproute/<ns>/<route>/rule/0/match/<j>/*`, the router's
  EnvoyExtensionPolicy as an ext_proc filter disabled on the listener and enabled on every route
  of the Gateway (`typed_per_filter_config` FilterConfig), the no-model route's direct 404;
- Envoy AI Gateway, at route and cluster translation (`base` too): each Model's route cluster
  `httproute/<ns>/<m>/rule/0` as ORIGINAL_DST on x-gateway-destination-endpoint;
- our patches (`apply_policy`): gateway-manifests/bbr/picker-filter.yaml and the Models'
  (controllers/picker_patch.py), applied before ...
- ... Envoy AI Gateway's post-translate hook (`ai_gateway_post_translate`): a picker filter per
  pool before the router, dialling `<pool>-epp.<ns>.svc:9002` over TLS it does not verify,
  disabled on every route that is not its pool's.
The tests map the pickers' DNS names to 127.0.0.1 (`map_addresses`): nothing else differs.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infergw.api.gateway import PathMatch
from infergw.api.names import DESTINATION_HEADER, MODEL_NAME_HEADER, PICKER_FILTER_POLICY
from infergw.controllers.picker_objects import ROUTE_PATHS, ROUTE_TIMEOUT
from infergw.controllers.picker_patch import DEFAULT_LISTENER, ai_gateway_filter, route_names
from infergw.stack.envoy_config import NO_POOL_ANSWER
from infergw.stack.install import Target, objects

Obj = dict[str, Any]
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER = "envoy.filters.http.router"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
NO_MODEL_ROUTE = "infergate-no-model"
EPP_PORT = 9002  # the picker Service's ext_proc port (AI Gateway's default for a pool)


@dataclass(frozen=True)
class Gateway:
    namespace: str = "default"
    name: str = "inference-gateway"
    listener: str = DEFAULT_LISTENER

    @property
    def xds_name(self) -> str:
        return f"{self.namespace}/{self.name}/{self.listener}"

    @property
    def router_filter(self) -> str:
        """Envoy Gateway's name for bbr-extension-policy.yaml's ext_proc filter."""
        policy = f"{self.namespace}/infergate-bbr"
        return f"envoy.filters.http.ext_proc/envoyextensionpolicy/{policy}/extproc/0"


def _socket(address: str, port: int) -> Obj:
    return {"address": {"socket_address": {"address": address, "port_value": port}}}


def _cluster(name: str, kind: str, address: str, port: int, **more: Any) -> Obj:
    endpoints = [{"lb_endpoints": [{"endpoint": _socket(address, port)}]}]
    return {
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": endpoints},
        **more,
    }


def router_cluster(
    gw: Gateway, address: str, port: int, ca: str, san: str, san_type: str = "IP_ADDRESS"
) -> Obj:
    """Envoy Gateway's cluster for the router's Service, verified as its BackendTLSPolicy says
    (its `hostname`: a DNS SAN, sent as SNI too)."""
    tls_context: Obj = {
        "@type": TLS,
        "common_tls_context": {
            "validation_context": {
                "trusted_ca": {"inline_string": ca},
                "match_typed_subject_alt_names": [
                    {"san_type": san_type, "matcher": {"exact": san}}
                ],
            }
        },
    }
    if san_type == "DNS":
        tls_context["sni"] = san
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": tls_context}
    return _cluster(
        f"envoyextensionpolicy/{gw.namespace}/infergate-bbr/0",
        "STATIC",
        address,
        port,
        typed_extension_protocol_options=HTTP2,
        transport_socket=tls,
    )


def _enabled(gw: Gateway) -> Obj:
    """Envoy Gateway's per-route switch for a filter it disables on the listener."""
    return {gw.router_filter: {"@type": FILTER_CONFIG, "config": {}}}


def _path_match(path: PathMatch) -> Obj:
    """An HTTPRoute path match as Envoy Gateway renders it: a prefix as whole path segments."""
    if path.type == "Exact":
        return {"path": path.value}
    assert path.type == "PathPrefix", path
    return {"path_separated_prefix": path.value.rstrip("/")}


def base(gw: Gateway, models: list[str], listen_port: int, admin_port: int, router: Obj) -> Obj:
    """What Envoy Gateway (with AI Gateway's route and cluster hooks) renders for the install's
    Gateway and the Models' HTTPRoutes, before any EnvoyPatchPolicy."""
    routes = [
        {
            "name": name,
            "match": {
                **_path_match(path),
                "headers": [{"name": MODEL_NAME_HEADER, "string_match": {"exact": m}}],
            },
            "route": {"cluster": f"httproute/{gw.namespace}/{m}/rule/0", "timeout": ROUTE_TIMEOUT},
            "typed_per_filter_config": _enabled(gw),
        }
        for m in models
        for name, path in zip(
            route_names(gw.namespace, m, len(ROUTE_PATHS)), ROUTE_PATHS, strict=True
        )
    ]
    routes.append(
        {
            "name": f"httproute/{gw.namespace}/{NO_MODEL_ROUTE}/rule/0/match/0/*",
            "match": {"prefix": "/v1"},
            "direct_response": {
                "status": 404,
                "body": {"inline_string": json.dumps(NO_POOL_ANSWER)},
            },
            "typed_per_filter_config": _enabled(gw),
        }
    )
    router_filter = {
        "name": gw.router_filter,
        "disabled": True,
        "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": router["name"]}, "timeout": "10s"},
            "failure_mode_allow": False,
            "message_timeout": "1000s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "request_trailer_mode": "SEND",
            },
        },
    }
    hcm = {
        "@type": HCM,
        "stat_prefix": gw.listener,
        "route_config": {
            "name": gw.xds_name,
            "virtual_hosts": [{"name": gw.xds_name, "domains": ["*"], "routes": routes}],
        },
        "http_filters": [router_filter, {"name": ROUTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    pool_clusters = [
        {
            "name": f"httproute/{gw.namespace}/{m}/rule/0",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "10s",
            "original_dst_lb_config": {
                "use_http_header": True, "http_header_name": DESTINATION_HEADER},
        }
        for m in models
    ]  # fmt: skip
    listener = {
        "name": gw.xds_name,
        **_socket("127.0.0.1", listen_port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    return {
        "admin": _socket("127.0.0.1", admin_port),
        "static_resources": {"listeners": [listener], "clusters": [router, *pool_clusters]},
    }


# ---- Envoy Gateway's application of an EnvoyPatchPolicy ------------------------------------------

_SELECT = re.compile(r"\.\.(\w+)\[\?\(@\.name=='([^']+)'\)\]")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _locate(node: Any, key: str, name: str, at: str = "") -> Iterator[str]:
    """JSON pointers of every `key` list element named `name`, anywhere below `node` (the
    jsonPath forms our patches use: `..key[?(@.name=='name')]`)."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{at}/{_escape(k)}"
            if k == key and isinstance(v, list):
                yield from (
                    f"{here}/{i}"
                    for i, e in enumerate(v)
                    if isinstance(e, dict) and e.get("name") == name
                )
            yield from _locate(v, key, name, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _locate(v, key, name, f"{at}/{i}")  # fmt: skip


def _apply_op(doc: Obj, pointer: str, op: str, value: Any) -> None:
    """RFC 6902 add / replace at `pointer` (the parent must exist, as the RFC says)."""
    *parents, last = [_unescape(t) for t in pointer.split("/")[1:]]
    node: Any = doc
    for token in parents:
        node = node[int(token)] if isinstance(node, list) else node[token]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, copy.deepcopy(value))
        else:
            node[index] = copy.deepcopy(value)
        return
    if op == "replace" and last not in node:
        raise KeyError(f"replace of a missing member {pointer}")
    node[last] = copy.deepcopy(value)


def _resources(config: Obj, type_url: str) -> list[Obj]:
    static = config["static_resources"]
    if type_url.endswith(".Listener"):
        return static["listeners"]
    if type_url.endswith(".Cluster"):
        return static["clusters"]
    assert type_url.endswith(".RouteConfiguration"), type_url
    return [
        f["typed_config"]["route_config"]
        for listener in static["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
    ]


def apply_policy(config: Obj, policy: Obj) -> None:
    """Apply an EnvoyPatchPolicy's JSON patches as Envoy Gateway does: a patch names a resource
    by type and name (an `add` at "" of a new name creates it), a jsonPath selects nodes in it
    and `path` goes on from each; a patch that selects nothing or misses its parent fails."""
    for patch in policy["spec"]["jsonPatches"]:
        op = patch["operation"]
        assert op["op"] in ("add", "replace"), op
        resources = _resources(config, patch["type"])
        named = [r for r in resources if r["name"] == patch["name"]]
        if not named and op["op"] == "add" and op.get("path", "") == "" and "jsonPath" not in op:
            assert op["value"]["name"] == patch["name"]
            resources.append(copy.deepcopy(op["value"]))
            continue
        assert len(named) == 1, f"no {patch['type']} {patch['name']}"
        [resource] = named
        if "jsonPath" in op:
            selected = _SELECT.fullmatch(op["jsonPath"])
            assert selected, f"unsupported jsonPath {op['jsonPath']}"
            pointers = list(_locate(resource, *selected.groups()))
            assert pointers, f"{op['jsonPath']} selects nothing in {patch['name']}"
            pointers = [p + op.get("path", "") for p in pointers]
        else:
            pointers = [op["path"]]
        for pointer in pointers:
            _apply_op(resource, pointer, op["op"], op["value"])


def picker_filter_policy(gw: Gateway) -> Obj:
    """gateway-manifests/bbr/picker-filter.yaml as `infergate install` prints it for `gw`."""
    target = Target(gw.namespace, gw.name)
    [policy] = [d for d in objects(target) if d["metadata"]["name"] == PICKER_FILTER_POLICY]
    return policy


# ---- Envoy AI Gateway's post-translate hook ------------------------------------------------------


def ai_gateway_post_translate(config: Obj, gw: Gateway, pools: list[str]) -> None:
    """Per pool: a picker filter before the router (verifying nothing), its cluster, and an
    ExtProcPerRoute `disabled` on every route that is not the pool's, keys it set already
    left alone."""
    static = config["static_resources"]
    for pool in pools:
        cluster = f"envoy.clusters.endpointpicker_{pool}_{gw.namespace}_ext_proc"
        static["clusters"].append(
            _cluster(
                cluster,
                "STRICT_DNS",
                f"{pool}-epp.{gw.namespace}.svc",
                EPP_PORT,
                typed_extension_protocol_options=HTTP2,
                transport_socket={
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": TLS,
                        "common_tls_context": {"validation_context": {}},
                    },
                },
            )
        )
        for listener in static["listeners"]:
            for chain in listener["filter_chains"]:
                for f in chain["filters"]:
                    filters = f["typed_config"]["http_filters"]
                    filters.insert(
                        len(filters) - 1,
                        {
                            "name": ai_gateway_filter(gw.namespace, pool),
                            "typed_config": {
                                "@type": EXT_PROC,
                                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                                "failure_mode_allow": False,
                                "message_timeout": "5s",
                                "processing_mode": {
                                    "request_header_mode": "SEND",
                                    "request_body_mode": "FULL_DUPLEX_STREAMED",
                                    "request_trailer_mode": "SEND",
                                    "response_header_mode": "SEND",
                                    "response_body_mode": "FULL_DUPLEX_STREAMED",
                                    "response_trailer_mode": "SEND",
                                },
                            },
                        },
                    )
    for rc in _resources(config, ".RouteConfiguration"):
        for vh in rc["virtual_hosts"]:
            for route in vh["routes"]:
                own = route.get("route", {}).get("cluster", "").split("/")
                for pool in pools:
                    is_own = own[:3] == ["httproute", gw.namespace, pool]
                    if not is_own:
                        route.setdefault("typed_per_filter_config", {})[
                            ai_gateway_filter(gw.namespace, pool)
                        ] = {"@type": EXT_PROC_PER_ROUTE, "disabled": True}


def map_addresses(config: Obj, ports: dict[str, int]) -> None:
    """The test's DNS: a cluster endpoint whose host is in `ports` dials 127.0.0.1 on that
    port instead (SNI and the names verified stay the cluster's)."""
    for cluster in config["static_resources"]["clusters"]:
        for group in (cluster.get("load_assignment") or {}).get("endpoints", []):
            for lb in group["lb_endpoints"]:
                socket = lb["endpoint"]["address"]["socket_address"]
                if socket["address"] in ports:
                    socket["port_value"] = ports[socket["address"]]
                    socket["address"] = "127.0.0.1"


def write(config: Obj, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
