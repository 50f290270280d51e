"""Per-model metric series are bounded: model names come from clients, and while the pods'
model lists are unknown every name is routed and counted. Through the real Director, with a
real Datastore, SchedulingConfig and PickerMetrics."""

from __future__ import annotations

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore, PoolSpec
from infergw.epp.director import Director, DirectorOptions
from infergw.epp.metrics import MAX_MODEL_SERIES, MAX_UNLISTED_MODELS, OTHER_MODEL, PickerMetrics
from infergw.epp.request import parse_request
from infergw.epp.scheduling.config import load_config
from infergw.epp.scheduling.framework import ResponseInfo


def director() -> Director:
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [8000]))
    ready = [{"type": "Ready", "status": "True"}]
    ds.replace_pods(
        [
            {
                "metadata": {"name": "a", "labels": {"app": "vllm"}},
                "status": {"podIP": "10.0.0.1", "conditions": ready},
            }
        ]
    )
    metrics = PickerMetrics()
    metrics.model_labels.known = ds.serves_model
    return Director(ds, load_config(None), metrics, DirectorOptions())


def context(model: str) -> RequestContext:
    body = f'{{"model": "{model}", "prompt": "hi", "max_tokens": 4}}'.encode()
    return RequestContext(parse_request("/v1/completions", body, {}, max_body_bytes=1 << 20))


def series(d: Director) -> dict[str, set[str]]:
    """model_name values by metric family."""
    out: dict[str, set[str]] = {}
    for family in d.metrics.registry.collect():
        for s in family.samples:
            if "model_name" in s.labels:
                out.setdefault(family.name, set()).add(s.labels["model_name"])
    return out


async def serve(d: Director, model: str, *, finish: bool = True):
    ctx = context(model)
    await d.handle(ctx)
    if finish:
        d.finish(ctx, ResponseInfo(endpoint=None, status=200, prompt_tokens=2), 0.0)
    return ctx


async def test_unknown_model_names_share_one_series_past_the_bound():
    d = director()
    (ep,) = d.datastore.endpoints()
    assert ep.models is None  # the pod's model list is not known: every name is routed
    for i in range(5 * MAX_UNLISTED_MODELS):
        await serve(d, f"junk-{i}")
    for family, names in series(d).items():
        assert len(names) <= MAX_UNLISTED_MODELS + 1, family
    assert OTHER_MODEL in series(d)["inference_objective_request"]
    overflow = d.metrics.registry.get_sample_value("infergate_epp_model_label_overflow_total")
    assert overflow and overflow > 0


async def test_a_served_model_keeps_its_own_series_after_the_bound():
    d = director()
    for i in range(MAX_UNLISTED_MODELS + 10):
        await serve(d, f"junk-{i}")
    (ep,) = d.datastore.endpoints()
    ep.models = frozenset({"llama"})
    await serve(d, "llama")
    assert "llama" in series(d)["inference_objective_request"]


async def test_the_running_gauge_comes_back_to_zero_when_a_name_gets_its_series_midway():
    """Counted under OTHER when it started, the request leaves OTHER when it ends, though
    its model is served (and has its own series) by then."""
    d = director()
    for i in range(MAX_UNLISTED_MODELS):
        await serve(d, f"junk-{i}")
    ctx = await serve(d, "late", finish=False)
    (ep,) = d.datastore.endpoints()
    ep.models = frozenset({"late"})
    d.finish(ctx, ResponseInfo(endpoint=None, status=200), 0.0)
    get = d.metrics.registry.get_sample_value
    name = "inference_objective_running_requests"
    assert get(name, {"model_name": OTHER_MODEL}) == 0
    assert (get(name, {"model_name": "late"}) or 0) == 0


async def test_served_names_are_bounded_too():
    """A pod lists what it likes in /v1/models (and LoRA loads change the list over time):
    names it serves got a series each, without end. Past MAX_MODEL_SERIES names of any
    kind, new ones share OTHER_MODEL."""
    d = director()
    d.metrics.model_labels.known = lambda _name: True  # a pod that serves every name
    label = d.metrics.model_labels
    labels = [label(f"lora-{i}") for i in range(MAX_MODEL_SERIES)]
    assert labels[-1] == f"lora-{MAX_MODEL_SERIES - 1}"
    assert label("one-more") == OTHER_MODEL
    assert label("lora-0") == "lora-0"  # a name that has its series keeps it
    overflow = d.metrics.registry.get_sample_value("infergate_epp_model_label_overflow_total")
    assert overflow == 1
