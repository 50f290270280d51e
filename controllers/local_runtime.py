"""Pods as local processes: the kubelet of standalone mode.

Every Pod in the store gets its own loopback address (127.0.0.2, .3, …; claimed against the
machine's other runtimes, address_locks.py), so pods listen on the container port their
template names — as in a cluster, where every pod has its own IP — and the picker's pool
needs a single target port. Where those addresses are missing (macOS), one-address mode
(`pod_addresses` ONE, api/pod_ports.py) puts every pod on 127.0.0.1 and gives each of its
container ports a free host port, claimed the same way: the containers' command lines and env
say the moved ports (moved_ports.py) and so does the pod's infergate.io/host-ports annotation,
written before the pod is reported ready. Every container of the pod is its own
process on that address (the containers of a pod share it, as they share a network
namespace), restarted per the pod's restartPolicy with its own growing back-off and
restartCount, and its output goes to `<state-dir>/pods/<namespace>_<pod>_<container>.log`.
The runtime writes back what a kubelet would: podIP, phase, the Ready condition (every
container's readiness probe passes; a container without one is ready while it runs) and
containerStatuses.

Stopping is the kubelet's too. A container is its process and everything it started (its own
session; see process_group.py): when the main process exits, the rest of its group is killed
before a restart, so no child keeps the memory or the port the next incarnation needs. A pod
the runtime runs carries its finalizer, so deleting it (scale-down, a rolling update, scale to
zero) first marks it terminating — not ready, so out of the picker's pool file and Envoy's EDS —
then each container sleeps its lifecycle.preStop.sleep.seconds, if any (so the picker and Envoy
drop the pod before it stops listening), its main process gets SIGTERM and what is left of the
pod's terminationGracePeriodSeconds (30 by default) to finish what it serves, then SIGKILL with
its group; only then does the finalizer go and the Pod with it.

Each container's `command` + `args` run with `$(VAR)` expanded from its env, as the kubelet
does; env entries may use fieldRef `metadata.name`, `metadata.namespace` and `status.podIP`,
and POD_IP is always set, with the runtime's own `env` (standalone mode: where the pool
file is, as a kubelet tells every pod where the API server is). There are no images here,
only what is installed on this machine:
- a command whose first word is `infergate` runs this installation's CLI
  (`sys.executable -m infergw.cli ...`), e.g. the simulator's `infergate simulate` or the
  decode pod's `infergate connector`, without `.venv/bin` on PATH;
- a container without a command runs the simulator with its args (`--host` the pod's
  address) if its image is a simulator image (api/engines.py), as the infergate image's
  entrypoint does with arguments that start with a flag;
- any other command runs if it is installed: its program is on the container's PATH and,
  for `python -m MODULE`, that Python finds the module. Otherwise (or for a container without
  a command whose image is not the simulator's) the container is not started: it waits with
  reason EngineNotInstalled and a message naming what is missing — the pod stays Pending and
  not ready, as a kubelet leaves a pod whose image it lacks (ErrImageNeverPull) — and the
  runtime looks again after its back-off, so installing the engine starts the pod. The
  simulator never stands in for an engine that is not there.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from infergw.api.engines import SIMULATOR_IMAGES, image_repository
from infergw.api.lifetime import die_with_parent
from infergw.api.loopback import missing_loopback
from infergw.api.names import ENGINE_NOT_INSTALLED
from infergw.api.pod_ports import FIRST_HOST_PORT, LAST_HOST_PORT, MANY, ONE, ONE_ADDRESS, HostPorts
from infergw.cluster.informer import Informer
from infergw.cluster.pool import HOST_PORTS_ANNOTATION
from infergw.cluster.store import POD, NotFound, Obj, Store
from infergw.controllers.address_locks import AddressLocks
from infergw.controllers.conditions import now_rfc3339
from infergw.controllers.engine_command import INSTALL_HINTS
from infergw.controllers.moved_ports import moved_args, moved_env
from infergw.controllers.process_group import stop_container
from infergw.fetch.evict import hold_all, release

log = logging.getLogger("controllers.local_runtime")
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
BACKOFF_RESET_SECONDS = 600.0  # a container that ran this long starts its back-off afresh
FINALIZER = "infergate.io/local-runtime"  # held while the pod's processes may still run
DEFAULT_GRACE_SECONDS = 30  # terminationGracePeriodSeconds when the pod does not say
# Pods run at once, the kubelet's default maxPods: `replicas: 1000` typed for 10 would
# otherwise start a thousand engines on this machine. The others wait, Pending.
MAX_PODS = 110
UNSCHEDULABLE = "Unschedulable"
# How often pods that found no address or port try again, as the scheduler retries an
# unschedulable pod: another runtime's pods or a leftover process may let go of them.
NO_ROOM_RETRY_SECONDS = 10.0
LAST_POD_IP = 254  # 127.0.0.254: the last loopback address a pod takes
TERMINATION_MESSAGE_BYTES = 2048  # the kubelet's bounds on a message taken from the log
LOG_TAIL_BYTES = 4096  # what log_tail reads at most: the last lines, as `kubectl logs --tail`
TERMINATION_MESSAGE_LINES = 80


class NotInstalled(Exception):
    """A container's command cannot run on this machine; the message says what is missing."""


