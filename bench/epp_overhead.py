"""What the endpoint picker costs: beside the floor a minimal Python ext_proc stub sets, through
one Envoy (bench/epp_vs_stub.py); its own work per request without gRPC
(bench/epp_pipeline.py); the same load through Envoy → picker → pods and through Envoy → pods
directly (round robin), streaming and not; and what scraping costs it. `--baseline COMMIT`
runs that commit's picker beside this one in the first two parts (before/after in one run).

Pods are simulators with a fast latency model (--sim-time-scale 0.1) so the gateway's own
cost is visible. Each mode gets a fresh stack and C closed-loop clients for D seconds. The
picker's CPU time comes from /proc. Then, with no traffic, the picker scrapes N endpoints (a
real 600-line vLLM /metrics page each) at 50 ms, 100 ms and 1 s, and its CPU is read again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from infergw.api.cli_help import HelpFormatter
from infergw.bench import epp_pipeline, epp_vs_stub
from infergw.bench.common import machine, percentile, process_cpu_seconds, write_json
from infergw.bench.loadgen import run_load
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports
from infergw.stack.readiness import wait_http

MODEL = "infergate-sim"


def measure(
    with_picker: bool,
    stream: bool,
    pods: int,
    concurrency: int,
    duration: float,
    max_tokens: int,
    response_bodies: bool = True,
) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-epp-"))
    stack = LocalStack(
        StackConfig(
            workdir=workdir,
            pods=pods,
            ports=free_stack_ports(pods),
            pod_ports=[free_port() for _ in range(pods)],
            with_picker=with_picker,
            sim_args=["--sim-time-scale", "0.1", "--log-level", "warning"],
            picker_args=["--log-level", "warning"],
            response_bodies=response_bodies,
        )
    ).start()
    try:
        url = stack.url + "/v1/completions"

        def body(i: int, n: int) -> dict:
            return {
                "model": MODEL,
                "prompt": f"client {i} request {n}: " + "hello " * 50,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": stream,
            }

        picker = stack.procs.get("picker")
        cpu0 = process_cpu_seconds(picker.pid) if picker else 0.0
        t0 = time.monotonic()
        res = asyncio.run(run_load(url, body, concurrency, duration))
        wall = time.monotonic() - t0
        cpu = (process_cpu_seconds(picker.pid) - cpu0) if picker else 0.0
        total_requests = res.requests + res.errors
    finally:
        stack.stop()
    return {
        "with_picker": with_picker,
        "stream": stream,
        "response_bodies": response_bodies,
        "requests": res.requests,
        "errors": res.errors,
        "throughput_rps": round(res.requests / res.wall, 2),
        "p50_ms": round(1000 * percentile(res.latencies, 50), 2),
        "p99_ms": round(1000 * percentile(res.latencies, 99), 2),
        "ttft_p50_ms": round(1000 * percentile(res.ttfts, 50), 2),
        # CPU over the whole run (warm-up included) per request the run completed
        "picker_cpu_us_per_request": (
            round(1e6 * cpu / max(total_requests, 1) * (res.wall / wall), 1) if picker else None
        ),
    }


def scrape_cost(endpoints: int, interval_ms: int, seconds: float) -> dict:
    """Idle picker CPU while it scrapes `endpoints` (one pod × up to 8 target ports)."""
    if not 1 <= endpoints <= 8:
        raise ValueError("scrape_cost measures 1-8 endpoints (one pod, <= 8 target ports)")
    ports = [free_port() for _ in range(endpoints)]
    server = subprocess.Popen(
        [sys.executable, "-m", "infergw.bench.metrics_server", *map(str, ports)]
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    (workdir / "pool.yaml").write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "inference.networking.k8s.io/v1",
                    "kind": "InferencePool",
                    "metadata": {"name": "p", "namespace": "default"},
                    "spec": {
                        "selector": {"matchLabels": {"app": "m"}},
                        "targetPorts": [{"number": p} for p in ports],
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "m", "namespace": "default", "labels": {"app": "m"}},
                    "status": {
                        "podIP": "127.0.0.1",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                },
            ]
        )
    )
    metrics_port = free_port()
    picker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infergw.epp",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(free_port()),
            "--grpc-health-port",
            str(free_port()),
            "--metrics-port",
            str(metrics_port),
            "--provider",
            "file",
            "--pool-file",
            str(workdir / "pool.yaml"),
            "--pool-name",
            "p",
            "--secure-serving=false",
            "--refresh-metrics-interval",
            f"{interval_ms}ms",
            "--log-level",
            "warning",
        ]
    )
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/healthz", 30, picker)
        time.sleep(1.0)
        cpu0, t0 = process_cpu_seconds(picker.pid), time.monotonic()
        time.sleep(seconds)
        cpu, wall = process_cpu_seconds(picker.pid) - cpu0, time.monotonic() - t0
    finally:
        picker.terminate()
        server.terminate()
        picker.wait(10)
        server.wait(10)
    scrapes = endpoints * wall / (interval_ms / 1000)
    return {
        "endpoints": endpoints,
        "interval_ms": interval_ms,
        "picker_cpu_percent": round(100 * cpu / wall, 1),
        "cpu_us_per_scrape": round(1e6 * cpu / scrapes, 1),
    }


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), load {out['load']}."]
    if out.get("stub"):
        lines += ["", epp_vs_stub.markdown(out["stub"])]
    if out.get("pipeline"):
        lines += ["", epp_pipeline.markdown(out["pipeline"])]
    if out.get("runs"):
        lines += ["", *_paths_markdown(out)]
    if out.get("scrape"):
        lines += ["", *_scrape_markdown(out)]
    return "\n".join(lines)


def _paths_markdown(out: dict) -> list[str]:
    rows = {(r["with_picker"], r["stream"], r["response_bodies"]): r for r in out["runs"]}
    lines = [
        f"Picker against no picker: {out['pods']} simulator "
        f"pods (time scale 0.1, {out['max_tokens']} output tokens), {out['concurrency']} "
        f"closed-loop clients, {out['duration_s']:.0f} s per run.",
        "",
        "| requests | throughput (picker / direct) | p50 ratio | p99 ratio | "
        "p50 ms with / without | picker CPU µs per request |",
        "|---|---|---|---|---|---|",
    ]
    for stream, body in ((False, True), (False, False), (True, True), (True, False)):
        a, b = rows[(True, stream, body)], rows[(False, stream, True)]
        kind = "streaming" if stream else "non-streaming"
        lines.append(
            f"| {kind}, response body {'through the picker' if body else 'kept away'} | "
            f"{a['throughput_rps'] / b['throughput_rps']:.3f} "
            f"({a['throughput_rps']:.1f} / {b['throughput_rps']:.1f} req/s) | "
            f"{a['p50_ms'] / b['p50_ms']:.3f} | {a['p99_ms'] / b['p99_ms']:.3f} | "
            f"{a['p50_ms']:.1f} / {b['p50_ms']:.1f} | {a['picker_cpu_us_per_request']:.0f} |"
        )
    return lines


def _scrape_markdown(out: dict) -> list[str]:
    lines = [
        "| endpoints scraped | interval | picker CPU (% of a core) | CPU µs per scrape |",
        "|---|---|---|---|",
    ]
    for s in out["scrape"]:
        lines.append(
            f"| {s['endpoints']} | {s['interval_ms']} ms | {s['picker_cpu_percent']} | "
            f"{s['cpu_us_per_scrape']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench epp_overhead", description=__doc__, formatter_class=HelpFormatter
    )
    load = p.add_argument_group("Fleet and load")
    scraping = p.add_argument_group("Scraping")
    parts = p.add_argument_group("Parts measured")
    comparison = p.add_argument_group("Comparison")
    load.add_argument("--pods", type=int, default=2, help="simulator pods")
    load.add_argument("--concurrency", type=int, default=16, help="clients sending at once")
    load.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    load.add_argument("--max-tokens", type=int, default=16, help="output tokens a request")
    scraping.add_argument(
        "--scrape-endpoints", type=int, default=8, help="pods whose metrics the scrape part reads"
    )
    scraping.add_argument(
        "--scrape-seconds", type=float, default=10.0, help="seconds the scrape part runs"
    )
    parts.add_argument(
        "--parts",
        default="stub,pipeline,paths,scrape",
        help="which parts to run: stub (picker beside the minimal stub), pipeline (the "
        "picker's own CPU per request without gRPC), paths (picker against no picker, on "
        "simulator pods), scrape (idle scraping cost)",
    )
    comparison.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="a commit whose picker runs beside this one in the stub and pipeline parts",
    )
    parts.add_argument(
        "--pipeline-chunks",
        default="0,100",
        help="the answers of the pipeline part: 0 a JSON answer, N a streamed answer of N "
        "token events (comma-separated)",
    )
    parts.add_argument(
        "--stub-concurrency",
        type=int,
        default=32,
        help="clients at once in the picker-vs-stub part",
    )
    parts.add_argument("--stub-duration", type=float, default=5.0, help="seconds a round")
    parts.add_argument(
        "--stub-rounds", type=int, default=3, help="rounds of the picker-vs-stub part (alternating)"
    )
    load.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="what sends the load: wrk if installed (auto), or the Python client",
    )
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    known = {"stub", "pipeline", "paths", "scrape"}
    if parts - known:
        p.error(
            f"unknown parts: {', '.join(sorted(parts - known))}; known: {', '.join(sorted(known))}"
        )
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    stub = None
    if "stub" in parts:
        stub = epp_vs_stub.compare(
            concurrency=args.stub_concurrency,
            duration=args.stub_duration,
            rounds=args.stub_rounds,
            loadgen=args.loadgen,
            baselines=args.baseline,
            responses=epp_vs_stub.RESPONSE_MODES,
        )
        print(json.dumps(stub), flush=True)
    pipeline = None
    if "pipeline" in parts:
        chunks = [int(n) for n in args.pipeline_chunks.split(",")]
        pipeline = epp_pipeline.compare([*args.baseline, "HEAD"], chunks=chunks)
        print(json.dumps(pipeline), flush=True)
    runs = []
    for stream in (False, True) if "paths" in parts else ():
        for with_picker, bodies in ((True, True), (True, False), (False, True)):
            r = measure(
                with_picker,
                stream,
                args.pods,
                args.concurrency,
                args.duration,
                args.max_tokens,
                bodies,
            )
            print(json.dumps(r), flush=True)
            runs.append(r)
    scrape = []
    for interval in (50, 100, 1000) if "scrape" in parts else ():
        s = scrape_cost(args.scrape_endpoints, interval, args.scrape_seconds)
        print(json.dumps(s), flush=True)
        scrape.append(s)
    out = {
        "benchmark": "epp_overhead",
        "machine": machine(),
        "load": load,  # /proc/loadavg before the run: what else shared the cores
        "stub": stub,
        "pipeline": pipeline,
        "pods": args.pods,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "scrape": scrape,
    }
    # A run of some parts keeps the full run's file as it was.
    name = "epp_overhead" if parts == known else "epp_overhead-" + "-".join(sorted(parts))
    print("wrote", write_json(name, out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
