"""The picker beside the floor a Python ext_proc server sets, through one Envoy in one run.

One Envoy (`--concurrency 1`) has two listeners that differ only in the ext_proc cluster they
ask: the picker (the quickstart scheduling: precise prefix scorer, tokenizer on) or the
minimal stub (bench/extproc_stub.py: same processing modes, TLS and event loop, a fixed
destination). Both send requests on to the same canned pods (bench/canned_pod.py), which
answer at once and serve a real vLLM /metrics page the picker scrapes. The load is wrk
(closed loop, C connections) when it is installed, else the Python load generator; the two
listeners take turns for R rounds of D seconds each, so drift on a shared machine falls on
both alike.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from infergw.bench.common import percentile, process_cpu_seconds
from infergw.bench.loadgen import run_load
from infergw.stack.envoy_config import EnvoySettings, render
from infergw.stack.local import PICKER_HOST, LocalStack, StackConfig, envoy_binary, stop_group
from infergw.stack.ports import free_port, free_stack_ports
from infergw.stack.readiness import wait_http, wait_until

MODEL = "infergate-sim"
PROMPT = "hello " * 50
STUB_CLUSTER = "extproc-stub"

# Per request: a new first line, so no two prompts share a block (the precise scorer tokenizes,
# hashes and looks up each one in full). done() prints one line of JSON the benchmark reads.
WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  local body = '{"model":"%(model)s","max_tokens":1,"prompt":"request ' .. n .. ': %(prompt)s"}'
  return wrk.format("POST", "/v1/completions", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(slots=True)
class Round:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float  # the ext_proc server's (picker's or stub's) CPU over the round


def _load_wrk(url: str, concurrency: int, duration: float, script: Path) -> Round:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    r = json.loads(line.removeprefix("WRKJSON "))
    return Round(
        requests=r["requests"] - r["errors"],
        errors=r["errors"],
        seconds=r["duration_us"] / 1e6,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        server_cpu_s=0.0,
    )


def _load_python(url: str, concurrency: int, duration: float) -> Round:
    def body(i: int, n: int) -> dict:
        return {"model": MODEL, "max_tokens": 1, "prompt": f"request {i}.{n}: {PROMPT}"}

    res = asyncio.run(run_load(url + "/v1/completions", body, concurrency, duration, warmup=0.5))
    return Round(
        requests=res.requests,
        errors=res.errors,
        seconds=res.wall,
        p50_ms=1000 * percentile(res.latencies, 50),
        p99_ms=1000 * percentile(res.latencies, 99),
        server_cpu_s=0.0,
    )


def _py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen:
    """py-spy recording `pid` for `seconds` (extra `bench`); it samples from outside, so the
    picker runs unchanged, only a little slower while it is sampled."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, round(seconds))),
            "-r",
            "200",
            "--format",
            "raw",
            "-o",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def envoy_config(stack: LocalStack, stub_port: int, picker_port: int, stub_listen: int) -> str:
    """The stack's Envoy config with a second listener whose ext_proc asks the stub: a copy
    of the picker's listener and cluster but for the cluster name and ports."""
    c = stack.cfg
    doc = yaml.safe_load(
        render(
            EnvoySettings(
                listen_port=picker_port,
                admin_port=c.ports.envoy_admin,
                picker_host=PICKER_HOST,
                picker_port=c.ports.picker,
                picker_tls=c.picker_tls,
                picker_ca=str(stack.picker_tls_dir / "ca.crt") if c.picker_tls else None,
                failure_mode="FailClose",
                endpoints=[("127.0.0.1", p) for p in stack.pod_ports],
                fallbacks=c.fallbacks,
                response_bodies=c.response_bodies,
            )
        )
    )
    resources = doc["static_resources"]
    listener = json.loads(json.dumps(resources["listeners"][0]))
    listener["name"] = "inference-stub"
    listener["address"]["socket_address"]["port_value"] = stub_listen
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = STUB_CLUSTER
    resources["listeners"].append(listener)
    (picker,) = [x for x in resources["clusters"] if x["name"] == "endpoint-picker"]
    stub = json.loads(json.dumps(picker))
    stub["name"] = stub["load_assignment"]["cluster_name"] = STUB_CLUSTER
    address = stub["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    address["socket_address"]["port_value"] = stub_port
    resources["clusters"].append(stub)
    return yaml.safe_dump(doc, sort_keys=False)


def _wait_answering(url: str, proc: subprocess.Popen) -> None:
    """Until a completion goes through this listener (its ext_proc server is up)."""
    import urllib.request

    def ok() -> bool:
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": MODEL, "prompt": "warm", "max_tokens": 1}).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(ok, 30, proc, f"a completion through {url}")


def compare(
    pods: int = 2,
    concurrency: int = 32,
    duration: float = 5.0,
    rounds: int = 2,
    picker_args: list[str] | None = None,
    loadgen: str = "auto",
    profile: Path | None = None,
) -> dict:
    """Stub and picker in turns; the totals and their ratios. `profile`: py-spy records the
    picker through its rounds into this file (collapsed stacks, flamegraph.pl's input)."""
    use_wrk = loadgen == "wrk" or (loadgen == "auto" and shutil.which("wrk") is not None)
    workdir = Path(tempfile.mkdtemp(prefix="bench-epp-stub-"))
    stack = LocalStack(
        StackConfig(
            workdir=workdir,
            pods=pods,
            ports=free_stack_ports(pods),
            pod_ports=[free_port() for _ in range(pods)],
            pod_command=lambda port: [
                sys.executable,
                "-m",
                "infergw.bench.canned_pod",
                str(port),
                MODEL,
            ],
            picker_args=["--log-level", "warning", *(picker_args or [])],
        )
    )
    stub = envoy = None
    script = workdir / "load.lua"
    script.write_text(WRK_SCRIPT % {"model": MODEL, "prompt": PROMPT})
    try:
        stack.start_picker()
        stack.start_pods()
        stub_port, picker_listen, stub_listen = free_port(), free_port(), free_port()
        stub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infergw.bench.extproc_stub",
                "--port",
                str(stub_port),
                "--destination",
                ",".join(stack.pod_addresses),
                *(["--cert-dir", str(stack.picker_tls_dir)] if stack.cfg.picker_tls else []),
            ],
            start_new_session=True,
        )
        config = workdir / "envoy-two-listeners.yaml"
        config.write_text(envoy_config(stack, stub_port, picker_listen, stub_listen))
        envoy = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config),
                "--concurrency",
                "1",
                "--log-level",
                "error",
                "--base-id",
                str(stack.cfg.ports.envoy_admin),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_http(f"http://127.0.0.1:{stack.cfg.ports.envoy_admin}/ready", 30, envoy)
        servers = {"stub": stub, "picker": stack.procs["picker"]}
        urls = {
            "stub": f"http://127.0.0.1:{stub_listen}",
            "picker": f"http://127.0.0.1:{picker_listen}",
        }
        for name, url in urls.items():
            _wait_answering(url, servers[name])

        def one(name: str, seconds: float, record: bool = False) -> Round:
            pid = servers[name].pid
            spy = _py_spy(pid, profile, seconds) if record and name == "picker" else None
            cpu0 = process_cpu_seconds(pid)
            if use_wrk:
                r = _load_wrk(urls[name], concurrency, seconds, script)
            else:
                r = _load_python(urls[name], concurrency, seconds)
            r.server_cpu_s = process_cpu_seconds(pid) - cpu0
            if spy is not None:
                spy.wait(30)
            return r

        for name in urls:  # warm-up: connections, caches, the JIT-less first requests
            one(name, 2)
        results: dict[str, list[Round]] = {"stub": [], "picker": []}
        for i in range(rounds):
            for name in urls:
                results[name].append(one(name, duration, record=profile is not None and i == 0))
    finally:
        for proc in (envoy, stub):
            if proc is not None:
                stop_group(proc)
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return summarize(results, use_wrk, pods, concurrency, duration, rounds)


