"""The picker's own work per request, without gRPC, for commits side by side.

A child process builds the picker as `python -m infergw.epp` would (the quickstart
scheduling: precise prefix scorer, tokenizer on; two pods that are never scraped during the
run) and feeds its ext_proc servicer the messages of each request directly, one request after
another (or, with `--concurrency C`, C at a time, as Envoy's many streams arrive); its CPU
time per request is the picker's parsing, routing, tokenizing, scheduling, bookkeeping and
answer building, with no network and no gRPC. Each commit (`--commit`,
repeatable; `HEAD` is the installed code) runs in turns for R rounds, so drift on a shared
machine falls on all alike. The child imports the picker as any process that runs it does;
this module does not.

Two answers: a JSON completion in one body message (four messages a request), or with
`--chunks N` a streamed one as vLLM sends it — N SSE events of one token each, each in its own
body message, then a last message with the usage event and `data: [DONE]`. In the streamed
mode the chunks' CPU is also timed on its own (from the first of the N chunk messages to the
last, answers included): µs per chunk, and per request without them. The messages are built
before the clock starts (making them is the proxy's work). On a shared machine the others'
load only adds CPU time (caches, frequency), so the best run is reported beside the median.

With `--tracing off --tracing sampled --tracing unsampled` the installed code runs once per
tracing setting instead (api/tracing.py; the spans of `sampled` go over OTLP/HTTP to a sink
this process runs, `unsampled` is tracing on with the always_off sampler).

infergate bench epp_overhead --parts pipeline --baseline 002be74 [--pipeline-chunks 0,100]
python -m infergw.bench.epp_pipeline --commit 002be74 --commit HEAD [--chunks 100]
python -m infergw.bench.epp_pipeline --tracing off --tracing sampled --tracing unsampled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from infergw.bench import checkout
from infergw.bench.common import ROOT
from infergw.stack.local import DEFAULT_MODEL_DIR, QUICKSTART
from infergw.stack.ports import free_port

# Run by the child: argv[1] is a JSON object of settings; prints one JSON line.
CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
import yaml
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from infergw.epp.app import build_picker, stop_picker
from infergw.epp.extproc import ExternalProcessor
from infergw.epp.options import parse_options

s = json.loads(sys.argv[1])

def headers(pairs):
    return core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])

N = s["chunks"]
ANSWER = json.dumps({"id": "c", "object": "text_completion", "model": s["model"],
    "choices": [{"index": 0, "text": " x", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65}}).encode()

def sse(doc):
    return b"data: " + json.dumps(doc).encode() + b"\n\n"

# A vLLM /v1/completions stream: one event a token, then (include_usage) the usage event.
CHUNK = sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": s["model"],
    "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": None,
                 "stop_reason": None}]})
LAST = sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": s["model"],
    "choices": [], "usage": {"prompt_tokens": 64, "completion_tokens": N,
                             "total_tokens": 64 + N}}) + b"data: [DONE]\n\n"

def messages(i):
    body = {"model": s["model"], "max_tokens": max(1, N), "prompt": f"request {i}: " + s["prompt"]}
    if N:
        body["stream"] = True
    out = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers([
            (":method", "POST"), (":path", "/v1/completions"), (":authority", "gw"),
            ("content-type", "application/json"), ("x-request-id", f"r{i}")]))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(body).encode(),
                                                      end_of_stream=True)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers([
            (":status", "200"),
            ("content-type", "text/event-stream" if N else "application/json")]))),
    ]
    if not N:
        return out + [pb.ProcessingRequest(response_body=pb.HttpBody(body=ANSWER,
                                                                     end_of_stream=True))]
    out += [pb.ProcessingRequest(response_body=pb.HttpBody(body=CHUNK)) for _ in range(N)]
    return out + [pb.ProcessingRequest(response_body=pb.HttpBody(body=LAST, end_of_stream=True))]

chunk_cpu = 0.0

# The messages; the CPU from the first chunk message to the last one's answers is timed.
async def feed(items):
    global chunk_cpu
    for k, m in enumerate(items):
        if k == 3 and N:
            t = time.process_time()
        elif k == 3 + N and N:
            chunk_cpu += time.process_time() - t
        yield m

async def main():
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "m"}},
                     "targetPorts": [{"number": p} for p in s["pod_ports"]]}}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "m", "namespace": "default", "labels": {"app": "m"}},
           "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    (work / "pool.yaml").write_text(yaml.safe_dump_all([pool, pod]))
    opts = parse_options(["--host", "127.0.0.1", "--provider", "file",
        "--pool-file", str(work / "pool.yaml"), "--pool-name", "p", "--secure-serving=false",
        "--config", s["config"], "--tokenizer", f"{s['model']}={s['tokenizer']}",
        "--kv-events-bind", f"tcp://127.0.0.1:{s['kv_port']}",
        "--refresh-metrics-interval", "1000s", "--log-level", "warning"])
    if s.get("tracing"):  # the OTEL_* variables the parent set (api/tracing.py)
        from infergw.api import tracing
        tracing.start("epp")
    picker = await build_picker(opts)
    processor = ExternalProcessor(picker.director)

    async def one(i):
        await one_of(messages(i))

    async def one_of(items):
        answers = [a async for a in processor.Process(feed(items), None)]
        if len(answers) != 4 + N or not answers[0].HasField("request_headers"):
            raise SystemExit(f"unexpected answers: {answers}")

    for i in range(s["warmup"]):
        await one(i)
    # Built beforehand: making the messages is the proxy's work, not the picker's.
    batch = [messages(i) for i in range(s["warmup"], s["warmup"] + s["requests"])]
    global chunk_cpu
    chunk_cpu = 0.0
    cpu, wall = time.process_time(), time.perf_counter()
    if s["concurrency"] == 1:
        for items in batch:
            await one_of(items)
    else:  # C requests in flight, as Envoy's streams are: the lane hand-offs batch up
        room = asyncio.Semaphore(s["concurrency"])
        async def held(items):
            async with room:
                await one_of(items)
        await asyncio.gather(*(held(items) for items in batch))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    r = s["requests"]
    print(json.dumps({"cpu_us": 1e6 * cpu / r, "wall_us": 1e6 * wall / r,
                      "chunk_cpu_us": 1e6 * chunk_cpu / (r * N) if N else None}))
    await stop_picker(picker)

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""

MODEL = "infergate-sim"
PROMPT = "hello " * 50


def run_child(
    path: Path | None,
    requests: int,
    warmup: int = 200,
    chunks: int = 0,
    tracing: dict[str, str] | None = None,
    concurrency: int = 1,
) -> dict:
    """One child run of the picker code on PYTHONPATH `path` (None: the installed code);
    `chunks`: 0 for a JSON answer, else the streamed answer's token events; `tracing`: the
    OTEL_* variables to start tracing with (None: off)."""
    settings = {
        "model": MODEL,
        "prompt": PROMPT,
        "config": str(QUICKSTART / "epp-config.yaml"),
        "tokenizer": str(DEFAULT_MODEL_DIR),
        "pod_ports": [free_port(), free_port()],
        "kv_port": free_port(),
        "requests": requests,
        "warmup": warmup,
        "chunks": chunks,
        "tracing": tracing is not None,
        "concurrency": concurrency,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(tracing or {})
    if path is not None:
        env["PYTHONPATH"] = str(path)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the pipeline child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict], chunks: int) -> dict:
    cpu = statistics.median(r["cpu_us"] for r in runs)
    # The least disturbed run: on a shared machine, the others' load only ever adds.
    out = {
        "cpu_us_per_request": round(cpu),
        "best_cpu_us_per_request": round(min(r["cpu_us"] for r in runs)),
        "wall_us_per_request": round(statistics.median(r["wall_us"] for r in runs)),
        "runs_cpu_us": [round(r["cpu_us"]) for r in runs],
    }
    if chunks:
        chunk = statistics.median(r["chunk_cpu_us"] for r in runs)
        out["cpu_us_per_chunk"] = round(chunk, 2)
        out["best_cpu_us_per_chunk"] = round(min(r["chunk_cpu_us"] for r in runs), 2)
        out["runs_cpu_us_per_chunk"] = [round(r["chunk_cpu_us"], 2) for r in runs]
        out["cpu_us_per_request_without_chunks"] = round(cpu - chunks * chunk)
    return out


TRACING_MODES = ("off", "sampled", "unsampled")


@contextmanager
def trace_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint on 127.0.0.1 that takes every export and keeps nothing."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tracing_env(mode: str, endpoint: str) -> dict[str, str] | None:
    if mode == "off":
        return None
    sampler = "always_on" if mode == "sampled" else "always_off"
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": sampler}


def compare_tracing(
    modes: Sequence[str], requests: int = 2000, rounds: int = 3, chunks: Sequence[int] = (0,)
) -> dict:
    """The installed picker's CPU per request with tracing off, on and sampled, on and not
    sampled: the modes taking turns, as compare's commits do."""
    runs: dict[tuple[int, str], list[dict]] = {(n, m): [] for n in chunks for m in modes}
    with trace_sink() as endpoint:
        for _ in range(rounds):
            for n in chunks:
                for m in modes:
                    env = tracing_env(m, endpoint)
                    runs[n, m].append(run_child(None, requests, chunks=n, tracing=env))
    return _result(requests, rounds, chunks, modes, runs, label="tracing ")


