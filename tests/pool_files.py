"""Pool files for the file provider's tests: a pool, its pods, writing them, and the
provider's error counter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import yaml

from infergw.epp.datastore import Datastore
from infergw.epp.metrics import PickerMetrics
from infergw.epp.providers.file import FileProvider

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


@asynccontextmanager
async def watched_pool(tmp_path: Path) -> AsyncIterator[tuple[Path, Datastore, PickerMetrics]]:
    """A pool file with one pod, read by a running FileProvider that polls it often."""
    path = tmp_path / "pool.yaml"
    write(path, POOL, pod("a", "10.0.0.1"))
    ds, metrics = Datastore(), PickerMetrics()
    provider = FileProvider(ds, [path], "pool", poll_interval=0.02, metrics=metrics)
    await provider.start()
    try:
        yield path, ds, metrics
    finally:
        await provider.stop()


def only_the_first_pod(ds: Datastore) -> bool:
    return [e.address for e in ds.endpoints()] == ["10.0.0.1:8000"]
