"""What the picker knows: one InferencePool, its endpoints, and each endpoint's live state.

Providers (file, Kubernetes) write pools and pods; the scraper writes metrics; scheduling
reads. Everything runs on one event loop, so plain attributes are enough.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infergw.api.pod_ports import HostPorts
from infergw.cluster.pool import PoolSpec, members, pod_problem
from infergw.epp.routing.table import RouteTable

log = logging.getLogger("epp.datastore")


@dataclass(slots=True)
class EndpointMetrics:
    """What the model server's /metrics said last, in engine-neutral terms."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_blocks: int | None = None
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None
    updated_at: float = 0.0  # time.monotonic(); 0 = never scraped


@dataclass(slots=True, eq=False)
class Endpoint:
    """One pod × target port: where a request can go."""

    name: str
    pod: str
    address: str  # "ip:port", the key Envoy and KV events use
    pod_uid: str = ""  # metadata.uid: a pod deleted and made again under its name is new
    rank: int = 0  # the port's index in targetPorts (data-parallel rank)
    target_port: int = 0  # that port (0: the address's, which it is but in one-address mode)
    # Where the pod's other ports (KV events, replay) are: moved in one-address mode.
    host_ports: HostPorts = field(default_factory=HostPorts)
    labels: dict[str, str] = field(default_factory=dict)
    engine: str = "vllm"
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    reachable: bool = True
    # Set by the scraper when the last good scrape is too old: scorers treat it as saturated.
    stale: bool = True
    scrape_failures: int = 0
    inflight_requests: int = 0
    sent_since_scrape: int = 0  # requests sent after the last good scrape (flow control)
    last_sent_at: float = 0.0  # time.monotonic() the picker last sent it a request; 0: never
    inflight_tokens: int = 0
    ttft_ewma: float | None = None
    tpot_ewma: float | None = None
    # Model names (base and LoRA adapters) from the server's /v1/models; None = not known yet.
    models: frozenset[str] | None = None
    # LoRA adapter → base model, from the `parent` of /v1/models entries.
    lora_parents: dict[str, str] = field(default_factory=dict)
    # Why its last /v1/models answer was unusable (None: it was usable, or none came yet):
    # logged once per run of bad answers, not every few seconds.
    models_problem: str | None = None

    @property
    def ip(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    def __post_init__(self) -> None:
        port = self.address.rsplit(":", 1)[-1]
        if not self.target_port and port.isdigit():
            self.target_port = int(port)

    def metrics_age(self, now: float | None = None) -> float:
        if not self.metrics.updated_at:
            return float("inf")
        return (now if now is not None else time.monotonic()) - self.metrics.updated_at


def _refused(pod: Any) -> bool:
    problem = pod_problem(pod)
    if problem is not None:
        log.error("ignoring a pod the picker cannot use: %s", problem)
    return problem is not None


class Datastore:
    def __init__(self, *, host_ports: bool = False) -> None:
        self.pool: PoolSpec | None = None
        # Pods' infergate.io/host-ports annotations are read (pool files: standalone mode).
        self.host_ports = host_ports
        # ModelRoutes and ModelServers of the pool's namespace; empty: no model routing.
        self.routes = RouteTable()
        # InferenceObjective name → priority (x-gateway-inference-objective names one).
        self.objectives: dict[str, int] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        self._endpoints: dict[str, Endpoint] = {}  # by address
        self.synced = False
        self.version = 0
        # Called with an endpoint's address when it leaves (plugins forget what it held).
        self.removal_listeners: list[Callable[[str], None]] = []
        # Called after every change of the endpoint set (per-pod subscribers connect).
        self.change_listeners: list[Callable[[], None]] = []

    # ---- writes (providers) ------------------------------------------------------------

    def set_pool(self, pool: PoolSpec | None) -> None:
        self.pool = pool
        self.routes.pool_name = pool.name if pool else ""
        self._rebuild()

    def set_routes(self, routes: list[dict[str, Any]], servers: list[dict[str, Any]]) -> None:
        pool = self.pool.name if self.pool else ""
        self.routes = RouteTable.build(routes, servers, pool)

    def set_objectives(self, objectives: list[dict[str, Any]]) -> None:
        """InferenceObjectives of this pool (spec.poolRef names it); priority defaults to 0."""
        pool = self.pool.name if self.pool else None
        out = {}
        for obj in objectives:
            spec = obj.get("spec") or {}
            name = (obj.get("metadata") or {}).get("name")
            if (spec.get("poolRef") or {}).get("name", pool) != pool or not name:
                continue
            priority = spec.get("priority", 0)
            if not isinstance(priority, int) or isinstance(priority, bool):
                log.error(
                    "ignoring InferenceObjective %s: priority %r is not an integer", name, priority
                )
                continue
            out[name] = priority
        self.objectives = out

    def priority_of(self, objective: str | None) -> int:
        """An unknown objective gets the default priority, as the reference picker does."""
        return self.objectives.get(objective, 0) if objective else 0

    def upsert_pod(self, pod: dict[str, Any]) -> None:
        """Store a pod; one the datastore cannot use (pod_problem) is logged and left out."""
        if _refused(pod):
            return
        self._pods[pod["metadata"]["name"]] = pod
        self._rebuild()

    def delete_pod(self, name: str) -> None:
        self._pods.pop(name, None)
        self._rebuild()

    def replace_pods(self, pods: list[dict[str, Any]]) -> None:
        self._pods = {p["metadata"]["name"]: p for p in pods if not _refused(p)}
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute endpoints, keeping the live state of those that stay the same pod."""
        new: dict[str, Endpoint] = {}
        pool = self.pool
        pods = self._pods.values()
        for m in members(pool, pods, host_ports=self.host_ports) if pool is not None else ():
            if not m.ready:
                continue
            ep = self._endpoints.get(m.address)
            # A recycled IP, or a pod made again under the same name, is a new endpoint:
            # nothing it holds or reports is the old one's.
            if ep is None or ep.pod != m.pod or ep.pod_uid != m.pod_uid:
                ep = Endpoint(name="", pod=m.pod, address=m.address, pod_uid=m.pod_uid)
            ep.name = f"{m.pod}-rank-{m.rank}"
            ep.rank = m.rank
            ep.target_port = m.target_port
            ep.host_ports = m.host_ports
            ep.labels = dict(m.labels)
            ep.engine = m.engine
            new[m.address] = ep
        gone = [a for a, ep in self._endpoints.items() if new.get(a) is not ep]
        self._endpoints = new
        self.version += 1
        for address in gone:
            for listener in self.removal_listeners:
                listener(address)
        for changed in self.change_listeners:
            changed()

    # ---- reads (scheduling, scraping, debug) ----------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def endpoint(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def pod_created(self, pod: str) -> str | None:
        """A pod's creationTimestamp, as its object says (None: not given)."""
        obj = self._pods.get(pod)
        return (obj.get("metadata") or {}).get("creationTimestamp") if obj else None

    def has_member(self, pod: str, port: int) -> bool:
        """The pod, at that port (a target port, or where the pod serves it), is in the pool,
        ready or not."""
        pool = self.pool
        if pool is None or pod not in self._pods:
            return False
        found = members(pool, [self._pods[pod]], host_ports=self.host_ports)
        return any(m.port == port for m in found)

    def serves_model(self, name: str) -> bool:
        """A ModelRoute names it, or some endpoint's /v1/models lists it."""
        if self.routes.route_for(name) is not None:
            return True
        return any(e.models is not None and name in e.models for e in self._endpoints.values())

    def ready_endpoints(self) -> list[Endpoint]:
        return [e for e in self._endpoints.values() if e.reachable]