class NoRoom(RuntimeError):
    """No loopback address (or, one-address mode, no port) is free for the pod now; the
    message says which. The pod waits Pending and tries again."""


@dataclass(slots=True)
class _Waiting:
    pod: Obj
    reason: str  # the message its Unschedulable condition carries (reported once)


@dataclass(slots=True)
class _Container:
    name: str
    spec: dict
    env: dict[str, str]
    logfile: Path
    cmd: list[str] = field(default_factory=list)  # empty until it is known to run here
    missing: str | None = None  # why it cannot run here (NotInstalled), while it cannot
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    running: bool = False
    started_at: str | None = None  # of the running process, as the kubelet reports it
    done: bool = False  # exited and, per restartPolicy, not restarted
    exit_code: int | None = None  # the last exit
    message: str | None = None  # the last failed exit's termination message
    task: asyncio.Task | None = None


@dataclass(slots=True)
class _Running:
    pod: Obj
    ip: str
    ports: HostPorts = field(default_factory=HostPorts)  # one-address mode: where they moved
    # The pod carries its ports' annotation (one-address mode): before that, nobody could
    # reach it where it listens, so it is not reported ready.
    published: bool = True
    containers: list[_Container] = field(default_factory=list)
    init: list[_Container] = field(default_factory=list)  # run one by one, before containers
    initialized: bool = True  # every init container exited 0 (or there are none)
    starting: asyncio.Task | None = None  # the init containers' run, then the containers' start
    stopping: bool = False
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Shared locks on the weights cache entries its containers read (fetch/evict.py), from
    # their start until the pod stops: an eviction never removes them under the engine.
    holds: list[int] = field(default_factory=list)


