"""A Model's AdaptersLoaded condition: whether every serving pod's runtime sidecar holds every
adapter the Model names (its container ready), and if not, why — in the sidecar's own words,
read from its `/status` (runtime/sidecar.py) on the first pod that is not ready.

The pods run the Model's image, so their answer is read as untrusted: a bounded body, a reason
kept only if it is a condition reason, the message clipped.
"""

from __future__ import annotations

import json
import re

import aiohttp

from infergw.api import Model
from infergw.api.names import RUNTIME_PORT
from infergw.cluster.pool import reached_port
from infergw.cluster.store import POD, Store
from infergw.controllers.adapters import RUNTIME_CONTAINER
from infergw.controllers.model_objects import model_label

ADAPTERS_LOADED = "AdaptersLoaded"
NOT_LOADED = "AdaptersNotLoaded"  # a sidecar that could not say why
ASK_TIMEOUT = 2.0  # seconds for one sidecar's /status
MAX_ANSWER_BYTES = 64 * 1024
MAX_MESSAGE = 500
RECHECK_SECONDS = 5.0  # while not every adapter is loaded: the sidecar's state sends no event
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?\Z")  # the CRD's, for reasons


def _runtime_ready(pod: dict) -> bool:
    """Its sidecar's container ready, or the whole pod (which it is part of)."""
    status = pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    if any(c.get("name") == RUNTIME_CONTAINER and c.get("ready") for c in statuses):
        return True
    conditions = status.get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _runs_sidecar(pod: dict) -> bool:
    containers = (pod.get("spec") or {}).get("containers") or []
    return any(c.get("name") == RUNTIME_CONTAINER for c in containers)


async def sidecar_says(ip: str, port: int = RUNTIME_PORT) -> tuple[str, str] | None:
    """The reason and message of the sidecar at `ip`, or None if it does not answer them."""
    timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"http://{ip}:{port}/status"
            async with session.get(url, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_ANSWER_BYTES)
        doc = json.loads(body)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    reason, message = doc.get("reason"), doc.get("message")
    if not isinstance(reason, str) or len(reason) > 64 or not _REASON.match(reason):
        reason = NOT_LOADED
    if not isinstance(message, str):
        message = ""
    clean = "".join(c if c.isprintable() else " " for c in message[:MAX_MESSAGE])
    return reason, clean


async def adapters_loaded(store: Store, model: Model) -> tuple[bool | None, str, str]:
    """The condition: True when every serving pod's sidecar is ready; Unknown without pods;
    else False with the first unready pod's sidecar's reason and message."""
    m = model.metadata
    pods, _ = await store.list(POD, m.namespace or "default", model_label(model))
    serving = sorted(
        (p for p in pods if _runs_sidecar(p) and not p["metadata"].get("deletionTimestamp")),
        key=lambda p: p["metadata"]["name"],
    )
    if not serving:
        return None, "NoPods", "no pod of this Model runs the runtime sidecar"
    waiting = [p for p in serving if not _runtime_ready(p)]
    if not waiting:
        count = len(model.spec.lora_adapters or [])
        return True, ADAPTERS_LOADED, f"{count} adapter(s) loaded on {len(serving)} pod(s)"
    first = waiting[0]
    ip = (first.get("status") or {}).get("podIP")
    said = await sidecar_says(ip, reached_port(first, RUNTIME_PORT)) if ip else None
    reason, why = said or (NOT_LOADED, "its runtime sidecar is not ready and did not say why")
    return (
        False,
        reason,
        f"{len(waiting)}/{len(serving)} pod(s) without every adapter; "
        f"pod {first['metadata']['name']}: {why}",
    )
