"""`infergate bench soak`: steady load through the local stack while its parts fail.

Closed-loop clients send chat completions (every third one streamed) through a real Envoy,
the picker (FailOpen, the quickstart's scheduling with the precise prefix scorer fed by KV
events) and simulator pods, to a ModelRoute whose token rate limit lives in a real
redis-server. Meanwhile, spread over --duration: a pod is killed (SIGKILL; the stack's
supervisor restarts it), another pod's KV publisher restarts (the pod is stopped and started
again), the pool file is garbled and then fixed, Redis stops and starts, and the picker is
killed once (SIGKILL). Every request's outcome is recorded and attributed to the fault it ran
into (bench/soak_report.py); the picker's peak RSS is sampled. Writes
bench/results/soak-<date>[-quick].json and docs/benchmarks/soak[-quick].png, prints a table,
and exits 1 if any error is one no fault explains (a 500 or a lost answer outside a killed
component's in-flight requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import machine, process_gone, save_results
from infergw.bench.soak_report import OK, FaultWindow, Outcome, markdown, plot, summarize
from infergw.stack.envoy_config import PICKER_CLUSTER
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports
from infergw.stack.redis_server import RedisServer, which_redis_server

# The model clients ask for: the pods serve it, so with the picker down (FailOpen) Envoy's
# round robin still reaches a pod that can answer; a ModelRoute of that name gives it a
# Redis-backed rate limit while the picker is up.
SERVED = "infergate-sim"
ROUTE = SERVED
QUICK_DURATION = 25.0
ERROR_LOG = 500
# Shared openings, so the prefix scorer has something to route by.
OPENINGS = [
    "You are a careful assistant. Summarize the following report in two sentences:",
    "Translate into French, keeping the names as they are:",
    "List three risks of the plan below and one mitigation each:",
]


def route_objects(redis_address: str) -> list[dict]:
    """A ModelServer for the pods and a ModelRoute with a Redis-backed limit far above what
    the load spends: the limiter is asked on every request, and never refuses."""
    net = "networking.infergate.io/v1alpha1"
    return [
        {
            "apiVersion": net,
            "kind": "ModelServer",
            "metadata": {"name": "sim", "namespace": "default"},
            "spec": {
                "model": SERVED,
                "inferenceEngine": "vLLM",
                "workloadSelector": {"matchLabels": {"app": "quickstart-sim"}},
            },
        },
        {
            "apiVersion": net,
            "kind": "ModelRoute",
            "metadata": {"name": ROUTE, "namespace": "default"},
            "spec": {
                "modelName": ROUTE,
                "rules": [{"name": "default", "targetModels": [{"modelServerName": "sim"}]}],
                "rateLimit": {
                    "unit": "minute",
                    "inputTokensPerUnit": 100_000_000,
                    "global": {"redis": {"address": redis_address}},
                },
            },
        },
    ]


def soak_stack(workdir: Path, pods: int, redis_address: str) -> LocalStack:
    cfg = StackConfig(
        workdir=workdir,
        pods=pods,
        ports=free_stack_ports(pods),
        pod_ports=[free_port() for _ in range(pods)],
        failure_mode="FailOpen",
        sim_args=["--sim-time-scale", "0.1"],
    )
    stack = LocalStack(cfg)
    with stack.pool_path.open("a") as f:  # the picker reads it when it starts
        f.write("---\n" + yaml.safe_dump_all(route_objects(redis_address)))
    return stack


# ---- load ----------------------------------------------------------------------------


def request_body(client: int, n: int, max_tokens: int) -> dict:
    opening = OPENINGS[(client + n) % len(OPENINGS)]
    return {
        "model": ROUTE,
        "messages": [{"role": "user", "content": f"{opening} request {client}-{n}"}],
        "max_tokens": max_tokens,
        "stream": n % 3 == 2,
    }


def complete(raw: bytes, stream: bool) -> bool:
    """The whole answer arrived: a stream's [DONE], or a completion with its choices."""
    if stream:
        return raw.rstrip().endswith(b"data: [DONE]")
    try:
        return bool(json.loads(raw)["choices"])
    except (ValueError, KeyError, TypeError):
        return False


