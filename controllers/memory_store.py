"""Objects in memory with kube-apiserver's write semantics (see store.py): the standalone
backend of `infergate up`, and the store of the reconcile tests."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import deque
from collections.abc import AsyncIterator

from infergw.api import prune_nulls
from infergw.cluster.store import (
    AlreadyExists,
    Conflict,
    Gone,
    Invalid,
    Kind,
    NotFound,
    Obj,
    kind_of,
    labels_match,
)
from infergw.controllers.conditions import now_rfc3339

_Key = tuple[str, str, str]  # kind, namespace, name


class MemoryStore:
    def __init__(self, history: int = 10_000) -> None:
        self._objects: dict[_Key, Obj] = {}
        self._rv = 0
        self._history: deque[tuple[int, str, str, Obj]] = deque(maxlen=history)
        self._floor = 0  # watches from before this resourceVersion are Gone
        self._changed = asyncio.Event()

    # ---- reads --------------------------------------------------------------------------

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        obj = self._objects.get((kind.kind, self._ns(kind, namespace), name))
        return copy.deepcopy(obj)

    async def list(
        self, kind: Kind, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> tuple[list[Obj], str]:
        items = [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self._objects.items())
            if k == kind.kind and (namespace is None or ns == namespace) and labels_match(o, labels)
        ]
        return items, str(self._rv)

    # ---- writes -------------------------------------------------------------------------

    async def create(self, obj: Obj) -> Obj:
        obj = copy.deepcopy(prune_nulls(obj))  # as the API server reads a structural schema
        kind = kind_of(obj)
        m = obj.setdefault("metadata", {})
        if not m.get("name") and m.get("generateName"):
            m["name"] = m["generateName"] + uuid.uuid4().hex[:5]
        if not m.get("name"):
            raise Invalid(f"{kind.kind}: metadata.name is required")
        m["namespace"] = self._ns(kind, m.get("namespace"))
        key = (kind.kind, m["namespace"], m["name"])
        if key in self._objects:
            raise AlreadyExists(f'{kind.plural} "{m["name"]}" already exists')
        m.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        return self._write(key, obj, "ADDED")

    async def update(self, obj: Obj) -> Obj:
        return self._update(obj, status=False)

    async def update_status(self, obj: Obj) -> Obj:
        return self._update(obj, status=True)

    async def delete(self, kind: Kind, namespace: str, name: str) -> None:
        key = (kind.kind, self._ns(kind, namespace), name)
        obj = self._objects.get(key)
        if obj is None:
            raise NotFound(f'{kind.plural} "{name}" not found')
        m = obj["metadata"]
        if m.get("finalizers"):
            if not m.get("deletionTimestamp"):  # marked; removed once finalizers are gone
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                self._write(key, new, "MODIFIED")
            return
        self._remove(key)

    # ---- scale subresource ---------------------------------------------------------------

    async def scale(self, kind: Kind, namespace: str, name: str) -> Obj:
        """The autoscaling/v1 Scale of an object with a scale subresource (ModelInfer)."""
        obj = self._objects.get((kind.kind, self._ns(kind, namespace), name))
        if obj is None:
            raise NotFound(f'{kind.plural} "{name}" not found')
        return scale_of(obj)

    async def set_scale(self, kind: Kind, namespace: str, name: str, replicas: int) -> Obj:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise Invalid(f"{kind.plural} {name!r}: spec.replicas must be an integer >= 0")
        key = (kind.kind, self._ns(kind, namespace), name)
        current = self._objects.get(key)
        if current is None:
            raise NotFound(f'{kind.plural} "{name}" not found')
        new = copy.deepcopy(current)
        new.setdefault("spec", {})["replicas"] = replicas
        if new["spec"] != current.get("spec"):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        return scale_of(self._write(key, new, "MODIFIED"))

    # ---- watch --------------------------------------------------------------------------

    async def watch(
        self,
        kind: Kind,
        namespace: str | None,
        resource_version: str,
        labels: dict[str, str] | None = None,
    ) -> AsyncIterator[tuple[str, Obj]]:
        last = int(resource_version or 0)
        while True:
            if last < self._floor:
                raise Gone(f"too old resource version: {last} ({self._floor})")
            changed = self._changed
            for rv, event, k, obj in list(self._history):
                if rv <= last:
                    continue
                last = rv
                if k == kind.kind and (
                    namespace is None or obj["metadata"].get("namespace") == namespace
                ):
                    if not labels_match(obj, labels):
                        if event == "ADDED":
                            continue
                        # No longer (or never) matching: a receiver that had it drops it.
                        event = "DELETED"
                    yield event, copy.deepcopy(obj)
            await changed.wait()

    def expire_history(self) -> None:
        """Forget past events, as etcd compaction does: older watches get Gone."""
        self._history.clear()
        self._floor = self._rv
        self._wake()

    # ---- internals ----------------------------------------------------------------------

    @staticmethod
    def _ns(kind: Kind, namespace: str | None) -> str:
        return (namespace or "default") if kind.namespaced else ""

    def _update(self, obj: Obj, *, status: bool) -> Obj:
        kind = kind_of(obj)
        m = obj.get("metadata") or {}
        key = (kind.kind, self._ns(kind, m.get("namespace")), m.get("name", ""))
        current = self._objects.get(key)
        if current is None:
            raise NotFound(f'{kind.plural} "{m.get("name")}" not found')
        want = m.get("resourceVersion")
        if want and want != current["metadata"]["resourceVersion"]:
            raise Conflict(
                f'Operation cannot be fulfilled on {kind.plural} "{key[2]}": the object has '
                "been modified; please apply your changes to the latest version"
            )
        if status:
            new = copy.deepcopy(current)
            new["status"] = copy.deepcopy(obj.get("status"))
        else:
            new = copy.deepcopy(prune_nulls(obj))
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            nm = new.setdefault("metadata", {})
            # Fields only the server sets: a client's copy is ignored, as kube-apiserver does.
            for f in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                if f in current["metadata"]:
                    nm[f] = current["metadata"][f]
                else:
                    nm.pop(f, None)
            nm["namespace"] = key[1]
            if new.get("spec") != current.get("spec"):
                nm["generation"] = current["metadata"].get("generation", 1) + 1
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(key)
            return new
        return self._write(key, new, "MODIFIED")

    def _write(self, key: _Key, obj: Obj, event: str) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = obj
        self._record(event, key[0], obj)
        return copy.deepcopy(obj)

    def _remove(self, key: _Key) -> None:
        obj = self._objects.pop(key, None)
        if obj is None:
            return
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._record("DELETED", key[0], obj)
        self._collect_dependents(obj["metadata"]["uid"])

    def _collect_dependents(self, uid: str) -> None:
        """Background cascading deletion: objects owned by a deleted one go too."""
        for key, o in list(self._objects.items()):
            refs = o["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                remaining = [r for r in refs if r.get("uid") != uid]
                if remaining and any(self._uid_exists(r.get("uid")) for r in remaining):
                    continue  # another owner still holds it
                if key in self._objects:
                    self._delete_now(key)

    def _delete_now(self, key: _Key) -> None:
        obj = self._objects[key]
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                self._write(key, new, "MODIFIED")
            return
        self._remove(key)

    def _uid_exists(self, uid: str | None) -> bool:
        return any(o["metadata"].get("uid") == uid for o in self._objects.values())

    def _record(self, event: str, kind: str, obj: Obj) -> None:
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0][0]
        self._history.append((self._rv, event, kind, copy.deepcopy(obj)))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def scale_of(obj: Obj) -> Obj:
    """.spec.replicas, .status.replicas and .status.labelSelector as a Scale, the paths
    ModelInfer's CRD declares for its scale subresource (as the API server answers; the test
    API emulator, tests/kubeapi.py, answers with this too)."""
    meta, status = obj["metadata"], obj.get("status") or {}
    fields = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
    scale = {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {f: meta[f] for f in fields if f in meta},
        "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
        "status": {"replicas": status.get("replicas", 0)},
    }
    if status.get("labelSelector"):
        scale["status"]["selector"] = status["labelSelector"]
    return scale