class LocalRuntime:
    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        first_ip: int = 2,
        max_backoff: float = 10.0,
        probe_interval: float = 0.2,
        env: dict[str, str] | None = None,
        max_pods: int = MAX_PODS,
        address_locks: AddressLocks | None = None,
        pod_addresses: str = MANY,
        no_room_retry: float = NO_ROOM_RETRY_SECONDS,
    ) -> None:
        self.store = store
        # MANY: a loopback address per pod; ONE: every pod on 127.0.0.1, ports of its own.
        self.pod_addresses = pod_addresses
        self._next_port = FIRST_HOST_PORT
        # Addresses this runtime's pods use, claimed against the machine's other runtimes.
        self._addresses = address_locks or AddressLocks()
        self.max_pods = max_pods
        # Pods waiting for room, in arrival order: each starts when a running one is gone
        # (or, waiting for an address or port, when a retry finds one).
        self._pending: dict[tuple[str, str], _Waiting] = {}
        self.no_room_retry = no_room_retry
        self._retry: asyncio.TimerHandle | None = None
        # Set in every container, as a kubelet sets KUBERNETES_SERVICE_HOST.
        self.env = dict(env or {})
        self.state_dir = state_dir
        self.max_backoff = max_backoff
        self.probe_interval = probe_interval
        self._first_ip = first_ip
        self._next_ip = first_ip
        self._free_ips: list[str] = []
        self._running: dict[tuple[str, str], _Running] = {}
        self._stopping: set[asyncio.Task] = set()  # pods being stopped, finalizers being set
        self._informer = Informer(store, POD)
        self._informer.add_handler(self._on_pod)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1))
        self._informer.start()
        await self._informer.synced.wait()

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        await self._informer.stop()
        await asyncio.gather(*(self._stop(k) for k in list(self._running)), *self._stopping)
        if self._session is not None:
            await self._session.close()
        self._addresses.release_all()

    def process(
        self, namespace: str, name: str, container: str | None = None
    ) -> asyncio.subprocess.Process | None:
        """The current process of a pod's container (default: its first container)."""
        run = self._running.get((namespace, name))
        if run is None or not run.containers:
            return None
        if container is None:
            return run.containers[0].proc
        return next((c.proc for c in run.containers if c.name == container), None)

    async def log_tail(self, namespace: str, name: str, container: str) -> str | None:
        """The end of a running pod's container's log (init containers too), as the kubelet
        serves `kubectl logs --tail`; None if no such container runs here."""
        run = self._running.get((namespace, name))
        found = [c for c in (run.init + run.containers if run else []) if c.name == container]
        return await asyncio.to_thread(_tail, found[0].logfile) if found else None

    # ---- pod events ---------------------------------------------------------------------

    def _on_pod(self, event: str, pod: Obj) -> None:
        key = _key(pod)
        run = self._running.get(key)
        waiting = self._pending.get(key)
        if event == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            if waiting is not None and _same(waiting.pod, pod):
                del self._pending[key]
            # Only that pod: a newer one of the same name may run under the key already.
            if run is not None and _same(run.pod, pod):
                self._background(self._stop(key, run))  # releases the finalizer when done
            elif event != "DELETED" and FINALIZER in (pod["metadata"].get("finalizers") or []):
                self._background(self._release(pod))  # nothing of it runs here
            return
        if run is None or not _same(run.pod, pod):
            if run is not None:  # same name, new pod: the old processes go first
                self._background(self._stop(key, run))
            # This event has its newest version; our own status write comes back as one.
            self._pending.pop(key, None)
            reported = waiting.reason if waiting is not None and _same(waiting.pod, pod) else None
            if len(self._running) >= self.max_pods:
                message = (
                    f"this machine runs at most {self.max_pods} pods (maxPods); the pod "
                    "starts when another one stops"
                )
                self._wait(key, pod, message, reported)
                return
            try:
                self._run(key, pod)
            except NoRoom as exc:
                self._wait(key, pod, str(exc), reported)

    def _run(self, key: tuple[str, str], pod: Obj) -> None:
        """Start the pod; NoRoom (nothing started, nothing held) when it has no address or
        port now."""
        ports = _container_ports(pod)
        if self.pod_addresses == ONE:
            moved = self._take_ports(ports)
            run = _Running(pod=pod, ip=ONE_ADDRESS, ports=moved, published=False)
        else:
            run = _Running(pod=pod, ip=self._take_ip(ports))
        self._running[key] = run
        self._start_containers(key, run)
        self._background(self._hold(pod, run))

    def _wait(self, key: tuple[str, str], pod: Obj, reason: str, reported: str | None) -> None:
        """The pod waits Pending, Unschedulable with `reason` (written once per reason: the
        write comes back as an event). Waiting for an address or port, a retry is due."""
        self._pending[key] = _Waiting(pod, reason)
        if reason != reported:
            self._background(self._report_unschedulable(pod, reason))
        if len(self._running) < self.max_pods:  # not maxPods: an address or port is missing
            self._retry_later()

    def _retry_later(self) -> None:
        if self._retry is None:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self.no_room_retry, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._start_pending()

    def _start_pending(self) -> None:
        """Start the pods that waited longest, as long as there is room."""
        while self._pending and len(self._running) < self.max_pods:
            key = next(iter(self._pending))
            waiting = self._pending.pop(key)
            try:
                self._run(key, waiting.pod)
            except NoRoom as exc:  # first in line stays first; the others wait behind it
                self._pending = {key: waiting, **self._pending}
                self._wait(key, waiting.pod, str(exc), waiting.reason)
                return

    async def _report_unschedulable(self, pod: Obj, message: str) -> None:
        """Pending with PodScheduled False, as the scheduler leaves a pod no node has room for."""
        m = pod["metadata"]
        log.warning("pod %s/%s waits: %s", m.get("namespace", "default"), m["name"], message)
        current = await self.store.get(POD, m.get("namespace", "default"), m["name"])
        if current is None or not _same(current, pod):
            return
        current = copy.deepcopy(current)
        current["metadata"].pop("resourceVersion", None)  # the kubelet's write wins
        current["status"] = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": UNSCHEDULABLE,
                    "message": message,
                }
            ],
        }
        try:
            await self.store.update_status(current)
        except NotFound:
            pass

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _hold(self, pod: Obj, run: _Running) -> None:
        """Put the runtime's finalizer on a pod it runs, so a delete waits for its processes,
        and (one-address mode) the annotation saying where its ports are."""
        annotations = {HOST_PORTS_ANNOTATION: str(run.ports)} if run.ports.moved else {}
        await self._set_finalizer(pod, held=True, annotations=annotations)
        if not run.published:
            run.published = True
            await self._write_status(_key(pod), run)

    async def _release(self, pod: Obj) -> None:
        """Take the finalizer off: a terminating pod then leaves the store."""
        await self._set_finalizer(pod, held=False)

    async def _set_finalizer(
        self, pod: Obj, *, held: bool, annotations: dict[str, str] | None = None
    ) -> None:
        m = pod["metadata"]
        current = await self.store.get(POD, m.get("namespace", "default"), m["name"])
        if current is None or not _same(current, pod):
            return
        finalizers = [f for f in current["metadata"].get("finalizers") or [] if f != FINALIZER]
        if held:
            if current["metadata"].get("deletionTimestamp"):
                return  # deleted before it was held: the stop is under way already
            finalizers.append(FINALIZER)
        had = current["metadata"].get("annotations") or {}
        annotations = annotations or {}
        same_finalizers = finalizers == (current["metadata"].get("finalizers") or [])
        if same_finalizers and annotations.items() <= had.items():
            return
        current["metadata"]["finalizers"] = finalizers
        if annotations:
            current["metadata"]["annotations"] = {**had, **annotations}
        current["metadata"].pop("resourceVersion", None)  # the kubelet's write wins
        try:
            await self.store.update(current)
        except NotFound:
            pass

    def _take_ip(self, ports: list[int]) -> str:
        """A loopback address where every container's ports are free and no other runtime
        on this machine has claimed (address_locks.py): another stack (or a leftover
        process) may hold some, and a pod that cannot bind its port must not pass its
        readiness probe against someone else's server. Addresses are taken in turn and the
        turn wraps, so one another runtime let go of is found again."""
        for ip in list(self._free_ips):
            if _ports_free(ip, ports):
                self._free_ips.remove(ip)
                return ip
        ours = {run.ip for run in self._running.values()} | set(self._free_ips)
        span = LAST_POD_IP - self._first_ip + 1
        for _ in range(span):
            n = self._next_ip
            self._next_ip = self._first_ip + (n + 1 - self._first_ip) % span
            ip = f"127.0.0.{n}"
            if ip in ours or not self._addresses.claim(ip):
                continue
            problem = missing_loopback(ip)
            if problem is not None:  # macOS without aliases: every further one is missing too
                self._addresses.release(ip)
                raise NoRoom(problem)
            if _ports_free(ip, ports):
                return ip
            self._addresses.release(ip)
        raise NoRoom(
            f"no loopback address between 127.0.0.{self._first_ip} and 127.0.0.{LAST_POD_IP} "
            f"has the pod's ports {ports} free (other runtimes or processes hold the rest); "
            f"the pod tries again every {self.no_room_retry:g} s and when a pod stops"
        )

    def _take_ports(self, ports: list[int]) -> HostPorts:
        """One-address mode: a port of 127.0.0.1 for each of the pod's container ports, free
        and claimed against the machine's other runtimes (as addresses are, address_locks.py),
        taken in turn from FIRST_HOST_PORT so a stopped pod's ports are reused last."""
        moved: list[tuple[int, int]] = []
        span = LAST_HOST_PORT - FIRST_HOST_PORT + 1
        for port in dict.fromkeys(ports):  # a port two containers name is one port
            for _ in range(span):
                host = self._next_port
                self._next_port = FIRST_HOST_PORT + (host + 1 - FIRST_HOST_PORT) % span
                claim = f"{ONE_ADDRESS}:{host}"
                if not self._addresses.claim(claim):
                    continue
                if _ports_free(ONE_ADDRESS, [host]):
                    moved.append((port, host))
                    break
                self._addresses.release(claim)
            else:
                self._release_ports(HostPorts(tuple(moved)))
                raise NoRoom(
                    f"no free port left on {ONE_ADDRESS} between {FIRST_HOST_PORT} and "
                    f"{LAST_HOST_PORT} for another local pod; the pod tries again every "
                    f"{self.no_room_retry:g} s and when a pod stops"
                )
        return HostPorts(tuple(sorted(moved)))

    def _release_ports(self, ports: HostPorts) -> None:
        for _, host in ports.moved:
            self._addresses.release(f"{ONE_ADDRESS}:{host}")

    # ---- one pod ------------------------------------------------------------------------

    def _start_containers(self, key: tuple[str, str], run: _Running) -> None:
        spec = run.pod.get("spec", {})
        run.init = [
            self._container(key, run, c, f"init{i}")
            for i, c in enumerate(spec.get("initContainers") or [])
        ]
        specs = spec.get("containers") or [{}]
        run.containers = [self._container(key, run, c, f"c{i}") for i, c in enumerate(specs)]
        if run.init:
            run.initialized = False
            run.starting = asyncio.create_task(
                self._initialize(key, run), name=f"pod {key[1]} init"
            )
        else:
            self._supervise_containers(key, run)

    def _container(
        self, key: tuple[str, str], run: _Running, spec: dict, default: str
    ) -> _Container:
        name = spec.get("name") or default
        return _Container(
            name=name,
            spec=spec,
            env=moved_env({**self.env, **self._env(run.pod, spec, run.ip)}, run.ports),
            logfile=self.state_dir / "pods" / f"{key[0]}_{key[1]}_{name}.log",
        )

    def _supervise_containers(self, key: tuple[str, str], run: _Running) -> None:
        run.holds = hold_all(arg for c in run.containers for arg in c.spec.get("args") or [])
        for c in run.containers:
            c.task = asyncio.create_task(
                self._supervise(key, run, c), name=f"pod {key[1]} container {c.name}"
            )

    async def _initialize(self, key: tuple[str, str], run: _Running) -> None:
        """The init containers one after another, each until it exits 0 (restarted after a
        failure unless restartPolicy is Never, which fails the pod), then the containers: a
        kubelet's order, so an engine starts only once its weights are there."""
        for c in run.init:
            c.task = asyncio.current_task()
            await self._supervise(key, run, c, init=True)
            if run.stopping or c.exit_code != 0:
                return  # stopped, or failed for good (restartPolicy Never): the pod Failed
        run.initialized = True
        await self._write_status(key, run)
        self._supervise_containers(key, run)

    async def _supervise(
        self, key: tuple[str, str], run: _Running, c: _Container, init: bool = False
    ) -> None:
        """One container: start, probe, and restart per the pod's restartPolicy; an init
        container until it exits 0 (Always restarts it only on failure, as OnFailure)."""
        policy = run.pod.get("spec", {}).get("restartPolicy", "Always")
        if init and policy == "Always":
            policy = "OnFailure"
        backoff = min(1.0, self.max_backoff)
        while not c.cmd and not run.stopping:
            if await self._resolve(key, run, c):
                break
            await asyncio.sleep(self.max_backoff)  # installed meanwhile? look again
        while not run.stopping:
            started = time.monotonic()
            code = await self._run_once(key, run, c)
            c.running, c.ready, c.exit_code = False, False, code
            if c.proc is not None and c.proc.returncode is not None:
                await stop_container(c.proc, 0)  # its children die with it, as in a pod
            if run.stopping:
                return
            log.warning("pod %s/%s container %s exited with %s", *key, c.name, code)
            c.message = _termination_message(c) if code else None
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                c.done = True
                await self._write_status(key, run)
                return
            c.restarts += 1
            await self._write_status(key, run)
            if time.monotonic() - started >= BACKOFF_RESET_SECONDS:
                backoff = min(1.0, self.max_backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _resolve(self, key: tuple[str, str], run: _Running, c: _Container) -> bool:
        """The container's command line, if it can run here; else report what is missing
        (logged and written once per reason) and say no."""
        try:
            c.cmd = moved_args(await self._command(c.spec, c.env), run.ports)
        except NotInstalled as exc:
            if c.missing != str(exc):
                c.missing = str(exc)
                log.error("pod %s/%s container %s not started: %s", *key, c.name, exc)
                await self._write_status(key, run)
            return False
        c.missing = None
        return True

    async def _run_once(self, key: tuple[str, str], run: _Running, c: _Container) -> int:
        """Start the container's process and wait for it to exit; a command that cannot
        start counts as an exit with 127, as a shell reports it."""
        try:
            with open(c.logfile, "ab") as out:  # noqa: ASYNC230 - an append-open, instant
                c.proc = await asyncio.create_subprocess_exec(
                    *c.cmd,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **c.env},
                    start_new_session=True,
                    # A pod outlives no controllers: SIGKILLed, they would leave it running.
                    preexec_fn=die_with_parent(),
                )
        except OSError as exc:
            log.error("pod %s/%s container %s cannot start: %s", *key, c.name, exc)
            return 127
        c.running, c.started_at = True, now_rfc3339()
        log.info("pod %s/%s container %s started on %s: %s", *key, c.name, run.ip, " ".join(c.cmd))
        await self._write_status(key, run)
        probe = asyncio.create_task(self._probe(key, run, c))
        try:
            return await c.proc.wait()
        finally:
            probe.cancel()

    async def _probe(self, key: tuple[str, str], run: _Running, c: _Container) -> None:
        """Ready when the readiness probe's httpGet answers 200 (no probe: when started)."""
        http = (c.spec.get("readinessProbe") or {}).get("httpGet")
        while True:
            ok = True
            if http:
                port = run.ports.of(_port(http.get("port"), c.spec))
                url = f"http://{run.ip}:{port}{http.get('path', '/')}"
                try:
                    assert self._session is not None
                    async with self._session.get(url) as resp:
                        ok = resp.status == 200
                except (TimeoutError, aiohttp.ClientError, OSError):
                    ok = False
            if ok != c.ready:
                c.ready = ok
                await self._write_status(key, run)
            await asyncio.sleep(self.probe_interval)

    async def _write_status(self, key: tuple[str, str], run: _Running) -> None:
        # One write at a time per pod, each from the state at its turn: the last one wins
        # and is the newest.
        async with run.status_lock:
            pod = await self.store.get(POD, *key)
            if pod is None or pod["metadata"].get("uid") != run.pod["metadata"].get("uid"):
                return
            pod = copy.deepcopy(pod)
            pod["metadata"].pop("resourceVersion", None)  # the kubelet's write wins
            pod["status"] = _pod_status(run)
            try:
                await self.store.update_status(pod)
            except NotFound:
                pass

    async def _stop(self, key: tuple[str, str], run: _Running | None = None) -> None:
        """Stop the pod's supervisors (so nothing restarts), report it not ready, then stop
        every container at once (SIGTERM, the pod's grace period, SIGKILL to its group) and
        release the pod. `run`: that incarnation only (a new pod of the same name may
        already have taken the key)."""
        if run is None:
            run = self._running.get(key)
        if run is None or run.stopping:
            return
        run.stopping = True  # it stays under its key while it drains: its pod is not released
        every = [*run.init, *run.containers]
        tasks = list({c.task for c in every if c.task is not None} | {run.starting} - {None})
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in run.containers:
            c.ready = False
        await self._write_status(key, run)  # terminating: out of every pool before SIGTERM
        grace = _grace_seconds(run.pod)
        await asyncio.gather(*(self._stop_container(c, grace) for c in every if c.proc is not None))
        release(run.holds)
        run.holds.clear()
        if run.ports.moved:
            self._release_ports(run.ports)
        else:
            self._free_ips.append(run.ip)
        if self._running.get(key) is run:
            del self._running[key]
        self._start_pending()
        await self._release(run.pod)

    @staticmethod
    async def _stop_container(c: _Container, grace: float) -> None:
        """A preStop sleep first (the endpoints drop the pod meanwhile), within the grace
        period, as the kubelet runs it; then SIGTERM with what is left of the grace."""
        assert c.proc is not None
        pause = min(_pre_stop_sleep(c.spec), grace)
        if pause > 0 and c.proc.returncode is None:
            await asyncio.sleep(pause)
        await stop_container(c.proc, grace - pause)

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
    async def _command(container: dict, env: dict[str, str]) -> list[str]:
        """The container's command line here, or NotInstalled."""
        command = list(container.get("command") or [])
        args = [*command, *(container.get("args") or [])]
        if not command:
            image = str(container.get("image") or "")
            if image_repository(image) not in SIMULATOR_IMAGES:
                raise NotInstalled(
                    f"the container has no command and standalone mode cannot run image "
                    f"{image or '(none)'}'s entrypoint; set the Model's engine.command, or "
                    "engine.type: Simulator for the simulator"
                )
            # the simulator, on the pod's own address
            args = [sys.executable, "-m", "infergw.simulator", *args, "--host", env["POD_IP"]]
        elif command[0] == "infergate":  # this installation's CLI, wherever it is
            args = [sys.executable, "-m", "infergw.cli", *args[1:]]
        else:
            await _check_installed(command, env.get("PATH", os.environ.get("PATH", "")))
        return [_expand(str(a), env) for a in args]