async def one_request(session: aiohttp.ClientSession, url: str, body: dict, t0: float) -> Outcome:
    start = time.monotonic() - t0
    try:
        async with session.post(url, json=body) as resp:
            raw = await resp.read()
            if resp.status != 200:
                kind = str(resp.status)
            else:
                kind = OK if complete(raw, body["stream"]) else "lost answer"
    except aiohttp.ClientPayloadError:  # the answer began, then was cut
        kind = "lost answer"
    except aiohttp.ClientConnectionError:
        kind = "connection error"
    except TimeoutError:
        kind = "timeout"
    return Outcome(start, time.monotonic() - t0, kind)


async def load(
    url: str, concurrency: int, max_tokens: int, t0: float, stop_at: float
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                outcomes.append(await one_request(session, url, request_body(i, n, max_tokens), t0))
                n += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return outcomes


# ---- faults --------------------------------------------------------------------------


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


async def until_answers(url: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_answers, url):
            return True
        await asyncio.sleep(0.1)
    return False


def _envoy_connections(admin_port: int, host: str) -> int | None:
    """Envoy's open connections to `host` in the picker's cluster (None: unreadable)."""
    prefix = f"{PICKER_CLUSTER}::{host}::cx_active::"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=1) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(prefix):
                    return int(line.removeprefix(prefix))
    except (OSError, ValueError):
        return None
    return 0  # no such host any more


async def until_envoy_dropped(admin_port: int, host: str, deadline: float) -> None:
    """Until Envoy has closed its connections to a killed picker: before that it may still
    hand it a new request (which then fails), so such requests are in flight with the kill."""
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_envoy_connections, admin_port, host) == 0:
            return
        await asyncio.sleep(0.005)


class Faults:
    """Each fault strikes, waits for its recovery, and records its window."""

    def __init__(
        self, stack: LocalStack, redis: RedisServer, t0: float, hold: float, deadline: float
    ):
        self.stack, self.redis, self.t0 = stack, redis, t0
        self.hold = hold  # how long the pool file stays garbled and Redis stopped
        self.deadline = deadline  # recovery waits give up here (monotonic)
        self.windows: list[FaultWindow] = []

    def _strike(self, name: str, kills: bool) -> FaultWindow:
        window = FaultWindow(name, kills, time.monotonic() - self.t0)
        self.windows.append(window)
        return window

    async def _kill(self, pid: int, window: FaultWindow) -> None:
        """SIGKILL `pid` and note when it is gone (exited, a zombie or reaped)."""
        os.kill(pid, signal.SIGKILL)
        for _ in range(5000):  # gone within milliseconds; past ~5 s, note the time anyway
            if process_gone(pid):
                break
            await asyncio.sleep(0.001)
        window.gone = time.monotonic() - self.t0

    def _recovered(self, window: FaultWindow, ok: bool = True) -> None:
        if ok:
            window.end = time.monotonic() - self.t0

    async def kill_pod(self) -> None:
        port = self.stack.pod_ports[0]
        proc = self.stack.procs[f"pod-{port}"]
        window = self._strike("pod killed", kills=True)
        await self._kill(proc.pid, window)  # the supervisor starts it again
        ok = await until_answers(f"http://127.0.0.1:{port}/health", self.deadline)
        self._recovered(window, ok)

    async def restart_kv_publisher(self) -> None:
        address = self.stack.pod_addresses[-1]
        window = self._strike("KV publisher restarted", kills=True)
        await asyncio.to_thread(self.stack.restart_pod, address)  # SIGTERM, then start
        self._recovered(window)

    async def garble_pool_file(self) -> None:
        path = self.stack.pool_path
        good = path.read_text()
        window = self._strike("pool file garbled", kills=False)
        path.write_text(good[: len(good) // 2] + "\n: [garbled {{\n")
        await asyncio.sleep(self.hold)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(good)
        tmp.replace(path)
        self._recovered(window)

    async def stop_redis(self) -> None:
        window = self._strike("Redis stopped", kills=False)
        await asyncio.to_thread(self.redis.stop)
        await asyncio.sleep(self.hold)
        await asyncio.to_thread(self.redis.start)
        self._recovered(window)

    async def kill_picker(self) -> None:
        proc = self.stack.procs["picker"]
        window = self._strike("picker killed", kills=True)
        await self._kill(proc.pid, window)  # the supervisor starts it again
        ports = self.stack.cfg.ports
        host = f"127.0.0.1:{ports.picker}"
        await until_envoy_dropped(ports.envoy_admin, host, min(self.deadline, time.monotonic() + 5))
        window.gone = time.monotonic() - self.t0
        metrics = self.stack.cfg.ports.picker_metrics
        ok = await until_answers(f"http://127.0.0.1:{metrics}/healthz", self.deadline)
        self._recovered(window, ok)

    def plan(self) -> list[Callable[[], Awaitable[None]]]:
        return [
            self.kill_pod,
            self.restart_kv_publisher,
            self.garble_pool_file,
            self.stop_redis,
            self.kill_picker,
        ]


async def at(moment: float, action: Callable[[], Awaitable[None]]) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))
    await action()


