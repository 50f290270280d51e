"""An InferencePool and its pods as the Kubernetes API serves them, for provider tests."""

from __future__ import annotations

POOL_API = "inference.networking.k8s.io/v1"
LABELS = {"app": "vllm-llama"}


def pool(ports=(8000,), selector=None, name="llama") -> dict:
    return {
        "apiVersion": POOL_API,
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": dict(selector or LABELS)},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "llama-epp"},
        },
    }


def pod(name: str, ip: str, *, ready: bool = True, labels=None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": dict(labels or LABELS)},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
