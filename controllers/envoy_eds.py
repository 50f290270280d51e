"""Standalone mode as the local Envoy's control plane: the pods of one InferencePool as an
EDS file (a DiscoveryResponse holding one ClusterLoadAssignment), which Envoy reloads when
the file is moved into place — what Envoy Gateway's EDS does for a cluster's pool.

Every pod with an address is listed, ready or not: Envoy's override-host policy only sends
to hosts it knows, so a pod the picker has just found ready must already be there. Pods
that are not ready are marked UNHEALTHY, which keeps the round-robin fallback (a failing-open
pool with no picker) off them.
"""

from __future__ import annotations

import hashlib
import json

from infergw.cluster.pool import pod_host_ports
from infergw.cluster.store import Obj, labels_match

ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def _ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pool_endpoints(pool: Obj, pods: list[Obj]) -> list[tuple[str, int, bool]]:
    """(ip, port, ready) for every addressed, not-deleting pod the pool selects, at the ports
    it serves the target ports on (one-address mode moves them: infergate.io/host-ports)."""
    selector = (pool["spec"].get("selector") or {}).get("matchLabels") or {}
    namespace = pool["metadata"].get("namespace", "default")
    ports = [int(p["number"]) for p in pool["spec"].get("targetPorts") or []]
    out = []
    for pod in pods:
        m = pod["metadata"]
        ip = (pod.get("status") or {}).get("podIP")
        moved = pod_host_ports(pod)
        if (
            not ip
            or moved is None
            or m.get("deletionTimestamp")
            or m.get("namespace", "default") != namespace
            or not labels_match(pod, selector)
        ):
            continue
        out += [(ip, moved.of(port), _ready(pod)) for port in ports]
    return sorted(out)


def discovery_response(cluster: str, endpoints: list[tuple[str, int, bool]]) -> str:
    """The file's text; JSON, which Envoy reads as YAML too, with a version per content."""
    lb = [
        {
            "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
            "health_status": "HEALTHY" if ready else "UNHEALTHY",
        }
        for ip, port, ready in endpoints
    ]
    assignment = {
        "@type": ASSIGNMENT,
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": lb}] if lb else [],
    }
    version = hashlib.sha256(json.dumps(assignment, sort_keys=True).encode()).hexdigest()[:16]
    return json.dumps({"version_info": version, "resources": [assignment]}, indent=1)
