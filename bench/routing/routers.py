"""The routers under test. Each starts in front of a running fleet, answers OpenAI requests
on a base URL and names the processes whose CPU time is its cost.

infergate runs as in production: Envoy with the picker as ext_proc, the picker reading the
pods' KV events per pod. vllm-router and sglang-router run from their PyPI wheels with their
own defaults; only what any user must set (worker URLs, policy, the KV-event source) is set.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import free_port
from infergate.readiness import wait_http
from infergate.stack import LocalStack

# infergate's scheduling profiles: (plugin, weight); a max-score picker closes each.
INFERGATE_PROFILES = {
    "precise": [
        ("precise-prefix-cache-scorer", 3),
        ("queue-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
    ],
    "approximate": [
        ("prefix-cache-scorer", 3),
        ("queue-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
    ],
    "load": [("queue-scorer", 1), ("kv-cache-utilization-scorer", 1), ("least-request", 1)],
    "random": [("random-scorer", 1)],
}


def picker_config(plugins: list[tuple[str, float]]) -> str:
    lines = [
        "apiVersion: inference.networking.x-k8s.io/v1alpha1",
        "kind: EndpointPickerConfig",
        "plugins:",
    ]
    lines += [f"- type: {t}" for t, _ in plugins] + ["- type: max-score-picker"]
    lines += ["schedulingProfiles:", "- name: default", "  plugins:"]
    lines += [f"  - {{pluginRef: {t}, weight: {w}}}" for t, w in plugins]
    lines += ["  - {pluginRef: max-score-picker}"]
    return "\n".join(lines) + "\n"


class RouterUnavailable(RuntimeError):
    """The router cannot run here (not installed): the benchmark reports it and goes on."""


@dataclass(slots=True)
class InfergateRouter:
    config: str  # a key of INFERGATE_PROFILES
    _stack: LocalStack | None = None

    @property
    def name(self) -> str:
        return f"infergate-{self.config}"

    def start(self, stack: LocalStack) -> str:
        path = stack.cfg.workdir / "epp-config.yaml"
        path.write_text(picker_config(INFERGATE_PROFILES[self.config]))
        stack.cfg.picker_config = path
        stack.start_picker()
        stack.start_envoy()
        self._stack = stack
        return stack.url

    def pids(self) -> list[int]:
        assert self._stack is not None
        return [self._stack.procs[n].pid for n in ("picker", "envoy")]

    def stop(self) -> None:
        pass  # the stack stops the picker and Envoy with the pods


@dataclass(slots=True)
class ExternalRouter:
    """A router binary from PyPI started with a command line built for the fleet."""

    name: str
    binary: str  # console script in this Python's environment
    policy: str
    _proc: subprocess.Popen | None = None

    def start(self, stack: LocalStack) -> str:
        exe = _script(self.binary)
        port = free_port()
        cmd = self.command(exe, port, stack)
        log = open(stack.cfg.workdir / f"{self.name}.log", "wb")
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 60, self._proc)
        time.sleep(1.0)  # let it see every worker healthy before traffic starts
        return url

    def command(self, exe: str, port: int, stack: LocalStack) -> list[str]:
        raise NotImplementedError(f"no command line for {self.name}")

    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc else []

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RouterUnavailable(f"{name} is not installed (pip install '.[bench-routers]')")
    return found


def EXTERNAL_ROUTERS() -> list[ExternalRouter]:
    return []