async def _check_installed(command: list[str], path: str) -> None:
    """NotInstalled unless the command's program is on `path` and, for `python -m MODULE`,
    that Python finds the module."""
    program = shutil.which(command[0], path=path)
    module = command[2] if len(command) > 2 and command[1] == "-m" else None
    if program is None:
        what = module.split(".")[0] if module and _is_python(command[0]) else command[0]
        raise NotInstalled(_not_installed(what, f"{command[0]} is not on PATH={path}"))
    if module is None or not _is_python(command[0]):
        return
    top = module.split(".")[0]
    finder = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"
    proc = await asyncio.create_subprocess_exec(
        program,
        "-c",
        finder,
        top,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        code = await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        code = 1
    if code != 0:
        raise NotInstalled(_not_installed(top, f"{program} cannot import {top}"))


def _is_python(program: str) -> bool:
    return Path(program).name.startswith("python")


def _not_installed(what: str, detail: str) -> str:
    hint = INSTALL_HINTS.get(what, what)
    return (
        f"{what} is not installed in this environment ({detail}); install {hint}, "
        "or set the Model's engine.type: Simulator"
    )


def _pod_status(run: _Running) -> dict:
    """What the kubelet reports: Pending while the init containers run, Failed if one failed
    for good; Running while any container runs or will restart; Succeeded when all exited 0
    for good, Failed when all exited and one failed."""
    containers = run.containers
    missing = [c for c in [*run.init, *containers] if c.missing]
    if any(c.done and c.exit_code != 0 for c in run.init):
        phase = "Failed"  # restartPolicy Never
    elif not run.initialized:
        phase = "Pending"
    elif containers and all(c.done for c in containers):
        phase = "Succeeded" if all(c.exit_code == 0 for c in containers) else "Failed"
    elif missing:
        phase = "Pending"  # a container that cannot run here never started
    else:
        phase = "Running"
    ready = (
        run.initialized and run.published and bool(containers) and all(c.ready for c in containers)
    )
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    if missing:
        condition["reason"] = ENGINE_NOT_INSTALLED
        condition["message"] = "; ".join(f"container {c.name}: {c.missing}" for c in missing)
    status = {
        "phase": phase,
        "podIP": run.ip,
        "podIPs": [{"ip": run.ip}],
        "conditions": [condition],
        "containerStatuses": [_container_status(c) for c in containers],
    }
    if run.init:
        initialized = {"type": "Initialized", "status": "True" if run.initialized else "False"}
        status["conditions"].insert(0, initialized)
        status["initContainerStatuses"] = [_container_status(c) for c in run.init]
    return status


def _container_status(c: _Container) -> dict:
    if c.running:
        state: dict = {"running": {"startedAt": c.started_at}}
    elif c.missing:
        state = {"waiting": {"reason": ENGINE_NOT_INSTALLED, "message": c.missing}}
    elif c.done:
        state = {"terminated": _terminated(c)}
    elif c.exit_code is not None:
        state = {"waiting": {"reason": "CrashLoopBackOff"}}
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    out = {"name": c.name, "ready": c.ready, "restartCount": c.restarts, "state": state}
    if c.exit_code is not None and "terminated" not in state:
        out["lastState"] = {"terminated": _terminated(c)}
    return out


def _terminated(c: _Container) -> dict:
    out: dict = {"exitCode": c.exit_code, "reason": "Completed" if c.exit_code == 0 else "Error"}
    if c.message:
        out["message"] = c.message
    return out


def _tail(logfile: Path, size: int = LOG_TAIL_BYTES) -> str | None:
    try:
        with open(logfile, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _termination_message(c: _Container) -> str | None:
    """terminationMessagePolicy FallbackToLogsOnError, as the kubelet reads it: the log's
    last 80 lines, at most 2048 bytes (no container here can write /dev/termination-log)."""
    if c.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError":
        return None
    tail = _tail(c.logfile, TERMINATION_MESSAGE_BYTES)
    if tail is None:
        return None
    return "\n".join(tail.splitlines()[-TERMINATION_MESSAGE_LINES:]) or None


def _key(pod: Obj) -> tuple[str, str]:
    return pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]


def _same(a: Obj, b: Obj) -> bool:
    """The same pod, not only the same name."""
    return a["metadata"].get("uid") == b["metadata"].get("uid")


def _pre_stop_sleep(container: dict) -> float:
    """lifecycle.preStop.sleep.seconds (a preStop exec or httpGet hook is not run here)."""
    sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
    seconds = sleep.get("seconds")
    return float(seconds) if isinstance(seconds, int) and seconds > 0 else 0.0


def _grace_seconds(pod: Obj) -> float:
    grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    return float(grace) if isinstance(grace, int) and grace >= 0 else DEFAULT_GRACE_SECONDS


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
