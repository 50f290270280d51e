"""The replicas of a pool's endpoint picker: the ready pods behind the Service its
`endpointPickerRef` names, and the port each serves its metrics and debug pages on. The
autoscaler reads their held requests (controllers/picker_demand.py), `infergate status`
their pages (stack/status_cluster.py)."""

from __future__ import annotations

from collections.abc import Mapping

from infergw.api.names import PICKER_METRICS_PORT, PICKER_METRICS_PORT_NAME
from infergw.cluster.pool import pod_ready
from infergw.cluster.store import POD, SERVICE, Obj, Store


async def picker_pods(store: Store, namespace: str, pool: Obj) -> list[Obj]:
    """The ready pods, with an address, behind the Service the pool's endpointPickerRef
    names: its picker's replicas (every one counts its own requests)."""
    ref = (pool.get("spec") or {}).get("endpointPickerRef") or {}
    name = ref.get("name") if isinstance(ref, Mapping) else None
    if not isinstance(name, str) or not name:
        return []
    service = await store.get(SERVICE, namespace, name)
    selector = ((service or {}).get("spec") or {}).get("selector")
    if not selector or not isinstance(selector, Mapping):
        return []
    pods, _ = await store.list(POD, namespace, dict(selector))
    return [p for p in pods if pod_ready(p)]


def metrics_port(pod: Obj) -> int:
    """The picker pod's metrics container port, by its name (the default when none has it)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for port in c.get("ports") or []:
            number = port.get("containerPort")
            if port.get("name") == PICKER_METRICS_PORT_NAME and isinstance(number, int):
                return number
    return PICKER_METRICS_PORT
