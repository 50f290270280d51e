"""The fleet's CPUs apart from the router's: the simulator pods on one set, the router under
test (Envoy and its pickers, or vllm-router) and the load generator on the other.

In production a router never shares the GPUs' hosts' CPU, so on one machine a router's own CPU
must not slow the pods it routes to: without a split, a router that costs 20 ms of CPU a
request made the pods decode slower than a cheaper one did, and that was charged to its
choices. Its own latency (request in, request at the pod) stays in the numbers: only the
coupling goes. Every router gets the same split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CpuSplit:
    pods: frozenset[int]
    router: frozenset[int]  # the router under test and the load generator

    def describe(self) -> dict:
        return {"pods": sorted(self.pods), "router_and_client": sorted(self.router)}


def auto_split(available: set[int]) -> CpuSplit | None:
    """A quarter of the CPUs (at least one) for the router and load generator, the rest for
    the pods, which model the fleet; None with fewer than two CPUs."""
    cpus = sorted(available)
    if len(cpus) < 2:
        return None
    router = max(1, len(cpus) // 4)
    return CpuSplit(frozenset(cpus[:-router]), frozenset(cpus[-router:]))


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a list in taskset's format: 0-2,5 is {0, 1, 2, 5}."""
    out: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (e.g. 0-2,5)")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def parse_split(text: str, available: set[int]) -> CpuSplit | None:
    """`auto`, `off`, or `PODS/ROUTER` as two CPU lists ("0/1", "0-5/6,7"): disjoint, both
    non-empty, every CPU one this process may run on."""
    if text == "off":
        return None
    if text == "auto":
        return auto_split(available)
    pods_text, sep, router_text = text.partition("/")
    if not sep:
        raise ValueError(f"--cpu-split takes auto, off or PODS/ROUTER CPU lists, not {text!r}")
    split = CpuSplit(parse_cpu_list(pods_text), parse_cpu_list(router_text))
    if split.pods & split.router:
        raise ValueError(f"CPUs {sorted(split.pods & split.router)} are in both sets")
    missing = (split.pods | split.router) - available
    if missing:
        raise ValueError(f"CPUs {sorted(missing)} are not available here ({sorted(available)})")
    return split


def process_tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc (children of every thread)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in _tasks(p):
            try:
                text = Path(f"/proc/{p}/task/{task}/children").read_text()
            except OSError:
                continue
            todo += [int(c) for c in text.split()]
    return out


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # gone
        return []


def pin(pids: list[int], cpus: frozenset[int]) -> int:
    """Every thread of these processes and their descendants on `cpus` (threads and children
    started later inherit it); the number of threads pinned."""
    pinned = 0
    for pid in pids:
        for proc in process_tree(pid):
            for task in _tasks(proc):
                try:
                    os.sched_setaffinity(task, cpus)
                    pinned += 1
                except (ProcessLookupError, PermissionError):  # exited meanwhile
                    pass
    return pinned
