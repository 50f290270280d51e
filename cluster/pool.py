"""An InferencePool and its pods → the pool's members: the one answer to "which pods (and ports)
does this pool send requests to", for the picker's datastore and the decode sidecar's allowlist.

The pool is read through `api` (its typed InferencePool and the CRD's rules); pods are checked
against the few fields membership reads (`pod_problem`) where they enter, so `members` can
trust them.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from infergw.api import ApiError, InferencePool, from_dict_as
from infergw.api.engines import VLLM_METRICS
from infergw.api.meta import ObjectMeta
from infergw.api.names import ENGINE_LABEL, ENTRY_LABEL, ROLE_LABEL
from infergw.api.pod_ports import HostPorts
from infergw.api.upstream import DEFAULT_FAILURE_MODE, POOL_GROUP_VERSION, validate_inference_pool

Obj = dict[str, Any]
log = logging.getLogger("cluster.pool")

# The alpha group's pools are read with v1's shape (the pool files of older setups say it).
POOL_API_VERSIONS = (POOL_GROUP_VERSION, "inference.networking.x-k8s.io/v1alpha2")
# The target ports a pod serves right now, comma-separated (the reference picker's annotation).
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
# Standalone mode with one address for every pod (`--pod-addresses one`, api/pod_ports.py): where
# each of the pod's container ports is reached on its podIP, `8000=20417,5557=20418`. Read from
# pool files only: in a cluster every pod has its own IP and a pod's annotation must not move
# traffic.
HOST_PORTS_ANNOTATION = "infergate.io/host-ports"
DEFAULT_ENGINE = VLLM_METRICS
# The CRD problems that make a pool unusable: the fields membership and the picker act on.
# Others (an appProtocol or a picker Service port the API server would insist on) leave the pool
# usable, as before the pool was read through api; the API server refuses them in a cluster.
_FATAL_PATHS = ("spec.selector", "spec.targetPorts", "spec.endpointPickerRef.failureMode")


class PoolError(ValueError):
    """An InferencePool that cannot be used; the message names the pool and the field."""


@dataclass(slots=True)
class PoolSpec:
    """inference.networking.k8s.io/v1 InferencePool, the parts the picker and sidecar use."""

    name: str
    namespace: str
    selector: dict[str, str]
    target_ports: list[int]
    app_protocol: str = "http"
    failure_mode: str = DEFAULT_FAILURE_MODE
    picker_service: str | None = None

    @classmethod
    def from_object(cls, obj: Any) -> PoolSpec:
        """The pool an API object describes; PoolError names what is wrong."""
        if not isinstance(obj, dict):
            raise PoolError("InferencePool: not an object")
        try:
            pool = from_dict_as(InferencePool, _as_v1(obj))
        except ApiError as exc:
            raise PoolError(str(exc)) from None
        problems = [p for p in validate_inference_pool(pool) if p.startswith(_FATAL_PATHS)]
        if problems:
            raise PoolError(f"InferencePool {pool.metadata.name}: {'; '.join(problems)}")
        spec, ref = pool.spec, pool.spec.endpoint_picker_ref
        return cls(
            name=str(pool.metadata.name),
            namespace=pool.metadata.namespace or "default",
            selector=dict(spec.selector.match_labels),
            target_ports=[port.number for port in spec.target_ports],
            app_protocol=spec.app_protocol or "http",
            failure_mode=(ref.failure_mode if ref else None) or DEFAULT_FAILURE_MODE,
            picker_service=ref.name if ref else None,
        )

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())


def _as_v1(obj: Obj) -> Obj:
    """What api reads: the alpha group as v1, and selector values that YAML made numbers or
    booleans (`tier: 1`) as the strings a label selector compares (as the picker always did)."""
    out = dict(obj)
    if out.get("apiVersion") in POOL_API_VERSIONS:
        out["apiVersion"] = POOL_GROUP_VERSION
    spec = out.get("spec")
    selector = spec.get("selector") if isinstance(spec, dict) else None
    labels = selector.get("matchLabels") if isinstance(selector, dict) else None
    if isinstance(labels, dict) and any(_scalar(v) for v in labels.values()):
        labels = {k: str(v) if _scalar(v) else v for k, v in labels.items()}
        out["spec"] = {**spec, "selector": {**selector, "matchLabels": labels}}
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float)  # bool is an int


# ---- pods ---------------------------------------------------------------------------------


class PodCondition(msgspec.Struct):
    """core/v1 PodCondition, the fields readiness needs."""

    type: str
    status: str


class PodStatus(msgspec.Struct, rename="camel"):
    pod_ip: str | None = msgspec.field(default=None, name="podIP")
    conditions: list[PodCondition] | None = None


class PodShape(msgspec.Struct):
    """The parts of a Pod membership reads, typed: a pod from a file or a watch is checked
    against it before it is kept, so a wrong type is refused where it enters."""

    metadata: ObjectMeta
    status: PodStatus | None = None


def pod_problem(pod: Any) -> str | None:
    """Why a Pod object cannot be used (a wrong type, no name, a podIP that is no IP address),
    or None."""
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


def pod_ready(pod: Obj) -> bool:
    """Ready as kubelet reports it, with an address, and not being deleted."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def join_host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets (as Go's net.JoinHostPort and Envoy write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- members ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One pod × target port of a pool: where a request can go."""

    pod: str
    pod_uid: str  # a pod deleted and made again under its name is another member
    address: str  # "ip:port", the key Envoy and KV events use
    rank: int  # the port's index in targetPorts (the data-parallel rank, as the reference names it)
    port: int  # where the pod serves it: the target port, or its host port (one-address mode)
    target_port: int
    labels: Mapping[str, str]
    engine: str
    role: str | None  # infergate.io/role: prefill, decode, both, or unset
    ready: bool
    host_ports: HostPorts = field(default_factory=HostPorts)  # one-address mode: its other ports


