"""The Model reconciler: keep the objects a Model expands into (model_objects.py) equal to
what the Model says, and report its serving groups' readiness.

Edits propagate by comparing each owned object's spec with the desired one. The ModelInfer's
replica count is the Model's only until an autoscaler owns it: with `autoscaling` set, the
binding's target scale is left to the autoscaler after creation. Deleting the Model deletes
everything it made through owner references (the API server's garbage collector, or the
standalone store's).
"""

from __future__ import annotations

import logging

from controllers import model_objects
from controllers.conditions import condition
from controllers.store import (
    KINDS,
    MODEL,
    MODEL_INFER,
    AlreadyExists,
    NotFound,
    Obj,
    Store,
    controller_of,
)

log = logging.getLogger("controllers.model")


class ModelReconciler:
    kind = MODEL

    def __init__(self, store: Store) -> None:
        self.store = store

    async def reconcile(self, namespace: str, name: str) -> float | None:
        model = await self.store.get(MODEL, namespace, name)
        if model is None or model["metadata"].get("deletionTimestamp"):
            return None
        autoscaled = bool(model["spec"].get("autoscaling"))
        for want in model_objects.desired(model):
            await self._apply(model, want, keep_replicas=autoscaled)
        await self._write_status(model)
        return None

    async def _apply(self, model: Obj, want: Obj, *, keep_replicas: bool) -> None:
        kind = KINDS[want["kind"]]
        m = want["metadata"]
        have = await self.store.get(kind, m["namespace"], m["name"])
        if have is None:
            try:
                await self.store.create(want)
                log.info("model %s: created %s %s", model["metadata"]["name"], kind.kind, m["name"])
            except AlreadyExists:
                pass
            return
        owner = controller_of(have)
        if owner is None or owner.get("uid") != model["metadata"]["uid"]:
            log.warning(
                "model %s: %s %s exists and is not ours; leaving it alone",
                model["metadata"]["name"], kind.kind, m["name"],
            )  # fmt: skip
            return
        spec = dict(want["spec"])
        if keep_replicas and kind is MODEL_INFER:
            spec["replicas"] = have["spec"].get("replicas", spec["replicas"])
        labels = {**(have["metadata"].get("labels") or {}), **m["labels"]}
        if have.get("spec") == spec and have["metadata"].get("labels") == labels:
            return
        have["spec"] = spec
        have["metadata"]["labels"] = labels
        await self.store.update(have)  # a Conflict retries the whole pass
        log.info("model %s: updated %s %s", model["metadata"]["name"], kind.kind, m["name"])

    async def _write_status(self, model: Obj) -> None:
        m = model["metadata"]
        mi = await self.store.get(MODEL_INFER, m.get("namespace", "default"), m["name"])
        st = (mi or {}).get("status") or {}
        want = int((mi or {}).get("spec", {}).get("replicas", 0))
        ready = int(st.get("readyReplicas", 0))
        ok = mi is not None and ready >= want > 0
        status = {
            "observedGeneration": m.get("generation", 1),
            "replicas": int(st.get("replicas", 0)),
            "readyReplicas": ready,
            "conditions": [
                condition(
                    model,
                    "Ready",
                    ok,
                    "GroupsReady" if ok else "GroupsNotReady",
                    f"{ready}/{want} serving groups ready",
                )
            ],
        }
        if model.get("status") == status:
            return
        model["status"] = status
        try:
            await self.store.update_status(model)
        except NotFound:
            pass
