"""Status conditions as Kubernetes writes them (metav1.Condition): lastTransitionTime moves
only when the status flips, so a reconcile that changes nothing writes nothing."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from infergw.cluster.store import Obj

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    obj: Obj, kind: str, ok: bool | None, reason: str, message: str, *, observed: bool = True
) -> dict:
    """The condition `kind` of obj's next status, keeping the previous transition time.
    `ok` None is status Unknown: the controller cannot tell yet."""
    status = UNKNOWN if ok is None else TRUE if ok else FALSE
    prev = find(obj, kind)
    out = {"type": kind, "status": status, "reason": reason, "message": message}
    if observed:
        out["observedGeneration"] = obj["metadata"].get("generation", 1)
    out["lastTransitionTime"] = (
        prev["lastTransitionTime"]
        if prev and prev.get("status") == status and prev.get("lastTransitionTime")
        else now_rfc3339()
    )
    return out


def find(obj: Obj | None, kind: str) -> dict | None:
    """The condition `kind` in obj's current status, or None."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def status_of(obj: Obj | None, kind: str) -> str:
    """The condition's status: True, False or Unknown (also when it is absent)."""
    c = find(obj, kind)
    return c.get("status", UNKNOWN) if c else UNKNOWN


def listed(items: Iterable[object], limit: int = 8) -> str:
    """A short comma-separated list for a condition message: the first `limit` items."""
    items = [str(i) for i in items]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")
