"""The controllers as the install runs them, for tests against the API emulator: their
ServiceAccount and token, the RBAC gateway-manifests/controllers.yaml grants it, and a
stand-in for the kubelet."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from infergw.cluster.kube_store import KubeStore
from infergw.controllers.app import build_controllers
from infergw.controllers.download_logs import PodLogs
from infergw.controllers.runner import ControllerMetrics
from tests.controller_manifests import Authorizer, docs
from tests.kube_rbac import Account
from tests.kubeapi import KubeAPIEmulator

TOKEN = "infergate-controllers-token"
CONTROLLERS = Account("infergate-controllers", "infergate-system")


def manifest_rbac() -> Authorizer:
    account = next(d for d in docs() if d["kind"] == "ServiceAccount")["metadata"]
    return Authorizer.for_account(docs(), account["name"], account["namespace"])


def kubelet(api: KubeAPIEmulator, names: set[str]) -> None:
    """Mark the pods running and ready, as the kubelet would."""
    for name in names:
        pod = api.get("v1", "Pod", name)
        if pod is None or (pod.get("status") or {}).get("phase"):
            continue
        pod["status"] = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "engine", "restartCount": 0, "ready": True}],
        }
        api.put(pod)


@asynccontextmanager
async def running_controllers(*, read_logs: bool = False, **options) -> AsyncIterator[KubeStore]:
    """Kubernetes mode's controllers (`build_controllers(store, ..., **options)`) over the
    environment's API server, started, and stopped with their autoscaler and store after;
    `read_logs`: they read downloads' progress from pod logs, as the install's run."""
    store = KubeStore.from_environment()
    if read_logs:
        options["logs"] = PodLogs(store)
    controllers, scaler = build_controllers(store, ControllerMetrics(), **options)
    try:
        for c in controllers:
            await c.start()
        yield store
    finally:
        for c in controllers:
            await c.stop()
        await scaler.close()
        store.close()
