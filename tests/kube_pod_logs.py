"""The pod `log` subresource of the API emulator (tests/kubeapi.py), as kube-apiserver and the
kubelet serve `GET /api/v1/namespaces/NS/pods/NAME/log`: what a test wrote as a container's
log, as plain text, with the options `kubectl logs` sends (`container`, `tailLines`,
`limitBytes`: the last lines, then at most that many bytes of them) and the server's
refusals (400): no container named in a pod of several, a container the pod does not have, a
container that has not started, an option that is not a number in its range.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Obj = dict[str, Any]


class LogRefused(Exception):
    """A 400 as the API server answers it; `message` is its Status's message."""


def _names(containers: list[Obj] | None) -> list[str]:
    return [c.get("name", "") for c in containers or []]


def _container(pod: Obj, asked: str | None) -> str:
    """The container a log request reads, as LogLocation chooses it."""
    name = pod["metadata"]["name"]
    spec = pod.get("spec") or {}
    containers, init = _names(spec.get("containers")), _names(spec.get("initContainers"))
    if not asked:
        if len(containers) == 1:
            return containers[0]
        choose = f"a container name must be specified for pod {name}, choose one of: {containers}"
        raise LogRefused(choose + (f" or one of the init containers: {init}" if init else ""))
    if asked not in containers + init:
        raise LogRefused(f"container {asked} is not valid for pod {name}")
    return asked


def _started(pod: Obj, container: str) -> None:
    """The kubelet has no log of a container that has not run yet."""
    status = pod.get("status") or {}
    for s in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = s.get("state") or {}
        if s.get("name") == container and ("running" in state or "terminated" in state):
            return
    name = pod["metadata"]["name"]
    raise LogRefused(
        f'container "{container}" in pod "{name}" is waiting to start: PodInitializing'
    )


def _count(query: Mapping[str, str], option: str, least: int) -> int | None:
    text = query.get(option)
    if text is None:
        return None
    if not text.lstrip("-").isdigit():
        raise LogRefused(f"{option}: {text!r} is not an integer")
    if int(text) < least:
        raise LogRefused(f"{option}: must be greater than {'or equal to ' if least == 0 else ''}0")
    return int(text)


def served_log(
    pod: Obj, logs: Mapping[tuple[str, str, str], bytes], query: Mapping[str, str]
) -> bytes:
    """The body of a log request for `pod` (`logs`: (namespace, pod, container) → its log);
    LogRefused."""
    container = _container(pod, query.get("container"))
    _started(pod, container)
    tail, limit = _count(query, "tailLines", 0), _count(query, "limitBytes", 1)
    meta = pod["metadata"]
    text = logs.get((meta.get("namespace", "default"), meta["name"], container), b"")
    if tail is not None:
        lines = text.splitlines(keepends=True)
        text = b"".join(lines[len(lines) - tail :]) if tail else b""
    return text[:limit] if limit is not None else text
