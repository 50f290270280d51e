"""Keep the local stack's processes running, as the kubelet keeps a pod's containers running.

A component that exits is started again: the first time at once, then after a back-off that
doubles from 10 s to a 5 min cap (the kubelet's CrashLoopBackOff); a component that ran for
10 min before it exited starts over at once. What a component left behind (processes it
started, which a SIGKILL orphans: the controllers' pods) is killed before it starts again,
as the kubelet kills a container's cgroup; each component's processes carry an environment
variable naming it, so they are found however they were started. Every exit and restart is
logged. Nothing is stopped because another component died: the rest of the stack serves
meanwhile, as the pool's failure mode says (FailOpen: Envoy routes without a picker).

The supervisor does not run by itself: its owner calls tick() regularly (`infergate up` from
its main loop, the soak benchmark from a task), so library users such as the tests keep
processes they kill dead unless they ask otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Set in every supervised process and inherited by its descendants: "<supervisor>/<name>".
MARKER = "INFERGATE_SUPERVISED"
Start = Callable[[dict[str, str]], subprocess.Popen]  # given the environment to start with


@dataclass(frozen=True, slots=True)
class BackOff:
    """The kubelet's container restart back-off."""

    initial: float = 10.0
    cap: float = 300.0
    reset_after: float = 600.0  # a run this long forgets earlier crashes

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restarting after the `crashes`-th exit in a row."""
        if crashes <= 1:
            return 0.0
        return min(self.initial * 2 ** (crashes - 2), self.cap)


@dataclass(slots=True)
class _Component:
    start: Start
    proc: subprocess.Popen
    started: float
    crashes: int = 0  # exits in a row, each after a run shorter than reset_after
    restarts: int = 0
    restart_at: float | None = None  # set while the component is down, waiting to restart


log = logging.getLogger(__name__)


def _warn(line: str) -> None:
    """Exits and restarts as the launcher's log lines (its --log-format: JSON under json)."""
    log.warning("%s", line)


class Supervisor:
    """Processes by name, each with the function that starts it again."""

    def __init__(self, backoff: BackOff = BackOff(), log: Callable[[str], None] = _warn):
        self.backoff = backoff
        self.log = log
        self._id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._components: dict[str, _Component] = {}

    def run(self, name: str, start: Start) -> subprocess.Popen:
        """Start `name` and keep it running until released."""
        proc = start(self._env(name))
        with self._lock:
            self._components[name] = _Component(start, proc, time.monotonic())
        return proc

    def release(self, name: str) -> subprocess.Popen | None:
        """Stop supervising `name` (its caller stops it); its current process, if any."""
        with self._lock:
            component = self._components.pop(name, None)
        return component.proc if component is not None else None

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The current process of every supervised component, in start order."""
        with self._lock:
            return {name: c.proc for name, c in self._components.items()}

    def restarts(self, name: str) -> int:
        with self._lock:
            component = self._components.get(name)
            return component.restarts if component is not None else 0

    def tick(self) -> None:
        """Notice exits and restart what is due; cheap enough to call every 0.2 s."""
        with self._lock:
            for name, c in self._components.items():
                now = time.monotonic()
                if c.restart_at is None:
                    status = c.proc.poll()
                    if status is None:
                        continue
                    killed = self.kill_leftovers(name)
                    c.crashes = 1 if now - c.started >= self.backoff.reset_after else c.crashes + 1
                    delay = self.backoff.delay(c.crashes)
                    c.restart_at = now + delay
                    self.log(
                        f"supervisor: {name} exited with status {status}; "
                        f"restarting in {delay:g} s (exit {c.crashes} in a row"
                        f"{f'; killed {killed} processes it left' if killed else ''})"
                    )
                if now >= c.restart_at:
                    self._restart(name, c, now)

    def _restart(self, name: str, c: _Component, now: float) -> None:
        try:
            c.proc = c.start(self._env(name))
        except OSError as exc:  # cannot even spawn: counts as one more crash
            c.crashes += 1
            c.restart_at = now + self.backoff.delay(c.crashes)
            self.log(f"supervisor: cannot restart {name}: {exc}; trying again later")
            return
        c.started, c.restart_at = now, None
        c.restarts += 1
        self.log(f"supervisor: restarted {name} (pid {c.proc.pid}, restart {c.restarts})")

    def kill_leftovers(self, name: str) -> int:
        """SIGKILL every process still carrying `name`'s marker; how many there were."""
        entry = f"{MARKER}={self._id}/{name}".encode()
        killed = 0
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if entry not in environ.read_bytes().split(b"\0"):
                    continue
                os.kill(int(environ.parent.name), signal.SIGKILL)
                killed += 1
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
        return killed

    def _env(self, name: str) -> dict[str, str]:
        return {**os.environ, MARKER: f"{self._id}/{name}"}
