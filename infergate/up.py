"""`infergate up`: the local stack on one machine.

Until the endpoint picker and Envoy land (issue 3), this starts a fleet of simulator pods on
the ports DESIGN.md fixes (8000, 8001, ...), each publishing KV events to the central
endpoint tcp://127.0.0.1:5557 with the topic kv@<ip:port>@<model>, and stops them all on
Ctrl-C. Requests go straight to a pod; nothing picks one for you yet.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

from infergate.readiness import wait_http


def pod_command(args: argparse.Namespace, port: int) -> list[str]:
    topic = f"kv@127.0.0.1:{port}@{args.served_model_name}"
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": args.kv_events_endpoint,
        "topic": topic,
    }
    cmd = [
        sys.executable,
        "-m",
        "simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        args.served_model_name,
        "--kv-events-config",
        json.dumps(events),
        "--seed",
        str(port),
        "--sim-output-len-mean",
        str(args.output_len_mean),
    ]
    if args.model:
        cmd += ["--model", args.model]
    return cmd + args.simulator_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--base-port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    p.add_argument("--served-model-name", default="infergate-sim")
    p.add_argument("--kv-events-endpoint", default="tcp://127.0.0.1:5557")
    p.add_argument(
        "--output-len-mean",
        type=float,
        default=64.0,
        help="mean answer length before EOS (the simulator's --sim-output-len-mean)",
    )
    p.add_argument(
        "simulator_args",
        nargs=argparse.REMAINDER,
        help="after --, flags passed to every simulator pod",
    )
    args = p.parse_args(argv)
    if args.simulator_args[:1] == ["--"]:
        args.simulator_args = args.simulator_args[1:]
    if args.pods < 1:
        p.error("--pods must be at least 1")

    procs: list[subprocess.Popen] = []
    stop = False

    def on_signal(_sig, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i in range(args.pods):
            port = args.base_port + i
            procs.append(subprocess.Popen(pod_command(args, port)))
        for i, proc in enumerate(procs):
            wait_http(f"http://127.0.0.1:{args.base_port + i}/health", 60, proc)
        ports = [args.base_port + i for i in range(args.pods)]
        print(
            f"\ninfergate up: {args.pods} simulator pods serving {args.served_model_name!r} "
            f"on 127.0.0.1:{ports[0]}..{ports[-1]}, KV events to {args.kv_events_endpoint}."
        )
        print("The picker and Envoy are not part of the stack yet: send requests to a pod, e.g.")
        print(
            f"  curl 127.0.0.1:{ports[0]}/v1/chat/completions -H 'content-type: "
            f'application/json\' -d \'{{"model":"{args.served_model_name}","messages":'
            f'[{{"role":"user","content":"hi"}}]}}\''
        )
        print("Ctrl-C stops every pod.", flush=True)
        while not stop:
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    print(
                        f"infergate up: pod on port {args.base_port + i} exited with "
                        f"{proc.returncode}; stopping the stack",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"infergate up: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
