"""The picker process with --provider kubernetes, against the in-process API emulator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest
import requests
import yaml

from tests import extproc_client as ec
from tests.conftest import free_port, running, simulators
from tests.kube_objects import pod, pool
from tests.kubeapi import KubeAPIEmulator
from tests.picker_fixtures import FAST_SIMULATOR, picker_cmd

pytestmark = pytest.mark.slow


def kubeconfig(url: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": url}}],
            "users": [{"name": "emu", "user": {"token": "unused"}}],
            "contexts": [
                {
                    "name": "emu",
                    "context": {"cluster": "emu", "user": "emu", "namespace": "default"},
                }
            ],
        }
    )


async def test_picker_follows_the_cluster(tmp_path):
    with simulators(2, *FAST_SIMULATOR) as sim_ports, KubeAPIEmulator().threaded() as api:
        api.put(pool(ports=sim_ports))
        api.put(pod("sim-a", "127.0.0.1"))
        cfg = tmp_path / "kubeconfig"
        cfg.write_text(kubeconfig(api.url))
        grpc_port, metrics_port = free_port(), free_port()
        cmd = picker_cmd(
            grpc_port,
            metrics_port,
            "--provider",
            "kubernetes",
            "--pool-name",
            "llama",
            "--secure-serving=false",
            "--enable-debug-endpoints",
            # An empty pool answers 503 at once: holding the request for a pod to come
            # (scale from zero, tested in tests/e2e/test_scale_from_zero.py) took a minute here.
            "--capacity-wait-ttl",
            "0",
        )
        with running(
            cmd,
            ready_url=f"http://127.0.0.1:{metrics_port}/healthz",
            env={"KUBECONFIG": str(cfg)},
        ):
            debug = f"http://127.0.0.1:{metrics_port}/debug/endpoints"
            want = {f"127.0.0.1:{p}" for p in sim_ports}
            assert {
                e["address"] for e in requests.get(debug, timeout=5).json()["endpoints"]
            } == want
            body = {"model": "infergate-sim", "prompt": "hi", "max_tokens": 1}
            out = await ec.exchange(f"127.0.0.1:{grpc_port}", [ec.headers(), ec.body(body)])
            dest = ec.set_headers(out[0])["x-gateway-destination-endpoint"]
            assert set(dest.split(",")) == want
            # the pod goes away in the cluster: the picker's pool empties
            api.delete("v1", "Pod", "sim-a")
            deadline = time.monotonic() + 10
            while requests.get(debug, timeout=5).json()["endpoints"]:
                assert time.monotonic() < deadline, "the deleted pod stayed in the pool"
                await asyncio.sleep(0.1)
            out = await ec.exchange(f"127.0.0.1:{grpc_port}", [ec.headers(), ec.body(body)])
            assert ec.immediate(out)[0] == 503


def test_missing_pool_is_a_clear_startup_error(tmp_path):
    with KubeAPIEmulator().threaded() as api:
        cfg = tmp_path / "kubeconfig"
        cfg.write_text(kubeconfig(api.url))
        proc = subprocess.run(
            picker_cmd(free_port(), free_port(), "--provider", "kubernetes", "--pool-name", "nope"),
            env={**os.environ, "KUBECONFIG": str(cfg)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