def members(pool: PoolSpec, pods: Iterable[Obj], *, host_ports: bool = False) -> list[Member]:
    """The pool's members among `pods` (which passed pod_problem): each pod its selector matches
    that has an address, at each target port it serves, ordered by pod name then rank. Only the
    ready ones take requests; the others are listed so callers can say why a pod is missing.
    A ModelInfer's worker pod (ENTRY_LABEL "false") is never one, whatever its labels: it
    lends its GPUs to its group's entry pod and serves nothing itself.

    host_ports (pool files, standalone mode): a pod's HOST_PORTS_ANNOTATION moves each target
    port to where that pod serves it; a pod whose annotation is unreadable is left out, logged."""
    out = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or not pool.selects(labels) or is_worker(labels):
            continue
        moved = pod_host_ports(pod) if host_ports else HostPorts()
        if moved is None:
            continue
        active = active_ports(pod)
        ready = pod_ready(pod)
        for rank, port in enumerate(pool.target_ports):
            if active is not None and port not in active:
                continue
            out.append(
                Member(
                    pod=meta["name"],
                    pod_uid=str(meta.get("uid") or ""),
                    address=join_host_port(ip, moved.of(port)),
                    rank=rank,
                    port=moved.of(port),
                    target_port=port,
                    labels=labels,
                    engine=labels.get(ENGINE_LABEL, DEFAULT_ENGINE),
                    role=labels.get(ROLE_LABEL),
                    ready=ready,
                    host_ports=moved,
                )
            )
    return out


def pod_host_ports(pod: Obj) -> HostPorts | None:
    """The pod's HOST_PORTS_ANNOTATION (empty without one); None, logged, when it is not
    `PORT=PORT,...`."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(HOST_PORTS_ANNOTATION)
    if text is None:
        return HostPorts()
    try:
        return HostPorts.parse(text)
    except ValueError as exc:
        name = (pod.get("metadata") or {}).get("name")
        log.error("ignoring pod %s: annotation %s: %s", name, HOST_PORTS_ANNOTATION, exc)
        return None


def is_worker(labels: Mapping[str, str]) -> bool:
    """A ModelInfer's worker pod: it joins its entry pod's engine and serves nothing."""
    return labels.get(ENTRY_LABEL) == "false"


def active_ports(pod: Obj) -> set[int] | None:
    """The ports ACTIVE_PORTS_ANNOTATION names; None (all of them) without it."""
    active = ((pod.get("metadata") or {}).get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
    if not active:
        return None
    # isdigit alone admits "²", which int() refuses.
    return {int(p) for p in active.split(",") if p.strip().isascii() and p.strip().isdigit()}


def reached_port(pod: Obj, port: int) -> int:
    """Where the pod serves its container port `port` on its podIP (one-address mode moves it;
    an unreadable annotation, logged, moves nothing)."""
    return (pod_host_ports(pod) or HostPorts()).of(port)


def find_pool(objects: Iterable[Obj], name: str, namespace: str) -> tuple[Obj | None, list[Obj]]:
    """Among API objects (a pool file's), the InferencePool `namespace/name` and the namespace's
    Pods; a pool of an unknown group is a PoolError."""
    pool, pods = None, []
    for obj in objects:
        meta = obj.get("metadata") or {}
        if (meta.get("namespace") or "default") != namespace:
            continue
        if obj.get("kind") == "InferencePool" and meta.get("name") == name:
            if obj.get("apiVersion") not in POOL_API_VERSIONS:
                raise PoolError(
                    f"InferencePool {name}: unsupported apiVersion {obj.get('apiVersion')!r}"
                )
            pool = obj
        elif obj.get("kind") == "Pod":
            pods.append(obj)
    return pool, pods
