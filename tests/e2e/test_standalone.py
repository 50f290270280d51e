"""Standalone mode end to end: a prefill/decode Model in a manifest directory becomes real
simulator processes; the picker (file provider) sees them; a killed prefill pod is rebuilt
and the picker drops and re-adds its endpoint; editing the manifest scales the Model."""

from __future__ import annotations

import os
import signal

import aiohttp
import pytest
import yaml

from infergw.cluster.store import MODEL, POD
from infergw.controllers.app import Standalone
from tests.e2e.standalone_helpers import sim_model, start_picker, wait_for_cluster

pytestmark = pytest.mark.slow
PD = {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}


def model(replicas: int) -> dict:
    return sim_model(backend=PD, replicas=replicas)


async def picker_endpoints(session, port) -> dict[str, dict]:
    try:
        async with session.get(f"http://127.0.0.1:{port}/debug/endpoints") as r:
            return {e["address"]: e for e in (await r.json())["endpoints"]}
    except (aiohttp.ClientError, OSError):
        return {}


async def test_a_model_runs_heals_and_scales_behind_the_picker(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "model.yaml").write_text(yaml.safe_dump(model(replicas=2)))
    pool_file = tmp_path / "pool.yaml"
    app = await Standalone(manifests, tmp_path / "state", pool_file, autoscale_interval=1).start()
    picker, metrics_port, _ = await start_picker(tmp_path, pool_file)
    store = app.store
    try:

        async def ready_groups():
            m = await store.get(MODEL, "default", "tiny")
            return (m.get("status") or {}).get("readyReplicas") == 2

        await wait_for_cluster(ready_groups, "two ready serving groups")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def four_reachable():
                eps = await picker_endpoints(session, metrics_port)
                return eps if len([e for e in eps.values() if e["reachable"]]) == 4 else None

            eps = await wait_for_cluster(four_reachable, "the picker to see 4 pods")
            pods, _ = await store.list(POD, "default", {"infergate.io/role": "prefill"})
            victim = pods[0]
            address = f"{victim['status']['podIP']}:8000"
            assert address in eps
            os.killpg(
                app.parts[0].process("default", victim["metadata"]["name"]).pid, signal.SIGKILL
            )

            async def dropped():
                eps = await picker_endpoints(session, metrics_port)
                return address not in eps or not eps[address]["reachable"]

            await wait_for_cluster(dropped, "the picker to drop the killed pod")

            async def rebuilt():
                pods, _ = await store.list(POD, "default", {"infergate.io/role": "prefill"})
                uids = {p["metadata"]["uid"] for p in pods}
                return len(pods) == 2 and victim["metadata"]["uid"] not in uids

            await wait_for_cluster(rebuilt, "the prefill role to be recreated")
            await wait_for_cluster(four_reachable, "the picker to see 4 pods again")
            # editing the manifest scales the Model to three groups
            (manifests / "model.yaml").write_text(yaml.safe_dump(model(replicas=3)))

            async def six_reachable():
                eps = await picker_endpoints(session, metrics_port)
                return len([e for e in eps.values() if e["reachable"]]) == 6

            await wait_for_cluster(six_reachable, "the picker to see 6 pods")
    finally:
        picker.send_signal(signal.SIGTERM)
        await picker.wait()
        await app.stop()