def compare(
    commits: list[str],
    requests: int = 2000,
    rounds: int = 3,
    chunks: Sequence[int] = (0,),
    concurrency: int = 1,
) -> dict:
    """CPU µs per request (and per streamed chunk) of each commit's picker pipeline, for each
    answer in `chunks` (0: JSON, N: N streamed token events): the median of `rounds` runs,
    the commits and answers taking turns; `concurrency` requests in flight at once."""
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    paths = {
        c: None if c == "HEAD" else checkout.importable(c, work / c.replace("/", "_"))
        for c in commits
    }
    runs: dict[tuple[int, str], list[dict]] = {(n, c): [] for n in chunks for c in commits}
    for _ in range(rounds):
        for n in chunks:
            for c in commits:
                runs[n, c].append(run_child(paths[c], requests, chunks=n, concurrency=concurrency))
    out = _result(requests, rounds, chunks, commits, runs)
    out["concurrency"] = concurrency
    return out


def _result(requests, rounds, chunks, commits, runs, label: str = "") -> dict:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "requests": requests,
        "rounds": rounds,
        "head": head,
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "modes": [
            {"chunks": n, "commits": {label + c: _summary(runs[n, c], n) for c in commits}}
            for n in chunks
        ],
    }


def markdown(out: dict) -> str:
    lines = [
        f"The picker's own work, no gRPC: {out['requests']} requests a run, median of "
        f"{out['rounds']} runs taking turns (HEAD is {out['head']}; load average after: "
        f"{out.get('load', '?')}; {out.get('concurrency', 1)} request(s) in flight).",
        "",
        "| answer | commit | CPU µs per request (best run) | per streamed chunk (best run) | "
        "per request without its chunks | wall µs per request | "
        "runs (CPU µs per request) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in out["modes"]:
        n = mode["chunks"]
        answer = f"{n} streamed chunks" if n else "JSON"
        for c, r in mode["commits"].items():
            per_chunk = "—"
            if "cpu_us_per_chunk" in r:
                per_chunk = f"{r['cpu_us_per_chunk']} ({r['best_cpu_us_per_chunk']})"
            without = r.get("cpu_us_per_request_without_chunks", "—")
            per_request = f"{r['cpu_us_per_request']} ({r['best_cpu_us_per_request']})"
            lines.append(
                f"| {answer} | {c} | {per_request} | {per_chunk} | {without} | "
                f"{r['wall_us_per_request']} | {', '.join(map(str, r['runs_cpu_us']))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infergw.bench.epp_pipeline", description=__doc__)
    p.add_argument("--commit", action="append", default=[], help="repeatable; HEAD: installed")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once (1: one after another); Envoy keeps many streams "
        "open, so the tokenizing lane's hand-offs batch up as they do through it",
    )
    p.add_argument(
        "--chunks",
        type=int,
        action="append",
        default=[],
        help="repeatable: 0 for a JSON answer (the default), N for a streamed answer of N "
        "token events (each its own body message) and the usage event",
    )
    p.add_argument(
        "--tracing",
        action="append",
        default=[],
        choices=TRACING_MODES,
        help="repeatable, instead of --commit: the installed code with tracing off, on and "
        "sampled, on and not sampled",
    )
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be 1 or more")
    if any(n < 0 for n in args.chunks):
        p.error("--chunks must be 0 or more")
    if args.tracing and args.commit:
        p.error("--tracing compares the installed code's tracing settings: no --commit")
    if args.tracing:
        out = compare_tracing(args.tracing, args.requests, args.rounds, args.chunks or [0])
    else:
        out = compare(
            args.commit or ["HEAD"],
            args.requests,
            args.rounds,
            args.chunks or [0],
            args.concurrency,
        )
    print(json.dumps(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
