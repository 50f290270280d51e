"""Status conditions as Kubernetes writes them (metav1.Condition): lastTransitionTime moves
only when the status flips, so a reconcile that changes nothing writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime

from controllers.store import Obj


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    obj: Obj, kind: str, ok: bool, reason: str, message: str, *, observed: bool = True
) -> dict:
    """The condition `kind` of obj's next status, keeping the previous transition time."""
    status = "True" if ok else "False"
    old = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
    prev = old.get(kind)
    out = {"type": kind, "status": status, "reason": reason, "message": message}
    if observed:
        out["observedGeneration"] = obj["metadata"].get("generation", 1)
    out["lastTransitionTime"] = (
        prev["lastTransitionTime"] if prev and prev["status"] == status else now_rfc3339()
    )
    return out
