"""For end-to-end tests of standalone mode: a simulator Model and a wait that fails with what
it was waiting for."""

from __future__ import annotations

import functools

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
