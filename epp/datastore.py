"""What the picker knows: one InferencePool, its endpoints, and each endpoint's live state.

Providers (file, Kubernetes) write pools and pods; the scraper writes metrics; scheduling
reads. Everything runs on one event loop, so plain attributes are enough.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from api.meta import ObjectMeta
from api.names import ENGINE_LABEL
from epp.routing.table import RouteTable

log = logging.getLogger("epp.datastore")

ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"


@dataclass(slots=True)
class PoolSpec:
    """inference.networking.k8s.io/v1 InferencePool, the parts the picker uses."""

    name: str
    namespace: str
    selector: dict[str, str]
    target_ports: list[int]
    app_protocol: str = "http"
    failure_mode: str = "FailClose"
    picker_service: str | None = None

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> PoolSpec:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        if not isinstance(meta, dict) or not isinstance(spec, dict):
            raise ValueError("InferencePool: metadata and spec must be maps")
        holder = spec.get("selector") or {}
        selector = holder.get("matchLabels") if isinstance(holder, dict) else None
        if not isinstance(selector, dict) or not selector:
            raise ValueError(
                f"InferencePool {meta.get('name')}: spec.selector.matchLabels "
                "must be a non-empty map"
            )
        ports = [p.get("number") for p in spec.get("targetPorts") or [] if isinstance(p, dict)]
        if not ports or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise ValueError(
                f"InferencePool {meta.get('name')}: spec.targetPorts needs 1-8 "
                "entries with a valid 'number'"
            )
        if len(ports) > 8 or len(set(ports)) != len(ports):
            raise ValueError(
                f"InferencePool {meta.get('name')}: targetPorts must be 1-8 unique ports"
            )
        ref = spec.get("endpointPickerRef") or {}
        if not isinstance(ref, dict):
            raise ValueError(f"InferencePool {meta.get('name')}: endpointPickerRef must be a map")
        mode = ref.get("failureMode", "FailClose")
        if mode not in ("FailOpen", "FailClose"):
            raise ValueError(
                f"InferencePool {meta.get('name')}: failureMode must be FailOpen "
                f"or FailClose, got {mode!r}"
            )
        return cls(
            name=str(meta.get("name")),
            namespace=str(meta.get("namespace") or "default"),
            selector={str(k): str(v) for k, v in selector.items()},
            target_ports=ports,
            app_protocol=spec.get("appProtocol") or "http",
            failure_mode=mode,
            picker_service=ref.get("name"),
        )


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
    labels: dict[str, str] = field(default_factory=dict)
    engine: str = "vllm"
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    reachable: bool = True
    # Set by the scraper when the last good scrape is too old: scorers treat it as saturated.
    stale: bool = True
    scrape_failures: int = 0
    inflight_requests: int = 0
    sent_since_scrape: int = 0  # requests sent after the last good scrape (flow control)
    inflight_tokens: int = 0
    ttft_ewma: float | None = None
    tpot_ewma: float | None = None
    # Model names (base and LoRA adapters) from the server's /v1/models; None = not known yet.
    models: frozenset[str] | None = None
    # LoRA adapter → base model, from the `parent` of /v1/models entries.
    lora_parents: dict[str, str] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    def metrics_age(self, now: float | None = None) -> float:
        if not self.metrics.updated_at:
            return float("inf")
        return (now if now is not None else time.monotonic()) - self.metrics.updated_at


def join_host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets (as Go's net.JoinHostPort and Envoy write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PodCondition(msgspec.Struct):
    """core/v1 PodCondition, the fields readiness needs."""

    type: str
    status: str


class PodStatus(msgspec.Struct, rename="camel"):
    pod_ip: str | None = msgspec.field(default=None, name="podIP")
    conditions: list[PodCondition] | None = None


class PodShape(msgspec.Struct):
    """The parts of a Pod the datastore reads, typed: a pod from a file or a watch is checked
    against it before it is stored, so a wrong type is refused where it enters."""

    metadata: ObjectMeta
    status: PodStatus | None = None


def pod_problem(pod: Any) -> str | None:
    """Why the datastore cannot use this Pod object (a wrong type, a podIP that is no IP
    address), or None."""
    try:
        shape = msgspec.convert(pod, PodShape)
    except msgspec.ValidationError as exc:
        return str(exc)
    except RecursionError:
        return "nested too deeply"
    if not shape.metadata.name:
        return "no metadata.name"
    ip = shape.status.pod_ip if shape.status else None
    if ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return f"status.podIP {ip!r} is not an IP address"
    return None


def _pod_ready(pod: dict[str, Any]) -> bool:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return False
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _refused(pod: Any) -> bool:
    problem = pod_problem(pod)
    if problem is not None:
        log.error("ignoring a pod the picker cannot use: %s", problem)
    return problem is not None


class Datastore:
    def __init__(self) -> None:
        self.pool: PoolSpec | None = None
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
        if pool is not None:
            for name, pod in sorted(self._pods.items()):
                labels = (pod.get("metadata") or {}).get("labels") or {}
                if not _pod_ready(pod) or any(labels.get(k) != v for k, v in pool.selector.items()):
                    continue
                ip = pod["status"]["podIP"]
                uid = str((pod.get("metadata") or {}).get("uid") or "")
                active = self._active_ports(pod)
                # The rank is the port's place in targetPorts, as the reference names it.
                for rank, port in enumerate(pool.target_ports):
                    if active is not None and port not in active:
                        continue
                    address = join_host_port(ip, port)
                    ep = self._endpoints.get(address)
                    # A recycled IP, or a pod made again under the same name, is a new
                    # endpoint: nothing it holds or reports is the old one's.
                    if ep is None or ep.pod != name or ep.pod_uid != uid:
                        ep = Endpoint(
                            name=f"{name}-rank-{rank}", pod=name, address=address, pod_uid=uid
                        )
                    ep.name = f"{name}-rank-{rank}"
                    ep.rank = rank
                    ep.labels = dict(labels)
                    ep.engine = labels.get(ENGINE_LABEL, "vllm")
                    new[address] = ep
        gone = [a for a, ep in self._endpoints.items() if new.get(a) is not ep]
        self._endpoints = new
        self.version += 1
        for address in gone:
            for listener in self.removal_listeners:
                listener(address)
        for changed in self.change_listeners:
            changed()

    @staticmethod
    def _active_ports(pod: dict[str, Any]) -> set[int] | None:
        active = ((pod.get("metadata") or {}).get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
        if not active:
            return None
        # isdigit alone admits "²", which int() refuses.
        return {int(p) for p in active.split(",") if p.strip().isascii() and p.strip().isdigit()}

    # ---- reads (scheduling, scraping, debug) ----------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def endpoint(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def serves_model(self, name: str) -> bool:
        """A ModelRoute names it, or some endpoint's /v1/models lists it."""
        if self.routes.route_for(name) is not None:
            return True
        return any(e.models is not None and name in e.models for e in self._endpoints.values())

    def ready_endpoints(self) -> list[Endpoint]:
        return [e for e in self._endpoints.values() if e.reachable]
