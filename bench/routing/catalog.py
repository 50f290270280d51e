"""The routing benchmark's workloads by name, each with the rates it runs at."""

from __future__ import annotations

import dataclasses

from infergw.bench.routing.agentic import Agentic
from infergw.bench.routing.arrivals import ARRIVALS, OnOff
from infergw.bench.routing.mixed import Mixed
from infergw.bench.routing.rag import Rag
from infergw.bench.routing.tenants import Tenants
from infergw.bench.routing.workloads import MultiTurn, NoReuse, SharedPrefix

QUICK_RATE = 8.0  # --quick: one short point per workload


def plan(quick: bool, pods: int) -> list[tuple[object, list[float]]]:
    """(workload, rates), in the order they run. Six shared-prefix groups a pod against room
    for three: evictions happen, which is where knowing what each pod holds beats
    remembering what was sent where."""

    def shared(**kw) -> SharedPrefix:
        return SharedPrefix(groups=pods * 6, users=5, **kw)

    full = [
        (shared(), [6.0, 12.0, 20.0]),
        (MultiTurn(), [8.0, 16.0]),
        (NoReuse(), [12.0]),
        (Tenants(), [12.0]),
        (Agentic(), [12.0]),
        (Rag(), [12.0]),
        # The shared-prefix groups, arriving in bursts at 3× the mean rate.
        (shared(arrivals=OnOff(), name="bursty"), [12.0]),
        (Mixed(shared(), NoReuse()), [12.0]),
    ]
    if quick:
        return [(wl, [10.0 if wl.name == "shared-prefix" else QUICK_RATE]) for wl, _ in full]
    return full


def with_arrivals(workload, arrivals: str):
    """The workload with another arrival process (ARRIVALS' name), named after it so its
    rows never mix with the Poisson ones."""
    if arrivals == "poisson":
        return workload
    process = ARRIVALS[arrivals]
    name = f"{workload.name}+{arrivals}"
    if isinstance(workload, Mixed):
        return dataclasses.replace(
            workload,
            reusable=dataclasses.replace(workload.reusable, arrivals=process),
            no_reuse=dataclasses.replace(workload.no_reuse, arrivals=process),
            name=name,
        )
    if getattr(workload, "arrivals", None) == process:
        return workload  # already bursty
    return dataclasses.replace(workload, arrivals=process, name=name)
