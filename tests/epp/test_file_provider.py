"""epp/providers/file.py on real files: a bad edit (wrong types, half-written YAML) keeps the
last good pool, is logged and counted, and the watch goes on so a later good edit applies."""

from __future__ import annotations

import pytest
import yaml

from infergw.api.upstream import LEGACY_OBJECTIVE_GROUP_VERSION, OBJECTIVE_GROUP_VERSION
from infergw.epp.datastore import Datastore
from infergw.epp.providers.file import FileProvider, FileProviderError
from tests.pool_files import POOL, errors, only_the_first_pod, pod, watched_pool, write
from tests.waiting import wait_for_async

BAD_EDITS = [
    pytest.param(lambda: [POOL, pod("a"), {**pod("b"), "metadata": [1]}], id="metadata-list"),
    pytest.param(lambda: [POOL, pod("a"), pod("b", ip=10)], id="podIP-int"),
    pytest.param(lambda: [POOL, pod("a"), pod("b", ip="pods.example.com")], id="podIP-host"),
    pytest.param(lambda: [POOL, pod("a"), pod("b", labels={"app": 1})], id="label-int"),
    pytest.param(lambda: [POOL, {**pod("b"), "status": "up"}], id="status-string"),
    pytest.param(lambda: [{**POOL, "spec": [1]}, pod("a")], id="pool-spec-list"),
    pytest.param(
        lambda: [{**POOL, "spec": {**POOL["spec"], "selector": [1]}}, pod("a")],
        id="pool-selector-list",
    ),
    pytest.param(
        lambda: [{**POOL, "spec": {**POOL["spec"], "endpointPickerRef": "x"}}, pod("a")],
        id="pool-ref-string",
    ),
    pytest.param(
        lambda: [POOL, pod("a"), {"apiVersion": "v1", "kind": "List", "items": 5}],
        id="list-items-int",
    ),
]


@pytest.mark.parametrize("bad", BAD_EDITS)
async def test_a_bad_edit_keeps_the_pool_and_a_later_good_edit_applies(tmp_path, bad):
    async with watched_pool(tmp_path) as (path, ds, metrics):
        assert only_the_first_pod(ds)
        write(path, *bad())
        await wait_for_async(lambda: errors(metrics, "invalid") == 1)
        assert only_the_first_pod(ds)
        assert ds.pool is not None and ds.pool.selector == {"app": "vllm"}
        write(path, POOL, pod("a", "10.0.0.1"), pod("c", "10.0.0.3"))
        await wait_for_async(lambda: len(ds.endpoints()) == 2)


async def test_a_half_written_file_and_a_binary_one_are_counted(tmp_path):
    async with watched_pool(tmp_path) as (path, ds, metrics):
        path.write_text(yaml.safe_dump_all([POOL, pod("a")])[:40])
        await wait_for_async(lambda: errors(metrics, "invalid") == 1)
        path.write_bytes(b"\xff\xfe\x00garbage")
        await wait_for_async(lambda: errors(metrics, "invalid") == 2)
        assert len(ds.endpoints()) == 1
        write(path, POOL, pod("a"), pod("b", "10.0.0.2"))
        await wait_for_async(lambda: len(ds.endpoints()) == 2)


def test_a_bad_file_at_start_is_an_error_naming_the_object(tmp_path):
    path = tmp_path / "pool.yaml"
    write(path, POOL, pod("b", ip=10))
    with pytest.raises(FileProviderError, match=r"podIP"):
        FileProvider(Datastore(), [path], "pool").load()


def test_a_file_replaced_within_one_clock_tick_at_the_same_size_is_read_again(tmp_path):
    """The controllers replace the pool file by rename, sometimes twice within one tick of the
    filesystem's clock: a pod becoming ready can leave mtime and size as they were."""
    import os

    path = tmp_path / "pool.yaml"
    write(path, POOL, pod("a", "10.0.0.1"))
    ds = Datastore()
    provider = FileProvider(ds, [path], "pool", poll_interval=3600)
    provider.load()
    assert only_the_first_pod(ds)
    before = path.stat()
    tmp = tmp_path / "pool.yaml.tmp"
    write(tmp, POOL, pod("a", "10.0.0.2"))  # the same length, another pod address
    os.replace(tmp, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same clock tick
    assert path.stat().st_size == before.st_size
    provider.refresh()
    assert [e.address for e in ds.endpoints()] == ["10.0.0.2:8000"]


def _objective(name: str, priority: int, api_version: str) -> dict:
    return {
        "apiVersion": api_version,
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"priority": priority, "poolRef": {"name": POOL["metadata"]["name"]}},
    }


def test_objectives_of_both_groups_are_read_and_llm_d_wins_a_name(tmp_path, caplog):
    """llm-d.ai/v1alpha2 (written first so that order alone would let the older one win) and
    the Inference Extension's older group; any other apiVersion is left out with a warning."""
    path = tmp_path / "pool.yaml"
    write(
        path,
        POOL,
        pod("a", "10.0.0.1"),
        _objective("shared", 5, OBJECTIVE_GROUP_VERSION),
        _objective("shared", 1, LEGACY_OBJECTIVE_GROUP_VERSION),
        _objective("interactive", 10, OBJECTIVE_GROUP_VERSION),
        _objective("batch", -1, LEGACY_OBJECTIVE_GROUP_VERSION),
        _objective("typo", 7, "inference.networking.x-k8s.io/v1alpha1"),
    )
    ds = Datastore()
    FileProvider(ds, [path], POOL["metadata"]["name"]).load()
    assert ds.objectives == {"shared": 5, "interactive": 10, "batch": -1}
    assert "ignoring InferenceObjective typo" in caplog.text
