"""Standalone mode's apply: valid documents become objects, invalid ones are reported with
their file and reason and skipped, edits update, removed documents delete; and the exporter
writes what the picker's file provider reads."""

from __future__ import annotations

import copy

import yaml

from infergw.api import ALLOW_PRIVILEGED_LABEL
from infergw.cluster.files import load_objects
from infergw.cluster.store import (
    AUTOSCALING_POLICY,
    INFERENCE_OBJECTIVE,
    INFERENCE_POOL,
    MODEL,
    MODEL_INFER,
    POD,
)
from infergw.controllers.exporter import PoolExporter
from infergw.controllers.manifests import ManifestDirectory
from infergw.controllers.memory_store import MemoryStore
from tests.paths import CRD_EXAMPLES


def policy() -> dict:
    return yaml.safe_load((CRD_EXAMPLES / "autoscalingpolicy.yaml").read_text())


async def test_apply_update_reject_and_delete(tmp_path):
    store = MemoryStore()
    good = policy()
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "broken"
    bad["spec"]["tolerancePercent"] = -5
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([good, bad]))
    (tmp_path / "junk.yaml").write_text("kind: [unclosed")
    # what the controllers write for a Model in a cluster: nothing standalone mode runs
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute"}
    (tmp_path / "route.yaml").write_text(yaml.safe_dump({**route, "metadata": {"name": "r"}}))
    md = ManifestDirectory(store, tmp_path)
    await md.apply_once()
    assert any("'HTTPRoute' is not one standalone mode runs" in p for p in md.problems)
    assert await store.get(AUTOSCALING_POLICY, "default", "llama-3-8b-load") is not None
    assert await store.get(AUTOSCALING_POLICY, "default", "broken") is None
    assert any("a.yaml#1" in p and "tolerancePercent" in p for p in md.problems)
    assert any("junk.yaml" in p and "not readable YAML" in p for p in md.problems)
    good["spec"]["tolerancePercent"] = 20
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(good))
    await md.apply_once()
    obj = await store.get(AUTOSCALING_POLICY, "default", "llama-3-8b-load")
    assert obj["spec"]["tolerancePercent"] == 20 and obj["metadata"]["generation"] == 2
    (tmp_path / "a.yaml").unlink()
    await md.apply_once()
    assert await store.get(AUTOSCALING_POLICY, "default", "llama-3-8b-load") is None
    assert (await store.list(MODEL))[0] == []


async def test_the_exported_file_is_what_the_picker_reads(tmp_path):
    store = MemoryStore()
    await store.create(
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"infergate.io/model": "tiny"}},
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": "tiny-epp", "port": {"number": 9002}},
            },
        }
    )
    pod = await store.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "p",
                "namespace": "default",
                "labels": {"infergate.io/model": "tiny"},
            },
            "spec": {"containers": [{"name": "e"}]},
        }
    )
    pod["status"] = {"podIP": "127.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}
    await store.update_status(pod)
    out = tmp_path / "pool.yaml"
    exporter = PoolExporter(store, out)
    assert await exporter.write_once() is True
    assert await exporter.write_once() is False  # unchanged: not rewritten
    objs = load_objects([out])
    assert {o["kind"] for o in objs} == {"InferencePool", "Pod"}
    assert next(o for o in objs if o["kind"] == "Pod")["status"]["podIP"] == "127.0.0.9"
    await store.delete(POD, "default", "p")
    assert await exporter.write_once() is True
    assert [o["kind"] for o in load_objects([out])] == ["InferencePool"]
    await store.delete(INFERENCE_POOL, "default", "tiny")
    await exporter.write_once()
    assert out.read_text() == ""


async def test_inference_objectives_are_applied_and_exported_for_the_picker(tmp_path):
    objective = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": "interactive"},
        "spec": {"priority": 10, "poolRef": {"name": "tiny"}},
    }
    broken = copy.deepcopy(objective)
    broken["metadata"]["name"] = "broken"
    broken["spec"]["priority"] = "high"
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "objectives.yaml").write_text(yaml.safe_dump_all([objective, broken]))
    store = MemoryStore()
    md = ManifestDirectory(store, manifests)
    await md.apply_once()
    assert any("broken" in p for p in md.problems)
    assert await store.get(INFERENCE_OBJECTIVE, "default", "interactive") is not None
    out = tmp_path / "pool.yaml"
    await PoolExporter(store, out).write_once()
    [exported] = [o for o in load_objects([out]) if o["kind"] == "InferenceObjective"]
    assert exported["spec"] == {"priority": 10, "poolRef": {"name": "tiny"}}
    assert exported["metadata"]["name"] == "interactive"


def _privileged_modelinfer(namespace: str) -> dict:
    mi = yaml.safe_load((CRD_EXAMPLES / "modelinfer.yaml").read_text())
    mi["metadata"]["namespace"] = namespace
    mi["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]["hostNetwork"] = True
    return mi


async def test_host_powers_need_a_namespace_document_that_opts_in(tmp_path):
    store = MemoryStore()
    opted_in = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "gpu", "labels": {ALLOW_PRIVILEGED_LABEL: "true"}},
    }
    docs = [_privileged_modelinfer("default"), _privileged_modelinfer("gpu"), opted_in]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all(docs))
    md = ManifestDirectory(store, tmp_path)
    await md.apply_once()
    assert await store.get(MODEL_INFER, "gpu", "llama-3-8b") is not None
    assert await store.get(MODEL_INFER, "default", "llama-3-8b") is None
    [problem] = md.problems
    assert problem.startswith(f"{tmp_path / 'a.yaml'}#0: ModelInfer llama-3-8b is invalid: ")
    assert (
        "hostNetwork: shares the node's network (allowed only in a namespace labelled " in problem
    )


async def test_a_pod_the_runtime_cannot_run_is_refused_and_nulls_are_dropped(tmp_path):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": "http"}]}]},
    }
    model_infer = yaml.safe_load((CRD_EXAMPLES / "modelinfer.yaml").read_text())
    model_infer["spec"]["replicas"] = None
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([pod, model_infer]))
    store = MemoryStore()
    md = ManifestDirectory(store, tmp_path)
    await md.apply_once()
    assert await store.get(POD, "default", "p") is None
    assert md.problems == [
        f"{tmp_path / 'a.yaml'}#0: Pod p is invalid: "
        "spec.containers[0].ports[0].containerPort: Expected `int`, got `str`"
    ]
    stored = await store.get(MODEL_INFER, "default", "llama-3-8b")
    assert "replicas" not in stored["spec"]


async def test_a_trailing_newline_is_no_part_of_a_name(tmp_path):
    """Python's `$` matches before a final newline, so "llama-3-8b-load\\n" passed as a DNS
    name (the API server's patterns, RE2, refuse it) and became pod and log file names."""
    good = policy()
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = good["metadata"]["name"] + "\n"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    md = ManifestDirectory(MemoryStore(), tmp_path)
    await md.apply_once()
    assert any("metadata.name" in p for p in md.problems), md.problems