# ---- the run -------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


async def watch(stack: LocalStack, stop: asyncio.Event, peaks: dict[int, float]) -> None:
    """Restart what died (the supervisor) and keep every picker's peak RSS."""
    while not stop.is_set():
        await asyncio.to_thread(stack.supervisor.tick)
        picker = stack.procs.get("picker")
        if picker is not None:
            peaks[picker.pid] = max(peaks.get(picker.pid, 0.0), peak_rss_mib(picker.pid))
        await asyncio.sleep(0.2)


async def soak(stack: LocalStack, redis: RedisServer, args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    hold = max(1.0, min(10.0, args.duration / 14))
    faults = Faults(stack, redis, t0, hold, deadline=stop_at + 60)
    plan = faults.plan()
    step = args.duration / (len(plan) + 2)  # the last fault leaves time to recover
    done = asyncio.Event()
    peaks: dict[int, float] = {}
    watcher = asyncio.create_task(watch(stack, done, peaks))
    strikes = [asyncio.create_task(at(t0 + step * (i + 1), fault)) for i, fault in enumerate(plan)]
    outcomes = await load(
        f"{stack.url}/v1/chat/completions", args.concurrency, args.max_tokens, t0, stop_at
    )
    await asyncio.gather(*strikes)
    done.set()
    await watcher
    run_end = max((o.end for o in outcomes), default=args.duration)
    seconds = range(int(run_end) + 1)
    errors = [o for o in outcomes if o.kind != OK]
    return {
        "result": summarize(outcomes, faults.windows, run_end),
        # when each error began and ended, and what it was (the first ERROR_LOG of them)
        "errors": [[round(o.start, 3), round(o.end, 3), o.kind] for o in errors[:ERROR_LOG]],
        "picker_peak_rss_mib": round(max(peaks.values(), default=0.0), 1),
        "picker_processes": len(peaks),
        "series": {
            "second": list(seconds),
            "answered": [
                sum(1 for o in outcomes if int(o.end) == s and o.kind == OK) for s in seconds
            ],
            "errors": [
                sum(1 for o in outcomes if int(o.end) == s and o.kind != OK) for s in seconds
            ],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench soak", description=__doc__, formatter_class=HelpFormatter
    )
    load = p.add_argument_group("Fleet and load")
    run = p.add_argument_group("Run")
    output = p.add_argument_group("Output")
    load.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    run.add_argument("--quick", action="store_true", help=f"{QUICK_DURATION:.0f} s, -quick files")
    load.add_argument("--pods", type=int, default=3, help="simulator pods")
    load.add_argument("--concurrency", type=int, default=6, help="clients sending at once")
    load.add_argument("--max-tokens", type=int, default=16, help="output tokens a request")
    output.add_argument("--output-dir", type=Path, default=None, help="default: bench/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = QUICK_DURATION
    if args.pods < 2:
        p.error("--pods must be at least 2 (one is killed, another restarted)")
    binary = which_redis_server()
    if binary is None:
        p.error("needs redis-server on PATH (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="infergate-bench-soak-") as tmp:
        redis = RedisServer(binary, free_port(), Path(tmp))
        redis.start()
        try:
            with soak_stack(Path(tmp) / "stack", args.pods, redis.address) as stack:
                run = asyncio.run(soak(stack, redis, args))
        finally:
            redis.stop()
    out = {
        "benchmark": "soak",
        "machine": machine(),
        "settings": {
            "duration_s": args.duration,
            "pods": args.pods,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
        },
        **run,
    }
    save_results(
        "soak", out, quick=args.quick, output_dir=args.output_dir, plot=plot, markdown=markdown
    )
    return 1 if out["result"]["violations"] else 0
