"""A Model with a real engine and its rendered pod templates, for the controllers' rendering
tests (weights, adapters)."""

from __future__ import annotations

from infergw import api
from infergw.api import Model
from infergw.api.workload import ModelInfer
from infergw.controllers import model_objects
from infergw.controllers.weights import WeightsLayout

SECRET_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


def model(uri: str, engine: str = "vLLM", image: str = "vllm/vllm-openai", **spec) -> Model:
    return api.from_dict_as(
        Model,
        {
            "apiVersion": "workload.infergate.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "llama", "namespace": "team"},
            "spec": {
                "modelURI": uri,
                "image": image,
                "engine": {"type": engine},
                "backend": {"aggregated": {"workerReplicas": 1}},
                "env": [SECRET_TOKEN, {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
                **spec,
            },
        },
    )


def templates(m: Model, layout: WeightsLayout | None = None) -> tuple[ModelInfer, dict, dict]:
    mi = model_objects.modelinfer(m, weights=layout or WeightsLayout.cluster())
    role = api.to_dict(mi)["spec"]["template"]["roles"][0]
    return mi, role["entryTemplate"]["spec"], role["workerTemplate"]["spec"]
