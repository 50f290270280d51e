"""For end-to-end tests of standalone mode: a simulator Model and a wait that fails with what
it was waiting for."""

from __future__ import annotations

import asyncio
import time

from tests.paths import DEFAULT_MODEL


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


async def wait_for(check, what: str, within: float = 40.0):
    """Await `check()` until it returns something truthy, and return that."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
