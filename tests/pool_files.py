"""Pool files for the file provider's tests: a pool, its pods, writing them, and the
provider's error counter."""

from __future__ import annotations

from pathlib import Path

import yaml

from epp.metrics import PickerMetrics

POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "pool", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}]},
}


def pod(name: str, ip: object = "10.0.0.1", **meta: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "vllm"}, **meta},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def write(path: Path, *objects: dict) -> None:
    path.write_text(yaml.safe_dump_all(objects))


def errors(metrics: PickerMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "infergate_epp_pool_file_errors_total", {"reason": reason}
    )
    return value or 0.0
