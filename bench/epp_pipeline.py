"""The picker's own work per request, without gRPC, for commits side by side.

A child process builds the picker as `python -m infergw.epp` would (the quickstart
scheduling: precise prefix scorer, tokenizer on; two pods that are never scraped during the
run) and feeds its ext_proc servicer the four messages of each request directly (request
headers, body, response headers, response body), one request after another; its CPU time
per request is the picker's parsing, routing, tokenizing, scheduling, bookkeeping and answer
building, with no network and no gRPC. Each commit (`--commit`, repeatable; `HEAD` is the
installed code) runs in turns for R rounds, so drift on a shared machine falls on all alike.
The child imports the picker as any process that runs it does; this module does not.

infergate bench epp_overhead --parts pipeline --pipeline-commit 002be74 ...
python -m infergw.bench.epp_pipeline --commit 002be74 --commit HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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

ANSWER = json.dumps({"id": "c", "object": "text_completion", "model": s["model"],
    "choices": [{"index": 0, "text": " x", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65}}).encode()

def messages(i):
    body = json.dumps({"model": s["model"], "max_tokens": 1,
                       "prompt": f"request {i}: " + s["prompt"]}).encode()
    return [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers([
            (":method", "POST"), (":path", "/v1/completions"), (":authority", "gw"),
            ("content-type", "application/json"), ("x-request-id", f"r{i}")]))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers([
            (":status", "200"), ("content-type", "application/json")]))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=ANSWER, end_of_stream=True)),
    ]

async def feed(items):
    for m in items:
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
    picker = await build_picker(opts)
    processor = ExternalProcessor(picker.director)

    async def one(i):
        answers = [a async for a in processor.Process(feed(messages(i)), None)]
        if len(answers) != 4 or not answers[0].HasField("request_headers"):
            raise SystemExit(f"unexpected answers: {answers}")

    for i in range(s["warmup"]):
        await one(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(s["warmup"], s["warmup"] + s["requests"]):
        await one(i)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"cpu_us": 1e6 * cpu / s["requests"], "wall_us": 1e6 * wall / s["requests"]}))
    await stop_picker(picker)

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""

MODEL = "infergate-sim"
PROMPT = "hello " * 50


def run_child(path: Path | None, requests: int, warmup: int = 200) -> dict:
    """One child run of the picker code on PYTHONPATH `path` (None: the installed code)."""
    settings = {
        "model": MODEL,
        "prompt": PROMPT,
        "config": str(QUICKSTART / "epp-config.yaml"),
        "tokenizer": str(DEFAULT_MODEL_DIR),
        "pod_ports": [free_port(), free_port()],
        "kv_port": free_port(),
        "requests": requests,
        "warmup": warmup,
    }
    env = dict(os.environ)
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


def compare(commits: list[str], requests: int = 2000, rounds: int = 3) -> dict:
    """CPU µs per request of each commit's picker pipeline: the median of `rounds` runs,
    the commits taking turns."""
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    paths = {
        c: None if c == "HEAD" else checkout.importable(c, work / c.replace("/", "_"))
        for c in commits
    }
    runs: dict[str, list[dict]] = {c: [] for c in commits}
    for _ in range(rounds):
        for c in commits:
            runs[c].append(run_child(paths[c], requests))
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "requests": requests,
        "rounds": rounds,
        "head": head,
        "commits": {
            c: {
                "cpu_us_per_request": round(statistics.median(r["cpu_us"] for r in rs)),
                "wall_us_per_request": round(statistics.median(r["wall_us"] for r in rs)),
                "runs_cpu_us": [round(r["cpu_us"]) for r in rs],
            }
            for c, rs in runs.items()
        },
    }


def markdown(out: dict) -> str:
    lines = [
        f"The picker's own work, no gRPC: {out['requests']} requests a run, median of "
        f"{out['rounds']} runs taking turns (HEAD is {out['head']}).",
        "",
        "| commit | CPU µs per request | wall µs per request (one at a time) | runs (CPU µs) |",
        "|---|---|---|---|",
    ]
    for c, r in out["commits"].items():
        lines.append(
            f"| {c} | {r['cpu_us_per_request']} | {r['wall_us_per_request']} | "
            f"{', '.join(map(str, r['runs_cpu_us']))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infergw.bench.epp_pipeline", description=__doc__)
    p.add_argument("--commit", action="append", default=[], help="repeatable; HEAD: installed")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    out = compare(args.commit or ["HEAD"], args.requests, args.rounds)
    print(json.dumps(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
