"""Two Models as the controllers expand them (InferencePool, ModelServer, ModelRoute), plus
hand-written routes: the objects the router's table is built from in these tests."""

from __future__ import annotations

from infergw.api import from_dict, prune_nulls, to_dict
from infergw.controllers.model_objects import inferencepool, modelroute, modelserver


def model(name: str, served: str, adapters: tuple[str, ...] = (), stamp: str = "") -> dict:
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": stamp or None},
        "spec": {
            "modelURI": "file://simulator/default_model",
            "image": "infergate/simulator:dev",
            "servedModelName": served,
            "engine": {"type": "Simulator"},
            "loraAdapters": [{"name": a, "artifactURL": f"file:///lora/{a}"} for a in adapters]
            or None,
            "backend": {"aggregated": {"replicas": 1}},
        },
    }


def expanded(obj: dict) -> list[dict]:
    """What the controllers make of a Model: its pool, server and route."""
    typed = from_dict(prune_nulls(obj))
    return [to_dict(make(typed)) for make in (inferencepool, modelserver, modelroute)]


def route(name: str, model_name: str, targets: list[dict], rules: list[dict] | None = None):
    return {
        "apiVersion": "networking.infergate.io/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"modelName": model_name, "rules": rules or [{"targetModels": targets}]},
    }


def two_models() -> list[dict]:
    """Model `chat` (served as chat-7b, adapter chat-sql) and Model `code` (code-3b)."""
    return [
        *expanded(model("chat", "chat-7b", ("chat-sql",))),
        *expanded(model("code", "code-3b")),
    ]
