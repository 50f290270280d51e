"""How `infergate up` follows its pods: the pool's pods from the controllers' pool file, a
line per pod as its state changes, and a pod whose engine is not installed."""

from __future__ import annotations

import yaml

from infergw.stack.pods import PodView, StartReport, pool_pods


def pod(name: str, labels: dict, status: dict | None = None, **meta) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels, **meta},
        "spec": {},
        "status": status or {},
    }


POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "m", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"infergate.io/model": "m"}}},
}
RUNNING = {
    "phase": "Running",
    "podIP": "127.0.0.2",
    "conditions": [{"type": "Ready", "status": "False"}],
}
READY = {**RUNNING, "conditions": [{"type": "Ready", "status": "True"}]}
NOT_INSTALLED = {
    "phase": "Pending",
    "podIP": "127.0.0.3",
    "containerStatuses": [
        {
            "name": "engine",
            "restartCount": 0,
            "state": {"waiting": {"reason": "EngineNotInstalled", "message": "vllm is missing"}},
        }
    ],
}


def test_the_pools_pods_are_every_pod_it_selects_but_those_going(tmp_path):
    mine = {"infergate.io/model": "m", "infergate.io/role": "decode"}
    docs = [
        POOL,
        pod("b", mine, READY),
        pod("a", mine, RUNNING),
        pod("other", {"infergate.io/model": "x"}, READY),
        pod("leaving", mine, READY, deletionTimestamp="2030-01-01T00:00:00Z"),
        {
            **pod("elsewhere", mine, READY),
            "metadata": {"name": "e", "namespace": "ns", "labels": mine},
        },
    ]
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert [p.name for p in pool_pods(path, "m")] == ["a", "b"]
    assert [p.ready for p in pool_pods(path, "m")] == [False, True]
    assert pool_pods(path, "nope") == []
    assert pool_pods(tmp_path / "missing.yaml", "m") == []
    path.write_text("{{{ not yaml")
    assert pool_pods(path, "m") == []


def test_a_line_per_pod_when_its_state_changes_and_a_summary_while_it_is_slow():
    report = StartReport(every=15)
    starting = PodView.of(pod("a", {}, RUNNING))
    assert report.lines([starting], 1.0) == [
        "  pod a on 127.0.0.2: running, not ready yet (loading the model?) (1 s)"
    ]
    assert report.lines([starting], 5.0) == []  # nothing new
    assert report.lines([starting], 16.0) == ["  still starting after 16 s: 1 of 1 pods (a)"]
    assert report.lines([starting], 20.0) == []
    ready = PodView.of(pod("a", {}, READY))
    assert report.lines([ready], 87.0) == ["  pod a on 127.0.0.2: ready (87 s)"]
    assert report.lines([ready], 200.0) == []  # all ready: nothing more to say


def test_an_engine_that_is_not_installed_is_read_from_the_pod():
    view = PodView.of(pod("a", {}, NOT_INSTALLED))
    assert view.not_installed and view.message == "vllm is missing"
    assert view.state() == "waiting (EngineNotInstalled)"
    assert not PodView.of(pod("b", {}, RUNNING)).not_installed
    assert PodView.of(pod("c", {})).state() == "pending"
