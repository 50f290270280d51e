"""Pods as local processes: the kubelet of standalone mode.

Every Pod in the store becomes a process on its own loopback address (127.0.0.2, .3, …), so
pods listen on the container port their template names — as in a cluster, where every pod
has its own IP — and the picker's pool needs a single target port. The runtime writes back
what a kubelet would: podIP, phase, the Ready condition (from the readiness probe, else
"process running") and containerStatuses with restartCount; it restarts processes per
restartPolicy with a growing back-off, and stops them when their Pod is deleted.

The first container's `command` + `args` run with `$(VAR)` expanded from its env, as the
kubelet does; env entries may use fieldRef `metadata.name`, `metadata.namespace` and
`status.podIP`. A container without a command runs the simulator with its args.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from controllers.informer import Informer
from controllers.store import POD, NotFound, Obj, Store

log = logging.getLogger("controllers.local_runtime")
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(slots=True)
class _Running:
    pod: Obj
    ip: str
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    task: asyncio.Task | None = None
    stopping: bool = False
    env: dict[str, str] = field(default_factory=dict)


class LocalRuntime:
    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        first_ip: int = 2,
        max_backoff: float = 10.0,
        probe_interval: float = 0.2,
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.max_backoff = max_backoff
        self.probe_interval = probe_interval
        self._next_ip = first_ip
        self._free_ips: list[str] = []
        self._running: dict[tuple[str, str], _Running] = {}
        self._informer = Informer(store, POD)
        self._informer.add_handler(self._on_pod)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1))
        self._informer.start()
        await self._informer.synced.wait()

    async def stop(self) -> None:
        await self._informer.stop()
        await asyncio.gather(*(self._stop(k) for k in list(self._running)))
        if self._session is not None:
            await self._session.close()

    def process(self, namespace: str, name: str) -> asyncio.subprocess.Process | None:
        run = self._running.get((namespace, name))
        return run.proc if run else None

    # ---- pod events ---------------------------------------------------------------------

    def _on_pod(self, event: str, pod: Obj) -> None:
        key = (pod["metadata"].get("namespace", "default"), pod["metadata"]["name"])
        run = self._running.get(key)
        if event == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            if run is not None:
                asyncio.get_running_loop().create_task(self._stop(key))
            return
        if run is None or run.pod["metadata"].get("uid") != pod["metadata"].get("uid"):
            if run is not None:  # same name, new pod: the old process goes first
                asyncio.get_running_loop().create_task(self._stop(key))
            run = _Running(pod=pod, ip=self._take_ip(_container_ports(pod)))
            self._running[key] = run
            run.task = asyncio.create_task(self._supervise(key, run), name=f"pod {key[1]}")

    def _take_ip(self, ports: list[int]) -> str:
        """A loopback address where the pod's ports are free: another stack on this
        machine (or a leftover process) may hold some, and a pod that cannot bind its port
        must not pass its readiness probe against someone else's server."""
        for ip in list(self._free_ips):
            if _ports_free(ip, ports):
                self._free_ips.remove(ip)
                return ip
        while self._next_ip <= 254:
            ip = f"127.0.0.{self._next_ip}"
            self._next_ip += 1
            if _ports_free(ip, ports):
                return ip
        raise RuntimeError("no loopback address left for another local pod")

    # ---- one pod ------------------------------------------------------------------------

    async def _supervise(self, key: tuple[str, str], run: _Running) -> None:
        container = (run.pod.get("spec", {}).get("containers") or [{}])[0]
        policy = run.pod.get("spec", {}).get("restartPolicy", "Always")
        run.env = self._env(run.pod, container, run.ip)
        cmd = self._command(container, run.env)
        logfile = self.state_dir / "pods" / f"{key[0]}_{key[1]}.log"
        backoff = 1.0
        while not run.stopping:
            with open(logfile, "ab") as out:  # noqa: ASYNC230 - an append-open, instant
                run.proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **run.env},
                    start_new_session=True,
                )
            log.info("pod %s/%s started on %s: %s", *key, run.ip, " ".join(cmd))
            await self._write_status(key, run, "Running")
            probe = asyncio.create_task(self._probe(key, run, container))
            code = await run.proc.wait()
            probe.cancel()
            run.ready = False
            if run.stopping:
                return
            log.warning("pod %s/%s exited with %s", *key, code)
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                await self._write_status(key, run, "Succeeded" if code == 0 else "Failed", code)
                return
            run.restarts += 1
            await self._write_status(key, run, "Running", code)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _probe(self, key: tuple[str, str], run: _Running, container: dict) -> None:
        """Ready when the readiness probe's httpGet answers 200 (no probe: when started)."""
        http = (container.get("readinessProbe") or {}).get("httpGet")
        while True:
            ok = True
            if http:
                port = _port(http.get("port"), container)
                url = f"http://{run.ip}:{port}{http.get('path', '/')}"
                try:
                    assert self._session is not None
                    async with self._session.get(url) as resp:
                        ok = resp.status == 200
                except (TimeoutError, aiohttp.ClientError, OSError):
                    ok = False
            if ok != run.ready:
                run.ready = ok
                await self._write_status(key, run, "Running")
            await asyncio.sleep(self.probe_interval)

    async def _write_status(self, key, run: _Running, phase: str, exit_code: int | None = None):
        pod = await self.store.get(POD, *key)
        if pod is None or pod["metadata"].get("uid") != run.pod["metadata"].get("uid"):
            return
        name = ((run.pod.get("spec", {}).get("containers") or [{}])[0]).get("name", "main")
        state = {"running": {}} if phase == "Running" else {"terminated": {"exitCode": exit_code}}
        pod = copy.deepcopy(pod)
        pod["metadata"].pop("resourceVersion", None)  # the kubelet's write wins
        pod["status"] = {
            "phase": phase,
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "conditions": [{"type": "Ready", "status": "True" if run.ready else "False"}],
            "containerStatuses": [
                {"name": name, "ready": run.ready, "restartCount": run.restarts, "state": state}
            ],
        }
        try:
            await self.store.update_status(pod)
        except NotFound:
            pass

    async def _stop(self, key: tuple[str, str]) -> None:
        run = self._running.pop(key, None)
        if run is None:
            return
        run.stopping = True
        proc = run.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 10)
            except (ProcessLookupError, TimeoutError):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
        if run.task is not None:
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
        self._free_ips.append(run.ip)

    # ---- command line -------------------------------------------------------------------

    @staticmethod
    def _env(pod: Obj, container: dict, ip: str) -> dict[str, str]:
        fields = {
            "metadata.name": pod["metadata"]["name"],
            "metadata.namespace": pod["metadata"].get("namespace", "default"),
            "status.podIP": ip,
        }
        env = {"POD_IP": ip}
        for e in container.get("env") or []:
            ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            value = fields.get(ref, "") if ref else str(e.get("value", ""))
            env[e["name"]] = _expand(value, env)
        return env

    @staticmethod
    def _command(container: dict, env: dict[str, str]) -> list[str]:
        args = [*(container.get("command") or []), *(container.get("args") or [])]
        if not container.get("command"):  # the simulator, on the pod's own address
            args = [sys.executable, "-m", "simulator", *args, "--host", env["POD_IP"]]
        return [_expand(str(a), env) for a in args]


def _container_ports(pod: Obj) -> list[int]:
    return [
        int(p["containerPort"])
        for c in pod.get("spec", {}).get("containers") or []
        for p in c.get("ports") or []
        if p.get("containerPort")
    ]


def _ports_free(ip: str, ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def _expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) → its value; unknown references stay as written, as the kubelet leaves them."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _port(port, container: dict) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"readiness probe port {port!r} is not a container port")
