"""The controllers as the install runs them, for tests against the API emulator: their
ServiceAccount and token, the RBAC gateway-manifests/controllers.yaml grants it, and a
stand-in for the kubelet."""

from __future__ import annotations

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
