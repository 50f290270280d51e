"""For end-to-end tests of standalone mode: a simulator Model and a wait that fails with what
it was waiting for."""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

from infergw.api.lifetime import die_with_parent
from tests.conftest import free_port
from tests.paths import DEFAULT_MODEL
from tests.waiting import wait_for_async


def sim_model(
    name: str = "tiny",
    *,
    backend: dict,
    engine_args: list[str] = ("--sim-time-scale=0",),
    replicas: int = 1,
    **spec,
) -> dict:
    """A Model served by the simulator with its bundled tokenizer, model name "tiny"."""
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "modelURI": f"file://{DEFAULT_MODEL}",
            "servedModelName": "tiny",
            "image": "infergate/simulator:dev",
            "engine": {"type": "vLLM", "args": list(engine_args)},
            "replicas": replicas,
            "backend": backend,
            **spec,
        },
    }


# A whole local cluster converges slowly: wait long, poll less often.
wait_for_cluster = functools.partial(wait_for_async, within=40.0, interval=0.1)


async def start_picker(
    log_dir: Path, pool_file: Path, pool: str = "tiny"
) -> tuple[asyncio.subprocess.Process, int, int]:
    """A picker reading the pool file, its debug pages on: the process, its metrics port
    (/debug/endpoints: what it believes of every pod) and its ext_proc port (plain gRPC)."""
    metrics_port, grpc_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "infergw.epp", "--provider", "file", "--pool-file", str(pool_file),
        "--pool-name", pool, "--secure-serving=false", "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--grpc-health-port", str(free_port()),
        "--metrics-port", str(metrics_port), "--enable-debug-endpoints",
        stdout=open(log_dir / "picker.log", "wb"),  # noqa: ASYNC230
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent(),  # api/lifetime.py: gone with pytest, however it ends
    )  # fmt: skip
    return proc, metrics_port, grpc_port
