"""The Kubernetes provider against the in-process API emulator (tests/kubeapi.py).

Pod IPs are fake (10.0.0.x): the provider only computes endpoints, nothing connects to them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from kubernetes import client

from infergw.api.upstream import LEGACY_OBJECTIVE_GROUP_VERSION, OBJECTIVE_GROUP_VERSION
from infergw.epp.datastore import Datastore
from infergw.epp.metrics import PickerMetrics
from infergw.epp.providers import KubernetesProviderError
from infergw.epp.providers.kubernetes import KubernetesProvider
from tests.conftest import free_port
from tests.kube_objects import POOL_API, pod, pool
from tests.kubeapi import KubeAPIEmulator
from tests.waiting import wait_for_async

# pool, pods, ModelRoutes, ModelServers, InferenceObjectives of llm-d.ai and of the older
# inference.networking.x-k8s.io (the emulator serves them all)
WATCHES = 6


def addresses(ds: Datastore) -> set[str]:
    return {e.address for e in ds.endpoints()}


@pytest.fixture
async def kube():
    async with KubeAPIEmulator() as api:
        yield api


@pytest.fixture
async def started(kube):
    """started() -> (datastore, provider), stopped at the end of the test."""
    providers: list[KubernetesProvider] = []
    api_client = client.ApiClient(kube.client_configuration())

    async def start(
        pool_name: str = "llama", watch_timeout: int = 5, resync: float = 300
    ) -> tuple[Datastore, KubernetesProvider]:
        ds = Datastore()
        provider = KubernetesProvider(
            ds,
            pool_name,
            "default",
            api_client=api_client,
            resync_timeout=resync,
            metrics=PickerMetrics(),
        )
        provider.watch_timeout = watch_timeout
        await provider.start()
        providers.append(provider)
        return ds, provider

    yield start
    for provider in providers:
        await provider.stop()
    api_client.close()


@pytest.fixture
async def two_pods(kube, started):
    kube.put(pool())
    kube.put(pod("llama-0", "10.0.0.1"))
    kube.put(pod("llama-1", "10.0.0.2"))
    ds, _ = await started()
    return ds


async def test_start_lists_the_pool_and_ready_pods(two_pods):
    assert two_pods.synced
    assert two_pods.pool.target_ports == [8000]
    assert addresses(two_pods) == {"10.0.0.1:8000", "10.0.0.2:8000"}


async def test_a_new_ready_pod_becomes_an_endpoint(kube, two_pods):
    kube.put(pod("llama-2", "10.0.0.3"))
    await wait_for_async(lambda: "10.0.0.3:8000" in addresses(two_pods), within=1.0)
    assert len(two_pods.endpoints()) == 3


async def test_not_ready_and_deleted_pods_are_removed(kube, two_pods):
    kube.put(pod("llama-0", "10.0.0.1", ready=False))
    await wait_for_async(lambda: addresses(two_pods) == {"10.0.0.2:8000"}, within=1.0)
    kube.delete("v1", "Pod", "llama-1")
    await wait_for_async(lambda: addresses(two_pods) == set(), within=1.0)


async def test_pods_with_other_labels_are_ignored(kube, two_pods):
    kube.put(pod("other", "10.0.0.9", labels={"app": "something-else"}))
    kube.put(pod("llama-2", "10.0.0.3"))
    await wait_for_async(lambda: "10.0.0.3:8000" in addresses(two_pods), within=1.0)
    assert "10.0.0.9:8000" not in addresses(two_pods)
    # Relabelled away from the selector: the filtered watch reports it as deleted.
    kube.put(pod("llama-0", "10.0.0.1", labels={"app": "something-else"}))
    await wait_for_async(
        lambda: addresses(two_pods) == {"10.0.0.2:8000", "10.0.0.3:8000"}, within=1.0
    )


async def test_target_ports_and_selector_changes_are_followed(kube, two_pods):
    kube.put(pool(ports=(8000, 8001)))
    await wait_for_async(lambda: len(two_pods.endpoints()) == 4, within=1.0)
    assert "10.0.0.2:8001" in addresses(two_pods)
    # A new selector means a new server-side filter: the provider re-lists pods.
    kube.put(pod("blue-0", "10.0.1.1", labels={"app": "blue"}))
    kube.put(pool(ports=(9000,), selector={"app": "blue"}))
    await wait_for_async(lambda: addresses(two_pods) == {"10.0.1.1:9000"}, within=1.0)


async def test_pool_deleted_then_recreated(kube, two_pods):
    kube.delete(POOL_API, "InferencePool", "llama")
    await wait_for_async(lambda: two_pods.pool is None and not two_pods.endpoints(), within=1.0)
    kube.put(pool())
    await wait_for_async(lambda: len(two_pods.endpoints()) == 2, within=1.0)


async def test_expired_history_relists_and_converges(kube, two_pods, caplog):
    caplog.set_level(logging.INFO, logger="epp.providers.kubernetes")
    await wait_for_async(lambda: kube.open_watches == WATCHES, within=1.0)
    kube.expire_history()  # open watches get 410 Gone
    kube.put(pod("llama-2", "10.0.0.3"))  # made while the provider's watches are expired
    kube.delete("v1", "Pod", "llama-0")
    await wait_for_async(
        lambda: addresses(two_pods) == {"10.0.0.2:8000", "10.0.0.3:8000"}, within=2.0
    )
    await wait_for_async(
        lambda: "re-listed pods" in caplog.text, within=1.0
    )  # logged by the thread after posting
    assert "410 Gone" in caplog.text
    kube.put(pod("llama-3", "10.0.0.4"))  # and it watches again afterwards
    await wait_for_async(lambda: "10.0.0.4:8000" in addresses(two_pods), within=2.0)


async def test_watches_that_time_out_resume_without_relisting(kube, started, caplog):
    caplog.set_level(logging.INFO, logger="epp.providers.kubernetes")
    kube.put(pool())
    ds, _ = await started(watch_timeout=1)
    await asyncio.sleep(1.5)  # both watches ended (with a bookmark) and were reopened
    await wait_for_async(lambda: kube.open_watches == WATCHES, within=1.0)
    kube.put(pod("llama-0", "10.0.0.1"))
    await wait_for_async(lambda: addresses(ds) == {"10.0.0.1:8000"}, within=1.0)
    assert "re-list" not in caplog.text and "WARNING" not in caplog.text


async def test_periodic_resync_relists(kube, started, caplog):
    caplog.set_level(logging.INFO, logger="epp.providers.kubernetes")
    kube.put(pool())
    ds, _ = await started(watch_timeout=1, resync=0.5)
    await wait_for_async(lambda: "re-listed pods" in caplog.text, within=2.5)
    kube.put(pod("llama-0", "10.0.0.1"))
    await wait_for_async(lambda: addresses(ds) == {"10.0.0.1:8000"}, within=1.0)


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("watch ") and t.is_alive()]


def skipped(provider: KubernetesProvider, kind: str) -> float:
    value = provider.metrics.registry.get_sample_value(
        "infergate_epp_kubernetes_objects_skipped_total", {"kind": kind}
    )
    return value or 0.0


async def test_malformed_objects_are_skipped(kube, started, caplog):
    kube.put(pool())
    kube.put(pod("llama-0", "10.0.0.1"))
    kube.put(pod("llama-1", "10.0.0.2"))
    two_pods, provider = await started()
    bad = pod("broken", "10.0.0.7")
    bad["status"]["conditions"] = ["Ready"]
    kube.put(bad)
    bad_pool = pool()
    bad_pool["spec"]["targetPorts"] = [{"number": "eighty"}]
    kube.put(bad_pool)
    kube.put(pod("llama-2", "10.0.0.3"))
    await wait_for_async(lambda: "10.0.0.3:8000" in addresses(two_pods), within=1.0)
    await wait_for_async(lambda: "InferencePool llama is invalid" in caplog.text, within=1.0)
    assert "skipping Pod broken (ADDED): Expected `object`, got `str` - at " in caplog.text
    assert "$.status.conditions[0]" in caplog.text
    assert two_pods.pool.target_ports == [8000]  # the previous, valid pool stays
    assert "10.0.0.7:8000" not in addresses(two_pods)
    assert skipped(provider, "Pod") >= 1 and skipped(provider, "InferencePool") >= 1


async def test_stop_is_prompt(kube, started):
    kube.put(pool())
    _, provider = await started()
    await wait_for_async(lambda: kube.open_watches == WATCHES, within=1.0)
    began = time.monotonic()
    await provider.stop()
    assert time.monotonic() - began < 2.0
    # every watch's stream was shut down: its thread ends (the server notices later)
    await wait_for_async(lambda: not watch_threads(), within=2.0)


async def test_missing_pool_fails_start(kube, started):
    kube.put(pool(name="another"))
    with pytest.raises(KubernetesProviderError, match="default/llama not found"):
        await started()


async def test_malformed_pods_in_the_first_list_are_skipped(kube, started, caplog):
    kube.put(pool())
    bad = pod("broken", "10.0.0.7")
    bad["metadata"]["labels"]["replicas"] = 3  # not a string
    kube.put(bad)
    kube.put(pod("llama-0", "10.0.0.1"))
    ds, provider = await started()
    assert addresses(ds) == {"10.0.0.1:8000"}
    assert "skipping Pod broken (listed): Expected `str`, got `int` - at `$.metadata.lab" in (
        caplog.text
    )
    assert skipped(provider, "Pod") == 1


async def test_unreachable_api_fails_start():
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with client.ApiClient(cfg) as api_client:
        provider = KubernetesProvider(Datastore(), "llama", "default", api_client=api_client)
        with pytest.raises(KubernetesProviderError, match="InferencePool default/llama"):
            await provider.start()


async def test_kubeconfig_is_used_without_an_api_client(kube, tmp_path, monkeypatch):
    kubeconfig = kube.write_kubeconfig(tmp_path / "config")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    kube.put(pool())
    kube.put(pod("llama-0", "10.0.0.1"))
    ds = Datastore()
    provider = KubernetesProvider(ds, "llama", "default")
    await provider.start()
    try:
        assert addresses(ds) == {"10.0.0.1:8000"}
    finally:
        await provider.stop()
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubernetesProviderError, match="no Kubernetes client config"):
        await KubernetesProvider(Datastore(), "llama", "default").start()


class NoRoutingRights(KubeAPIEmulator):
    """An API server whose Role for the picker predates model routing: 403 on those kinds."""

    async def _handle(self, request):
        from aiohttp import web

        from tests.kubeapi import status_object

        if request.match_info.get("plural") in ("modelroutes", "modelservers"):
            return web.json_response(status_object(403, "Forbidden", "no"), status=403)
        return await super()._handle(request)


async def test_a_role_without_routing_rights_still_serves_the_pool(caplog):
    caplog.set_level(logging.WARNING, logger="epp.providers.kubernetes")
    async with NoRoutingRights() as api:
        api.put(pool())
        api.put(pod("llama-0", "10.0.0.1"))
        api_client = client.ApiClient(api.client_configuration())
        ds = Datastore()
        provider = KubernetesProvider(ds, "llama", "default", api_client=api_client)
        try:
            await provider.start()
            assert addresses(ds) == {"10.0.0.1:8000"} and len(ds.routes) == 0
            assert "not allowed to list routes (403)" in caplog.text
        finally:
            await provider.stop()
            api_client.close()


# ---- InferenceObjectives: llm-d.ai and the Inference Extension's older group ------------------

CURRENT, LEGACY = OBJECTIVE_GROUP_VERSION, LEGACY_OBJECTIVE_GROUP_VERSION


def objective(name: str, priority: int, api_version: str = CURRENT) -> dict:
    return {
        "apiVersion": api_version,
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"priority": priority, "poolRef": {"name": "llama"}},
    }


class WithoutCRDs(KubeAPIEmulator):
    """An API server without the CRDs of some groups: 404 there, as for a CRD not installed."""

    def __init__(self, *missing_groups: str) -> None:
        super().__init__()
        self.missing_groups = missing_groups

    async def _handle(self, request):
        from aiohttp import web

        from tests.kubeapi import status_object

        if request.match_info.get("group") in self.missing_groups:
            status = status_object(404, "NotFound", "the server could not find the resource")
            return web.json_response(status, status=404)
        return await super()._handle(request)


async def test_objectives_of_both_groups_are_read_and_llm_d_wins_a_name(kube, started):
    kube.put(pool())
    kube.put(objective("interactive", 10))
    kube.put(objective("batch", -1, LEGACY))
    kube.put(objective("shared", 1, LEGACY))
    kube.put(objective("shared", 5))
    ds, _ = await started()
    assert ds.objectives == {"interactive": 10, "batch": -1, "shared": 5}
    # Both groups are watched: a change in either arrives.
    kube.put(objective("late", 3, LEGACY))
    kube.delete(CURRENT, "InferenceObjective", "shared")
    await wait_for_async(lambda: ds.objectives.get("late") == 3, within=2.0)
    await wait_for_async(lambda: ds.objectives.get("shared") == 1, within=2.0)


@pytest.mark.parametrize(
    ("missing", "present"),
    [("llm-d.ai", LEGACY), ("inference.networking.x-k8s.io", CURRENT)],
)
async def test_objectives_come_from_whichever_crd_the_cluster_has(missing, present, caplog):
    caplog.set_level(logging.INFO, logger="epp.providers.kubernetes")
    async with WithoutCRDs(missing) as api:
        api.put(pool())
        api.put(pod("llama-0", "10.0.0.1"))
        api.put(objective("batch", -1, present))
        api_client = client.ApiClient(api.client_configuration())
        ds = Datastore()
        provider = KubernetesProvider(ds, "llama", "default", api_client=api_client)
        try:
            await provider.start()
            assert addresses(ds) == {"10.0.0.1:8000"}
            assert ds.objectives == {"batch": -1}
            which = "objectives" if missing == "llm-d.ai" else "legacy objectives"
            assert f"no {which} CRD in the cluster" in caplog.text
            api.put(objective("interactive", 10, present))
            await wait_for_async(lambda: ds.objectives.get("interactive") == 10, within=2.0)
        finally:
            await provider.stop()
            api_client.close()
