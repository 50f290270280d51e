"""Benchmarks: each writes JSON under bench/results/ and, where a picture helps, a PNG under
docs/benchmarks/. Run one with `infergate bench NAME [flags]`."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "simulator": "bench.simulator",
    "epp_overhead": "bench.epp_overhead",
    "kvindex": "bench.kvindex",
    "routing": "bench.routing.cli",
    "fairness": "bench.fairness.cli",
    "pd": "bench.pd.cli",
    "soak": "bench.soak",
}


def run_bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: infergate bench {{{','.join(BENCHMARKS)}}} [flags]")
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
