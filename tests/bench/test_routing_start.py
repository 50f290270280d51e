"""bench/routing: a point whose router cannot start is started again on fresh ports, with a
fresh fleet each time and nothing of the failed start left running; a router that is not
installed is not retried."""

from __future__ import annotations

import errno

from infergw.bench.common import process_gone
from infergw.bench.routing.routers import RouterUnavailable
from infergw.bench.routing.run import START_ATTEMPTS, Point, Settings, run_point
from infergw.bench.routing.workloads import NoReuse
from infergw.stack.local import LocalStack


class _RefusingRouter:
    """A router whose port another process holds: start always fails as a bind would."""

    name = "refusing"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.fleets: list[tuple[list[int], list[int]]] = []  # (pod ports, pod pids) per start

    def start(self, stack: LocalStack) -> str:
        pids = [stack.procs[f"pod-{port}"].pid for port in stack.pod_ports]
        self.fleets.append((list(stack.pod_ports), pids))
        raise self.error

    def stop(self) -> None:
        pass


def _settings() -> Settings:
    return Settings(pods=1, sim_args=[], warmup_s=0.1, duration_s=0.1, seed=1)


def test_a_router_that_fails_to_start_is_retried_on_fresh_ports_then_reported():
    router = _RefusingRouter(OSError(errno.EADDRINUSE, "Address already in use"))
    row = run_point(Point(router, NoReuse(), 1.0), _settings())
    assert len(router.fleets) == START_ATTEMPTS
    ports = [p for fleet_ports, _ in router.fleets for p in fleet_ports]
    assert len(set(ports)) == len(ports)  # each start on ports of its own
    assert all(process_gone(pid) for _, pids in router.fleets for pid in pids)
    assert row["unavailable"].startswith(f"failed to start {START_ATTEMPTS} times")
    assert len(row["start_failures"]) == START_ATTEMPTS
    assert "Address already in use" in row["start_failures"][0]


def test_a_router_that_is_not_installed_is_not_retried():
    router = _RefusingRouter(RouterUnavailable("vllm-router is not installed"))
    row = run_point(Point(router, NoReuse(), 1.0), _settings())
    assert len(router.fleets) == 1
    assert row["unavailable"] == "vllm-router is not installed"
    assert "start_failures" not in row
