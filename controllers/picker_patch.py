"""How Envoy Gateway runs a Model's picker for its route: an EnvoyPatchPolicy per Model.

The recipe (README, "A Model in a cluster"): Envoy Gateway with Envoy AI Gateway's InferencePool
backend support. AI Gateway's extension server accepts the HTTPRoute's InferencePool backendRef
and renders the route's cluster `httproute/<ns>/<route>/rule/0` as ORIGINAL_DST on
x-gateway-destination-endpoint (the pod the picker chose). It also adds a picker filter of its
own per pool (AI_GATEWAY_FILTER), enabled on the pool's routes; that one dials the picker
without verifying its certificate and cannot let it set x-envoy-* headers, so we switch it off
on the Model's routes and run the pool's picker through ours.

A route-targeted EnvoyExtensionPolicy does not work behind the body-based router: Envoy decides
which per-route-enabled filters run from the route it matched first, before the router set
MODEL_NAME_HEADER (README, "Many Models behind one Gateway"). What works is one picker ext_proc
filter on the listener (PICKER_FILTER: the Gateway-wide patch
gateway-manifests/bbr/picker-filter.yaml), switched on for the route a request first matches and
overridden, on the Model's routes, by an `ExtProcPerRoute` naming the pool's own picker, as the
local stack renders it (gateway-manifests/local/envoy.yaml.j2). The filter is off on the
listener, so Envoy's own reply to a request that has no route (a 431 for a header flood) is not
held by it: a route switches it on with a FilterConfig wrapping its ExtProcPerRoute.
On Envoy Gateway that override is a JSON patch, so per Model `m` the controllers write
EnvoyPatchPolicy `m-epp` (owned by the Model) with:
1. a Cluster `infergate-picker/<ns>/<m>`: the picker Service `m-epp` by its DNS name, HTTP/2,
   TLS verified against the CA bundle of the Secret `m-epp-tls` (inlined: the controllers made
   it, picker_tls.py) with SNI and SAN `m-epp.<ns>.svc`;
2. on each Envoy route Envoy Gateway makes of the HTTPRoute `m` (one per match: the inference
   paths), `typed_per_filter_config[PICKER_FILTER]` = FilterConfig (on) of an ExtProcPerRoute
   with that cluster, and `typed_per_filter_config[AI_GATEWAY_FILTER of pool m]` = disabled.
   Each is added as a key of the route's map, never the whole map: the router's per-route
   enablement stays.

Names are Envoy Gateway's (its default "V1" xDS name scheme, which its docs warn may change):
the RouteConfiguration `<Gateway ns>/<Gateway>/<listener>`, the routes
`httproute/<ns>/<route>/rule/<i>/match/<j>/*` (`*`: the HTTPRoute names no hostname); and
Envoy AI Gateway's (v0.4 and later) for its pool filter.
"""

from __future__ import annotations

from infergw.api import Model, ObjectMeta
from infergw.api.envoy_gateway import (
    CLUSTER_TYPE,
    ROUTE_CONFIGURATION_TYPE,
    EnvoyJSONPatch,
    EnvoyPatchPolicy,
    EnvoyPatchPolicySpec,
    JSONPatchOperation,
    PolicyTargetRef,
)
from infergw.api.gateway import GROUP as GATEWAY_GROUP
from infergw.api.upstream import DEFAULT_FAILURE_MODE
from infergw.controllers.model_objects import PICKER_PORT

# The picker filter on the Gateway's listener the routes override. Installed once per Gateway,
# after the body-based router's filter (see the README); every Model's route names it.
PICKER_FILTER = "infergate.picker"
DEFAULT_LISTENER = "https"  # gateway-manifests/gateway.yaml's only listener
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
GRPC_TIMEOUT = "10s"
DISABLED = {"@type": EXT_PROC_PER_ROUTE, "disabled": True}  # a filter off on one route


def picker_host(namespace: str, picker: str) -> str:
    """The name Envoy dials, sends as SNI and verifies: the picker Service's DNS name."""
    return f"{picker}.{namespace}.svc"


def cluster_name(namespace: str, model: str) -> str:
    return f"infergate-picker/{namespace}/{model}"


