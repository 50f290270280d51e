"""What `infergate status --kubernetes` reads of a cluster namespace: its Models, their pods,
the autoscaler's last decisions and the Warning Events (rows of status_sources.py), and each
InferencePool's picker replicas — their `/metrics` and `/debug/endpoints`, read through the
API server's pod proxy (`pods/NAME:PORT/proxy/...`, the `get` verb on `pods/proxy`), so a
pool's pods, load and KV use show without a port-forward.

Which pickers: the ready pods behind the Service each pool's `endpointPickerRef` names, as
the autoscaler finds them (cluster/picker_pods.py); each replica is its own view, as
each counts its own requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from infergw.api.names import MODEL_LABEL
from infergw.cluster.kube_store import KubeStore
from infergw.cluster.picker_pods import metrics_port, picker_pods
from infergw.cluster.store import (
    AUTOSCALING_BINDING,
    EVENT,
    INFERENCE_POOL,
    MODEL,
    POD,
    Kind,
    Obj,
    StoreError,
)
from infergw.stack.status_sources import (
    ERROR_LIMIT,
    PAGE_LIMIT,
    TIMEOUT,
    ClusterView,
    PickerView,
    SourceError,
    cluster_pod,
    decisions,
    model_row,
    read_pages,
    recent_warnings,
    text,
    within,
)

MAX_MODELS = 64
MAX_PODS = 128
MAX_BINDINGS = 32
MAX_POOLS = 8  # pools whose pickers are read
MAX_PICKERS = 4  # replicas read per pool


async def read_cluster(store: KubeStore, namespace: str) -> ClusterView:
    """A namespace's Models, their pods, bindings' decisions and Warning Events; a kind that
    cannot be read (no RBAC for it, say) is named in the view's error, the others still show."""
    view = ClusterView(namespace)
    problems = []

    async def listed(kind: Kind) -> list[Obj]:
        try:
            objs, _ = await store.list(kind, namespace)
        except (StoreError, OSError) as exc:
            problems.append(f"cannot list {kind.plural}: {exc}")
            return []
        return objs

    models, pods, bindings, events = [
        await listed(k) for k in (MODEL, POD, AUTOSCALING_BINDING, EVENT)
    ]
    view.models = [model_row(m) for m in models[:MAX_MODELS]]
    ours = [p for p in pods if MODEL_LABEL in ((p.get("metadata") or {}).get("labels") or {})]
    view.pods = [cluster_pod(p) for p in ours[:MAX_PODS]]
    view.decisions = [d for b in bindings[:MAX_BINDINGS] for d in decisions(b)]
    view.warnings = recent_warnings(events)
    view.error = text("; ".join(problems), ERROR_LIMIT) or None
    return view


async def read_pool_pickers(store: KubeStore, namespace: str) -> list[PickerView]:
    """A view of each picker replica of the namespace's pools; a pool with none ready, or
    that cannot be read, is a view with its error."""
    try:
        pools, _ = await store.list(INFERENCE_POOL, namespace)
    except (StoreError, OSError) as exc:
        where = f"namespace {namespace}"
        return [PickerView(where, error=text(f"cannot list InferencePools: {exc}", ERROR_LIMIT))]
    views: list[PickerView | Awaitable[PickerView]] = []
    for pool in pools[:MAX_POOLS]:
        name = text((pool.get("metadata") or {}).get("name")) or "?"
        try:
            pods = await picker_pods(store, namespace, pool)
        except (StoreError, OSError) as exc:
            error = text(f"cannot find its pickers: {exc}", ERROR_LIMIT)
            views.append(PickerView(f"pool {namespace}/{name}", error=error, pool=name))
            continue
        if not pods:
            error = "no ready picker pod behind its endpointPickerRef"
            views.append(PickerView(f"pool {namespace}/{name}", error=error, pool=name))
        for pod in pods[:MAX_PICKERS]:
            get = proxied(store, namespace, pod)
            where = f"pod {namespace}/{pod['metadata']['name']} (API server proxy)"
            views.append(asyncio.to_thread(read_pages, where, get))
    # the replicas read at once: a refresh waits for the slowest, not for their sum
    pending = [v for v in views if not isinstance(v, PickerView)]
    done = iter(await asyncio.gather(*pending))
    return [v if isinstance(v, PickerView) else next(done) for v in views]


def proxied(store: KubeStore, namespace: str, pod: Obj) -> Callable[[str], bytes]:
    """A page getter for read_pages: the picker pod's metrics port, through the API server."""
    name, port = pod["metadata"]["name"], metrics_port(pod)

    def get(path: str) -> bytes:
        where = f"pods/{name}:{port}/proxy{path}"
        try:
            body = store.pod_page(namespace, name, port, path, PAGE_LIMIT, TIMEOUT)
        except (StoreError, OSError) as exc:
            raise SourceError(f"{where}: {exc}") from None
        return within(where, body, PAGE_LIMIT)

    return get
