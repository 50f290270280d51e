"""`infergate bench scrape_cost`: what scraping idle pods costs the pods and the picker.

Two fleets of N pods, each run three ways over the same window: the pods alone (their idle
CPU), with a picker scraping at the fast interval all the time (`--idle-metrics-interval`
equal to it: how every pod was scraped before), and with the picker's defaults (idle pods
rest, epp/scrape_pace.py). The simulator fleet renders /metrics with prometheus_client as vLLM
does: the engine-side cost. The recorded-page fleet serves the real vLLM CPU page (55 KB) from
a static string: the picker-side cost of a real page. Also the CPU of reading that page in
the picker: the wanted lines found by substring search (sample_lines) against the full split
of every line it replaced.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from infergw.bench.common import machine, process_cpu_seconds, write_json
from infergw.epp.engine_metrics import parse, sample_lines, vocabulary
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports

PAGE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-cpu-tiny"
FAST = "50ms"


def full_split_lines(text: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The lines the parser looked at before sample_lines: every line split off, its name
    taken up to "{" or the first space; grouped by wanted name as sample_lines groups them."""
    named = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if line and line[0] != "#":
            end = line.find("{")
            named.append((line[:end] if end >= 0 else line.partition(" ")[0], line))
    return tuple(line for name in wanted for n, line in named if n == name)


def _per_call_us(fn, seconds: float = 1.0) -> float:
    calls, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        fn()
        calls += 1
    return round(1e6 * (time.process_time() - t0) / calls, 1)


def page_cost() -> dict:
    text = (PAGE / "metrics.txt").read_text()
    wanted = vocabulary("vllm").wanted
    assert sample_lines(text, wanted) == full_split_lines(text, wanted)
    return {
        "page_bytes": len(text.encode()),
        "page_lines": text.count("\n"),
        "full_split_us": _per_call_us(lambda: full_split_lines(text, wanted)),
        "sample_lines_us": _per_call_us(lambda: sample_lines(text, wanted)),
        "parse_us": _per_call_us(lambda: parse(text, "vllm")),
    }


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
    before = {n: process_cpu_seconds(p) for n, p in pids.items()}
    time.sleep(seconds)
    return {
        n: round(100 * (process_cpu_seconds(p) - before[n]) / seconds, 2) for n, p in pids.items()
    }


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
    m, s, p = out["machine"], out["settings"], out["page"]
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
    lines += [
        "",
        f"Reading the real page ({p['page_bytes']} bytes, {p['page_lines']} lines) in the "
        f"picker: full split {p['full_split_us']} µs, sample_lines {p['sample_lines_us']} µs, "
        f"whole parse {p['parse_us']} µs.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="infergate bench scrape_cost", description=__doc__)
    ap.add_argument("--pods", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per setting")
    ap.add_argument(
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
        "page": page_cost(),
        "rows": rows,
    }
    print("wrote", write_json("scrape_cost", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