def route_config_name(gateway_namespace: str, gateway: str, listener: str | None) -> str:
    return f"{gateway_namespace}/{gateway}/{listener or DEFAULT_LISTENER}"


def route_names(namespace: str, route: str, matches: int) -> list[str]:
    """Envoy Gateway's names for the Envoy routes of rule 0 of an HTTPRoute without hostnames."""
    return [f"httproute/{namespace}/{route}/rule/0/match/{j}/*" for j in range(matches)]


def picker_cluster(namespace: str, model: str, picker: str, ca_bundle: str) -> dict:
    """The picker Service over verified TLS and HTTP/2; one host per address DNS returns."""
    host = picker_host(namespace, picker)
    return {
        "name": cluster_name(namespace, model),
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": cluster_name(namespace, model),
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": f"{host}.cluster.local",
                                        "port_value": PICKER_PORT,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS_CONTEXT,
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"inline_string": ca_bundle},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": host}}
                        ],
                    }
                },
            },
        },
    }


def ai_gateway_filter(namespace: str, pool: str) -> str:
    """Envoy AI Gateway's picker filter for an InferencePool (its extension server's name)."""
    return f"envoy.filters.http.ext_proc/endpointpicker/{pool}_{namespace}_ext_proc"


def per_filter_path(filter_name: str) -> str:
    """The JSON pointer to one key of a route's typed_per_filter_config ('/' and '~' escaped)."""
    return "/typed_per_filter_config/" + filter_name.replace("~", "~0").replace("/", "~1")


def switched_on(per_route: dict) -> dict:
    """A filter that is off on the listener (PICKER_FILTER), on for one route with this
    per-route config of its own."""
    return {"@type": FILTER_CONFIG, "config": per_route}


def route_override(namespace: str, model: str, fail_open: bool) -> dict:
    """PICKER_FILTER's config on the Model's routes: on, talking to this Model's picker."""
    return switched_on(
        {
            "@type": EXT_PROC_PER_ROUTE,
            "overrides": {
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": cluster_name(namespace, model)},
                    "timeout": GRPC_TIMEOUT,
                },
                "failure_mode_allow": fail_open,
            },
        }
    )


def envoy_patch_policy(
    model: Model,
    picker: str,
    gateway: tuple[str, str, str | None],
    matches: int,
    ca_bundle: str,
) -> EnvoyPatchPolicy:
    """The Model's EnvoyPatchPolicy: its picker's Cluster and the override on each of its
    route's `matches` Envoy routes. `gateway` is (namespace, name, listener)."""
    ns, name = model.metadata.namespace or "default", model.metadata.name or ""
    gw_ns, gw_name, listener = gateway
    fail_open = DEFAULT_FAILURE_MODE == "FailOpen"  # the Model's pool's (model_objects.py)
    patches = [
        EnvoyJSONPatch(
            type=CLUSTER_TYPE,
            name=cluster_name(ns, name),
            operation=JSONPatchOperation(
                op="add", path="", value=picker_cluster(ns, name, picker, ca_bundle)
            ),
        )
    ]
    # The pool is the Model's namespace and name (model_objects.py).
    per_route = (
        (PICKER_FILTER, route_override(ns, name, fail_open)),
        (ai_gateway_filter(ns, name), DISABLED),
    )
    patches += [
        EnvoyJSONPatch(
            type=ROUTE_CONFIGURATION_TYPE,
            name=route_config_name(gw_ns, gw_name, listener),
            operation=JSONPatchOperation(
                op="add",
                json_path=f"..routes[?(@.name=='{route}')]",
                path=per_filter_path(filter_name),
                value=value,
            ),
        )
        for route in route_names(ns, name, matches)
        for filter_name, value in per_route
    ]
    # Envoy Gateway reads a policy in its Gateway's namespace only; the caller writes it where
    # that is the Model's (an owner reference cannot cross namespaces).
    return EnvoyPatchPolicy(
        metadata=ObjectMeta(name=picker, namespace=gw_ns),
        spec=EnvoyPatchPolicySpec(
            target_ref=PolicyTargetRef(group=GATEWAY_GROUP, kind="Gateway", name=gw_name),
            json_patches=patches,
        ),
    )
