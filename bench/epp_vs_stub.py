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

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from infergw.api.lifetime import spawn
from infergw.bench import checkout
from infergw.bench.common import percentile, process_cpu_seconds
from infergw.bench.loadgen import run_load
from infergw.stack.envoy_config import EnvoySettings, render
from infergw.stack.local import PICKER_HOST, LocalStack, StackConfig, envoy_binary, stop_group
from infergw.stack.ports import PickerPorts, free_port, free_stack_ports
from infergw.stack.readiness import wait_http, wait_until

MODEL = "infergate-sim"
PROMPT = "hello " * 50

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
    return spawn(
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


@dataclass(slots=True)
class ExtProcServer:
    """One ext_proc server the benchmark puts behind listeners of its own."""

    name: str
    proc: subprocess.Popen
    port: int  # where it serves ext_proc
    ca: str | None  # the CA Envoy verifies it by (TLS), or None (plaintext)


# What of the response Envoy sends the ext_proc server: everything (headers, bodies,
# trailers), headers only (the stack's response_bodies=False), or nothing (also
# response_headers=False). The request side is the same in all: headers and a
# FULL_DUPLEX_STREAMED body.
RESPONSE_MODES = ("through", "headers", "none")
_SUFFIX = {
    "through": "",
    "headers": " (response bodies kept away)",
    "none": " (response headers and bodies kept away)",
}


@dataclass(slots=True)
class Listener:
    """An Envoy listener that asks one ext_proc server, with one of RESPONSE_MODES."""

    server: ExtProcServer
    response: str
    port: int

    def __post_init__(self) -> None:
        if self.response not in RESPONSE_MODES:
            raise ValueError(f"response mode {self.response!r} is not one of {RESPONSE_MODES}")

    @property
    def name(self) -> str:
        return self.server.name + _SUFFIX[self.response]


def envoy_config(stack: LocalStack, listeners: list[Listener], admin_port: int) -> str:
    """The stack's Envoy config with the given listeners, each asking its ext_proc server:
    copies of the picker's listener and cluster but for the names, ports, CA and the
    response modes the stack renders for each of RESPONSE_MODES."""
    c = stack.cfg
    first = listeners[0].server
    doc = yaml.safe_load(
        render(
            EnvoySettings(
                listen_port=listeners[0].port,
                admin_port=admin_port,
                picker_host=PICKER_HOST,
                # The copies below ask servers without a health service (the stub): no checks.
                pickers=[
                    PickerPorts(grpc=first.port, health=first.port, metrics=0, replica_sync=0)
                ],
                picker_tls=first.ca is not None,
                picker_ca=first.ca,
                failure_mode="FailClose",
                endpoints=[("127.0.0.1", p) for p in stack.pod_ports],
                fallbacks=c.fallbacks,
            )
        )
    )
    resources = doc["static_resources"]
    (listener,) = resources["listeners"]
    (cluster,) = [x for x in resources["clusters"] if x["name"] == "endpoint-picker"]
    resources["listeners"], resources["clusters"] = (
        [],
        [x for x in resources["clusters"] if x is not cluster],
    )
    servers = {id(x.server): x.server for x in listeners}.values()
    for i, entry in enumerate(listeners):
        mine = json.loads(json.dumps(listener))
        mine["name"] = f"inference-{i}"
        mine["address"]["socket_address"]["port_value"] = entry.port
        manager = mine["filter_chains"][0]["filters"][0]["typed_config"]
        (ext_proc,) = [f for f in manager["http_filters"] if f["name"].endswith(".ext_proc")]
        config = ext_proc["typed_config"]
        config["grpc_service"]["envoy_grpc"]["cluster_name"] = _cluster(entry.server)
        config["processing_mode"] = _processing_mode(entry.response)
        resources["listeners"].append(mine)
    for server in servers:
        theirs = json.loads(json.dumps(cluster))
        theirs["name"] = theirs["load_assignment"]["cluster_name"] = _cluster(server)
        theirs.pop("health_checks", None)
        endpoint = theirs["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = server.port
        if server.ca is not None:
            tls = theirs["transport_socket"]["typed_config"]["common_tls_context"]
            tls["validation_context"]["trusted_ca"]["filename"] = server.ca
        resources["clusters"].append(theirs)
    return yaml.safe_dump(doc, sort_keys=False)


def _processing_mode(response: str) -> dict:
    """The stack's own rendering of a response mode (stack/envoy_config.py), so the
    benchmark measures what `infergate up` runs."""
    doc = yaml.safe_load(
        render(
            EnvoySettings(
                listen_port=1,
                admin_port=2,
                picker_host=PICKER_HOST,
                pickers=[PickerPorts(grpc=3, health=4, metrics=0, replica_sync=0)],
                picker_tls=False,
                failure_mode="FailClose",
                endpoints=[("127.0.0.1", 5)],
                response_bodies=response == "through",
                response_headers=response != "none",
            )
        )
    )
    (listener,) = doc["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in manager["http_filters"] if f["name"].endswith(".ext_proc")]
    return ext_proc["typed_config"]["processing_mode"]


def start_envoy(config: Path, admin: int) -> subprocess.Popen:
    """Envoy on one worker thread with this config, once its admin port says it is ready
    (its own process group: stop it with stop_group)."""
    envoy = spawn(
        [
            envoy_binary(),
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--log-level",
            "error",
            "--base-id",
            str(admin),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{admin}/ready", 30, envoy)
    except BaseException:
        stop_group(envoy)
        raise
    return envoy


def _cluster(server: ExtProcServer) -> str:
    return "extproc-" + server.name.replace("@", "-")


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


def _picker_stack(workdir: Path, pod_ports: list[int], picker_args: list[str]) -> LocalStack:
    return LocalStack(
        StackConfig(
            workdir=workdir,
            pods=len(pod_ports),
            ports=free_stack_ports(len(pod_ports)),
            pod_ports=pod_ports,
            pod_command=lambda port: [
                sys.executable,
                "-m",
                "infergw.bench.canned_pod",
                str(port),
                MODEL,
            ],
            picker_args=["--log-level", "warning", *picker_args],
        )
    )


def _ca(stack: LocalStack) -> str | None:
    return str(stack.picker_tls_dir / "ca.crt") if stack.cfg.picker_tls else None


def compare(
    pods: int = 2,
    concurrency: int = 32,
    duration: float = 5.0,
    rounds: int = 2,
    picker_args: list[str] | None = None,
    loadgen: str = "auto",
    profile: Path | None = None,
    baselines: list[str] = (),
    responses: tuple[str, ...] = ("through",),
) -> dict:
    """Stub and picker in turns; the totals and their ratios. `profile`: py-spy records the
    picker through its first round into this file (collapsed stacks, flamegraph.pl's input).
    `baselines`: commits of this repository whose picker runs beside, for before/after.
    `responses`: which of RESPONSE_MODES to measure, each server behind a listener per
    mode (the stub with the same modes as the picker)."""
    use_wrk = loadgen == "wrk" or (loadgen == "auto" and shutil.which("wrk") is not None)
    workdir = Path(tempfile.mkdtemp(prefix="bench-epp-stub-"))
    args = picker_args or []
    stack = _picker_stack(workdir / "picker", [free_port() for _ in range(pods)], args)
    others: list[LocalStack] = []
    envoy = None
    servers: list[ExtProcServer] = []
    script = workdir / "load.lua"
    script.write_text(WRK_SCRIPT % {"model": MODEL, "prompt": PROMPT})
    try:
        stack.start_picker()
        stack.start_pods()
        servers.append(
            ExtProcServer("picker", stack.procs["picker"], stack.cfg.ports.picker, _ca(stack))
        )
        for commit in baselines:
            other = _picker_stack(workdir / f"picker-{commit}", stack.pod_ports, args)
            others.append(other)
            path = checkout.importable(commit, workdir / f"checkout-{commit}")
            # The supervisor starts the picker with this process's environment.
            saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = str(path)
            try:
                other.start_picker()
            finally:
                if saved is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = saved
            name = f"picker@{commit}"
            servers.append(
                ExtProcServer(name, other.procs["picker"], other.cfg.ports.picker, _ca(other))
            )
        stub_port = free_port()
        stub = spawn(
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
        servers.insert(0, ExtProcServer("stub", stub, stub_port, _ca(stack)))
        listeners = [Listener(x, r, free_port()) for r in responses for x in servers]
        config = workdir / "envoy.yaml"
        admin = free_port()
        config.write_text(envoy_config(stack, listeners, admin))
        envoy = start_envoy(config, admin)
        for entry in listeners:
            _wait_answering(f"http://127.0.0.1:{entry.port}", entry.server.proc)

        def one(entry: Listener, seconds: float, record: bool = False) -> Round:
            pid = entry.server.proc.pid
            spy = _py_spy(pid, profile, seconds) if record and profile is not None else None
            url = f"http://127.0.0.1:{entry.port}"
            cpu0 = process_cpu_seconds(pid)
            if use_wrk:
                r = _load_wrk(url, concurrency, seconds, script)
            else:
                r = _load_python(url, concurrency, seconds)
            r.server_cpu_s = process_cpu_seconds(pid) - cpu0
            if spy is not None:
                spy.wait(30)
            return r

        for entry in listeners:  # warm-up: connections, caches, first-request costs
            one(entry, 2)
        results: dict[str, list[Round]] = {x.name: [] for x in listeners}
        for i in range(rounds):
            for entry in listeners:
                record = i == 0 and entry.name == "picker"
                results[entry.name].append(one(entry, duration, record))
    finally:
        if envoy is not None:
            stop_group(envoy)
        for server in servers:
            if server.name == "stub":
                stop_group(server.proc)
        for other in others:
            other.stop()
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
    out["servers"] = list(results)
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
                {
                    "rps": round(r.requests / r.seconds, 1),
                    "p99_ms": round(r.p99_ms, 2),
                    # Per round too: on a shared machine a round's rate swings, and the CPU
                    # a request (scraping's share above all) with it.
                    "cpu_us_per_request": round(1e6 * r.server_cpu_s / max(r.requests, 1)),
                }
                for r in rs
            ],
        }
    for name in results:
        # Against the stub behind a listener of the same mode.
        stub = out["stub" + name[name.index(" ") :] if " " in name else "stub"]
        if not name.startswith("stub"):
            out[name]["rps_ratio"] = round(out[name]["rps"] / stub["rps"], 3)
            out[name]["p99_ratio"] = round(out[name]["p99_ms"] / stub["p99_ms"], 3)
    return out


def markdown(out: dict) -> str:
    lines = [
        f"{out['loadgen']} with {out['concurrency']} connections, {out['rounds']} rounds of "
        f"{out['duration_s']:.0f} s each, {out['pods']} canned pods, Envoy --concurrency 1.",
        "",
        "| ext_proc server | req/s | p50 ms | p99 ms | server CPU µs per request | req/s ÷ stub's "
        "| p99 ÷ stub's | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in out["servers"]:  # ratios: against the stub behind a listener of the same mode
        r = out[name]
        label = name.replace("stub", "minimal stub", 1) if name.startswith("stub") else name
        lines.append(
            f"| {label} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['cpu_us_per_request']} | {r.get('rps_ratio', 1.0)} | {r.get('p99_ratio', 1.0)} "
            f"| {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infergw.bench.epp_vs_stub", description=__doc__)
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--profile", type=Path, help="py-spy the picker's first round into this file")
    p.add_argument(
        "--response",
        default="through",
        help="what of the response goes to the ext_proc servers, comma-separated of "
        "through (headers, bodies, trailers), headers (bodies kept away), none",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="a commit whose picker runs beside (before/after in one run); repeatable",
    )
    args = p.parse_args(argv)
    responses = tuple(args.response.split(","))
    if set(responses) - set(RESPONSE_MODES):
        p.error(f"--response takes {', '.join(RESPONSE_MODES)}")
    t0 = time.monotonic()
    out = compare(
        args.pods,
        args.concurrency,
        args.duration,
        args.rounds,
        loadgen=args.loadgen,
        profile=args.profile,
        baselines=args.baseline,
        responses=responses,
    )
    print(json.dumps(out))
    print(markdown(out))
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
