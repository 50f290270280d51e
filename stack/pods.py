"""The pods of one pool as the standalone controllers' pool file lists them, and how their
start reads to a person: one line per pod whenever its state changes (a real engine takes a
minute or more to load its model), and the reason a pod cannot start at all (its engine is not
installed here) as soon as the runtime reports it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from infergw.api import yaml_files
from infergw.api.names import ENGINE_NOT_INSTALLED
from infergw.cluster.pool import HOST_PORTS_ANNOTATION


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    ip: str
    phase: str
    ready: bool
    waiting: str = ""  # a container's waiting reason, if one waits
    message: str = ""  # and what it says
    restarts: int = 0
    ports: str = ""  # one-address mode: where its container ports moved (8000=20001,...)

    @classmethod
    def of(cls, pod: dict) -> PodView:
        status = pod.get("status") or {}
        containers = status.get("containerStatuses") or []
        waiting = next(
            (c["state"]["waiting"] for c in containers if "waiting" in (c.get("state") or {})),
            {},
        )
        return cls(
            name=pod["metadata"]["name"],
            ip=status.get("podIP") or "",
            phase=status.get("phase") or "Pending",
            ready=any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            ),
            waiting=waiting.get("reason", ""),
            message=waiting.get("message", ""),
            restarts=sum(int(c.get("restartCount", 0)) for c in containers),
            ports=((pod["metadata"].get("annotations") or {}).get(HOST_PORTS_ANNOTATION) or ""),
        )

    @property
    def not_installed(self) -> bool:
        return self.waiting == ENGINE_NOT_INSTALLED

    def state(self) -> str:
        """What a person waiting for it wants to know, without the time."""
        if self.ready:
            return "ready"
        if self.waiting:
            what = f"waiting ({self.waiting})"
        elif self.phase == "Running":
            what = "running, not ready yet (loading the model?)"
        else:
            what = self.phase.lower()
        return what + (f", {self.restarts} restarts" if self.restarts else "")

    def line(self, elapsed: float) -> str:
        where = f" on {self.ip}" if self.ip else ""
        where += f" (ports {self.ports})" if self.ports else ""
        return f"  pod {self.name}{where}: {self.state()} ({elapsed:.0f} s)"


def pool_pods(pool_file: Path, pool: str) -> list[PodView]:
    """The pods the pool selects, but those being deleted; none if the file is not (yet)
    readable."""
    try:
        docs = [d for d in yaml_files.safe_load_all(yaml_files.read_text(pool_file)) if d]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    pools = [d for d in docs if d.get("kind") == "InferencePool"]
    found = next((p for p in pools if p["metadata"]["name"] == pool), None)
    if found is None:
        return []
    namespace = found["metadata"].get("namespace", "default")
    selector = ((found.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return sorted(
        (
            PodView.of(d)
            for d in docs
            if d.get("kind") == "Pod"
            and d["metadata"].get("namespace", "default") == namespace
            and not d["metadata"].get("deletionTimestamp")
            and selector.items() <= (d["metadata"].get("labels") or {}).items()
        ),
        key=lambda p: p.name,
    )


class StartReport:
    """Lines for a person watching pods start: a pod's line when its state changes, and
    every `every` seconds the ones still starting."""

    def __init__(self, every: float = 15.0) -> None:
        self.every = every
        self._states: dict[str, str] = {}
        self._last_summary = 0.0

    def lines(self, pods: list[PodView], elapsed: float) -> list[str]:
        out = []
        for pod in pods:
            state = pod.state()
            if self._states.get(pod.name) != state:
                self._states[pod.name] = state
                out.append(pod.line(elapsed))
        starting = [p.name for p in pods if not p.ready]
        if starting and elapsed - self._last_summary >= self.every:
            self._last_summary = elapsed
            if out == []:  # nothing changed: say it is still going
                out.append(
                    f"  still starting after {elapsed:.0f} s: {len(starting)} of {len(pods)} "
                    f"pods ({', '.join(starting)})"
                )
        return out