def summarize(
    results: dict[str, list[Round]],
    use_wrk: bool,
    pods: int,
    concurrency: int,
    duration: float,
    rounds: int,
) -> dict:
    out: dict = {
        "loadgen": "wrk" if use_wrk else "python",
        "pods": pods,
        "concurrency": concurrency,
        "duration_s": duration,
        "rounds": rounds,
    }
    for name, rs in results.items():
        requests = sum(r.requests for r in rs)
        seconds = sum(r.seconds for r in rs)
        out[name] = {
            "rps": round(requests / seconds, 1),
            "errors": sum(r.errors for r in rs),
            # Per-round percentiles (wrk's) are combined as the mean of the rounds'.
            "p50_ms": round(sum(r.p50_ms for r in rs) / len(rs), 2),
            "p99_ms": round(sum(r.p99_ms for r in rs) / len(rs), 2),
            "cpu_us_per_request": round(1e6 * sum(r.server_cpu_s for r in rs) / max(requests, 1)),
            "rounds": [
                {"rps": round(r.requests / r.seconds, 1), "p99_ms": round(r.p99_ms, 2)} for r in rs
            ],
        }
    out["rps_ratio"] = round(out["picker"]["rps"] / out["stub"]["rps"], 3)
    out["p99_ratio"] = round(out["picker"]["p99_ms"] / out["stub"]["p99_ms"], 3)
    return out


def markdown(out: dict) -> str:
    s, p = out["stub"], out["picker"]
    return "\n".join(
        [
            f"{out['loadgen']} with {out['concurrency']} connections, {out['rounds']} rounds of "
            f"{out['duration_s']:.0f} s each, {out['pods']} canned pods, Envoy --concurrency 1.",
            "",
            "| ext_proc server | req/s | p50 ms | p99 ms | server CPU µs per request | errors |",
            "|---|---|---|---|---|---|",
            f"| minimal stub | {s['rps']} | {s['p50_ms']} | {s['p99_ms']} | "
            f"{s['cpu_us_per_request']} | {s['errors']} |",
            f"| picker (quickstart scheduling) | {p['rps']} | {p['p50_ms']} | {p['p99_ms']} | "
            f"{p['cpu_us_per_request']} | {p['errors']} |",
            f"| **picker / stub** | **{out['rps_ratio']}** | | **{out['p99_ratio']}** | | |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m infergw.bench.epp_vs_stub", description=__doc__)
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--profile", type=Path, help="py-spy the picker's first round into this file")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    out = compare(
        args.pods,
        args.concurrency,
        args.duration,
        args.rounds,
        loadgen=args.loadgen,
        profile=args.profile,
    )
    print(json.dumps(out))
    print(markdown(out))
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
