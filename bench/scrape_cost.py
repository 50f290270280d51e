"""`infergate bench scrape_cost`: what scraping idle pods costs the pods and the picker.

Two fleets of N pods, each run three ways over the same window: the pods alone (their idle
CPU), with a picker scraping at the fast interval all the time (`--idle-metrics-interval`
equal to it: how every pod was scraped before), and with the picker's defaults (idle pods
rest, epp/scrape_pace.py). The simulator fleet renders /metrics with prometheus_client as vLLM
does: the engine-side cost. The recorded-page fleet serves the real vLLM CPU page (55 KB) from
a static string: the picker-side cost of a real page. (What reading that page costs the
picker alone is a `python -m timeit` of epp.engine_metrics.parse: see the README.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import cpu_over, machine, write_json
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports

FAST = "50ms"


def _stack(pods: int, recorded_page: bool) -> LocalStack:
    command = None
    if recorded_page:
        command = lambda port: [sys.executable, "-m", "infergw.bench.metrics_server", str(port)]  # noqa: E731
    return LocalStack(
        StackConfig(
            workdir=Path(tempfile.mkdtemp(prefix="bench-scrape-")),
            pods=pods,
            ports=free_stack_ports(pods, per_pod_kv=True),
            pod_ports=[free_port() for _ in range(pods)],
            sim_args=["--log-level", "warning"],
            picker_args=["--log-level", "warning"],
            pod_command=command,
        )
    )


def _cpu_share(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process's CPU over `seconds`, as a % of one core."""
    return {n: round(100 * v / seconds, 2) for n, v in cpu_over(pids, seconds).items()}


def _fresh(stack: LocalStack, pods: int) -> bool:
    eps = stack.picker_endpoints()
    return len(eps) == pods and not any(e["stale"] for e in eps.values())


def run_fleet(pods: int, recorded_page: bool, seconds: float) -> list[dict]:
    stack = _stack(pods, recorded_page)
    rows = []
    try:
        stack.start_pods()
        pod_pids = {n: p.pid for n, p in stack.procs.items() if n.startswith("pod-")}
        for label, args in (
            ("pods alone", None),
            (f"scraped every {FAST}", ["--idle-metrics-interval", FAST]),
            ("idle pods rest (default)", []),
        ):
            if args is not None:
                stack.cfg.picker_args = ["--log-level", "warning", *args]
                stack.start_picker()
                deadline = time.monotonic() + 30
                while not _fresh(stack, pods):
                    assert time.monotonic() < deadline, "the picker never saw every pod fresh"
                    time.sleep(0.2)
                time.sleep(2.0)  # past the first rounds (models, first pages)
            pids = dict(pod_pids)
            if args is not None:
                pids["picker"] = stack.procs["picker"].pid
            share = _cpu_share(pids, seconds)
            pod_values = [v for n, v in share.items() if n.startswith("pod-")]
            rows.append(
                {
                    "fleet": "recorded vLLM page" if recorded_page else "simulator",
                    "setting": label,
                    "pod_cpu_pct_mean": round(sum(pod_values) / len(pod_values), 2),
                    "picker_cpu_pct": share.get("picker"),
                }
            )
            if args is not None:
                stack.stop_picker()
    finally:
        stack.stop()
    return rows


def markdown(out: dict) -> str:
    m, s = out["machine"], out["settings"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), load average "
        f"{out['load_before']} before: {s['pods']} idle pods per fleet, {s['seconds']:.0f} s "
        "per setting, CPU as % of one core.",
        "",
        "| fleet | setting | CPU per pod | picker CPU |",
        "|---|---|---|---|",
    ]
    for r in out["rows"]:
        picker = "–" if r["picker_cpu_pct"] is None else f"{r['picker_cpu_pct']} %"
        lines.append(f"| {r['fleet']} | {r['setting']} | {r['pod_cpu_pct_mean']} % | {picker} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="infergate bench scrape_cost", description=__doc__, formatter_class=HelpFormatter
    )
    fleets = ap.add_argument_group("Fleets")
    fleets.add_argument("--pods", type=int, default=8, help="simulator pods")
    fleets.add_argument("--seconds", type=float, default=10.0, help="measured window per setting")
    fleets.add_argument(
        "--fleets", default="simulator,recorded", help="comma-separated: simulator, recorded"
    )
    args = ap.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[:3]
    fleets = args.fleets.split(",")
    rows = []
    for fleet in ("simulator", "recorded"):
        if fleet in fleets:
            rows += run_fleet(args.pods, fleet == "recorded", args.seconds)
    out = {
        "benchmark": "scrape_cost",
        "machine": machine(),
        "load_before": " ".join(load),
        "settings": {"pods": args.pods, "seconds": args.seconds, "fast_interval": FAST},
        "rows": rows,
    }
    print("wrote", write_json("scrape_cost", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
