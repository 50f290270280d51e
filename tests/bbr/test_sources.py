"""Where the router's table comes from: the API server (the emulator, tests/kubeapi.py), with
optional CRDs missing, and files, where a bad edit keeps the previous table."""

from __future__ import annotations

import random

import pytest
import yaml
from kubernetes import client

from infergw.bbr.metrics import RouterMetrics
from infergw.bbr.sources import FileSource, KubernetesSource, SourceError, Table
from infergw.epp.errors import PickerError
from tests.bbr.objects import model, route, two_models
from tests.kubeapi import KubeAPIEmulator
from tests.waiting import wait_for_async


def pool_of(table: Table, name: str) -> str | None:
    choice = table.current.choose(name, {}, "/v1/chat/completions", random.Random(0))
    return choice.pool if choice else None


@pytest.fixture
async def kube():
    async with KubeAPIEmulator() as api:
        yield api


async def test_the_api_servers_objects_build_the_table_and_changes_follow(kube):
    for obj in two_models():
        kube.put(obj)
    api_client = client.ApiClient(kube.client_configuration())
    table = Table("default", RouterMetrics())
    source = KubernetesSource(table, api_client=api_client)
    await source.start()
    try:
        assert pool_of(table, "chat-sql") == "chat" and pool_of(table, "code-3b") == "code"
        kube.put(route("coder", "coder", [{"modelServerName": "code"}]))
        await wait_for_async(lambda: pool_of(table, "coder") == "code", within=2.0)
        kube.put(model("late", "late-1b"))  # a Model whose route is not there yet
        assert pool_of(table, "late-1b") is None  # its pool is not either
        kube.delete("inference.networking.k8s.io/v1", "InferencePool", "code")
        await wait_for_async(lambda: "code" not in table.current.pools, within=2.0)
        with pytest.raises(PickerError) as info:  # its route is there, its pool gone
            pool_of(table, "code-3b")
        assert info.value.status == 503
    finally:
        await source.stop()
        api_client.close()


async def test_no_api_server_is_a_source_error():
    api_client = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
    with pytest.raises(SourceError):
        await KubernetesSource(Table("default", RouterMetrics()), api_client=api_client).start()
    api_client.close()


async def test_files_load_and_a_bad_edit_keeps_the_previous_table(tmp_path):
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump_all(two_models()))
    metrics = RouterMetrics()
    table = Table("default", metrics)
    source = FileSource(table, [path], poll_interval=0.05)
    await source.start()
    try:
        assert pool_of(table, "chat-7b") == "chat"
        path.write_text("kind: [unclosed")
        await wait_for_async(
            lambda: metrics.source_errors.labels("invalid")._value.get() >= 1, within=2.0
        )
        assert pool_of(table, "chat-7b") == "chat"
        path.write_text(yaml.safe_dump_all([o for o in two_models() if "code" in str(o)]))
        await wait_for_async(lambda: pool_of(table, "chat-7b") is None, within=2.0)
    finally:
        await source.stop()


async def test_unusable_files_at_start_are_a_source_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("- just a list")
    with pytest.raises(SourceError):
        await FileSource(Table("default", RouterMetrics()), [tmp_path]).start()
