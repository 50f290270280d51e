"""Shared test helpers: free ports, real subprocesses that stop by themselves, readiness waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from infergw.api.lifetime import spawn
from infergw.api.logs import FORMAT_ENV
from infergw.stack.ports import PORT_SLICE_ENV, free_port
from infergw.stack.readiness import wait_http

# Fixtures shared by several test modules live in helper modules, registered here once.
pytest_plugins = ["tests.picker_fixtures"]

# The processes tests start log text wherever the suite runs: in a CI pod the kubelet's
# KUBERNETES_SERVICE_HOST would make them log JSON (api/logs.py). Tests of the format say theirs.
os.environ.setdefault(FORMAT_ENV, "text")

# Under pytest-xdist (make test) each worker hands out ports from a slice of its own: two
# workers' stacks would otherwise draw the same free port and one of them fail to bind it.
if "PYTEST_XDIST_WORKER" in os.environ:
    _worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
    os.environ[PORT_SLICE_ENV] = f"{_worker}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `vllm` need a real vLLM and minutes: they run only when the marker
    expression names them (`make test-vllm` passes `-m vllm`), never in `make test`.
    The files with `slow` tests go first (see _slow_files_first)."""
    if "vllm" not in (config.option.markexpr or ""):
        real = [item for item in items if item.get_closest_marker("vllm") is not None]
        if real:
            config.hook.pytest_deselected(items=real)
            items[:] = [item for item in items if item.get_closest_marker("vllm") is None]
    _slow_files_first(items)


def _slow_files_first(items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first, then the rest in collection order; a file's
    tests stay together. `make test` hands whole files to its workers in this order
    (--no-loadscope-reorder): xdist's own order, most tests first, left the slow files of
    one to four tests (the wheel's minute, the benchmarks' half minutes) for last, one
    worker running them while the other idled. Now the short files fill the tail."""
    slow: dict[str, int] = {}
    for item in items:
        slow.setdefault(item.nodeid.split("::")[0], 0)
        if item.get_closest_marker("slow") is not None:
            slow[item.nodeid.split("::")[0]] += 1
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])


@contextmanager
def running(
    cmd: list[str],
    *,
    ready_url: str | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    output: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` for the length of a with-block; always stopped (TERM, then KILL) afterwards.
    Its stdout and stderr go to `output` when given (appended), else to the test's."""
    if output is not None:
        log = open(output, "ab")  # closed below, after the process
        err = subprocess.STDOUT
    else:
        log = open(os.devnull, "wb") if os.environ.get("INFERGATE_QUIET_PROCS") else None
        err = None
    proc = spawn(
        cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=err, start_new_session=True
    )
    try:
        if ready_url:
            wait_http(ready_url, timeout, proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log:
            log.close()


def simulator_cmd(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "infergw.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


@contextmanager
def simulators(count: int, *flags: str) -> Iterator[list[int]]:
    """`count` simulator processes, each on a free port and ready, for the length of a
    with-block: their ports. Those started are stopped even if a later one fails to start."""
    with ExitStack() as started:
        ports = [free_port() for _ in range(count)]
        for port in ports:
            ready = f"http://127.0.0.1:{port}/health"
            started.enter_context(running(simulator_cmd(port, *flags), ready_url=ready))
        yield ports


@pytest.fixture
def sim_factory():
    """Start simulator subprocesses: sim_factory(*flags) -> base URL."""
    stack = []

    def start(*flags: str, timeout: float = 30.0) -> str:
        port = free_port()
        cm = running(
            simulator_cmd(port, *flags),
            ready_url=f"http://127.0.0.1:{port}/health",
            timeout=timeout,
        )
        cm.__enter__()
        stack.append(cm)
        return f"http://127.0.0.1:{port}"

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def wall(monkeypatch):
    """The wall clock status conditions are stamped with, moved only by tick()."""
    from infergw.controllers import conditions
    from tests.controller_helpers import Wall

    clock = Wall()
    monkeypatch.setattr(conditions, "now_rfc3339", clock)
    return clock
