"""LoRA adapters follow the Model at run time (issue 17): standalone mode, simulator pods, the
runtime sidecar beside each engine and a picker reading the pool file.

- Adding an adapter to the Model loads it on every running pod — same pods (uids), same
  engine processes (PIDs), no restart — and the picker sees it in the pods' /v1/models within
  one models scrape: a request for it, answered 404 by the picker before, is routed to a pod
  that serves it; removing it unloads it everywhere, and the picker answers 404 again.
- An adapter that cannot be had (a repository the Hub does not have, with a vLLM-typed Model
  whose adapters are downloaded) makes the pods not ready, the sidecar's /ready saying why in
  the download's words, until it is removed again.
"""

from __future__ import annotations

import signal
import sys

import aiohttp
import pytest
import yaml

from infergw.api.names import DESTINATION_HEADER, RUNTIME_PORT
from infergw.api.pod_ports import MANY, ONE
from infergw.cluster.pool import reached_port
from infergw.cluster.store import MODEL, POD
from infergw.controllers.app import Standalone
from tests import extproc_client as ec
from tests.e2e.standalone_helpers import sim_model, start_picker, wait_for_cluster
from tests.fetch.hub_mirror import Mirror, running_mirror

pytestmark = pytest.mark.slow
AGGREGATED = {"aggregated": {}}
LORA_FILES = {"adapter_config.json": b'{"r": 8, "peft_type": "LORA"}', "adapter_model.bin": b"w"}


def adapters(*names: str, repo: str = "org/lora") -> list[dict]:
    return [{"name": n, "artifactURL": f"hf://{repo}-{n}"} for n in names]


async def picker_models(session, port) -> dict[str, set[str]]:
    """Each reachable endpoint's models, as the picker last read them."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/debug/endpoints") as r:
            eps = (await r.json())["endpoints"]
    except (aiohttp.ClientError, OSError, ValueError):
        return {}
    return {e["address"]: set(e.get("models") or []) for e in eps if e["reachable"]}


async def pick_answer(grpc_port: int, model: str):
    """The picker's answer to a completion for `model`, asked as Envoy asks it."""
    body = {"model": model, "prompt": "hello", "max_tokens": 2}
    return await ec.exchange(
        f"127.0.0.1:{grpc_port}", [ec.headers("/v1/completions"), ec.body(body)]
    )


async def pick(grpc_port: int, model: str) -> str | None:
    """The pod the picker sends a completion for `model` to (first of its fallbacks)."""
    out = await pick_answer(grpc_port, model)
    chosen = ec.set_headers(out[0]).get(DESTINATION_HEADER) if out else None
    return chosen.split(",")[0] if chosen else None


async def not_served(grpc_port: int, model: str) -> bool:
    """The picker answers a request for `model` 404 itself: no pod of the pool serves it."""
    answered = ec.immediate(await pick_answer(grpc_port, model))
    return answered is not None and answered[0] == 404 and "not served" in str(answered[1])


async def pods_of(store) -> list[dict]:
    pods, _ = await store.list(POD, "default", {"infergate.io/model": "tiny"})
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def adapters_condition(model: dict) -> dict:
    conditions = (model.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "AdaptersLoaded"), {})


def ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def identity(app: Standalone, pods: list[dict]) -> list[tuple[str, str, int, int]]:
    """Each pod's name, uid and its engine's and sidecar's PIDs."""
    runtime = app.parts[0]
    out = []
    for p in pods:
        m = p["metadata"]
        engine = runtime.process("default", m["name"])
        sidecar = runtime.process("default", m["name"], "runtime")
        out.append((m["name"], m["uid"], engine.pid, sidecar.pid))
    return out


@pytest.mark.parametrize("addresses", [MANY, ONE])
async def test_adapters_are_loaded_and_unloaded_on_running_pods(tmp_path, addresses) -> None:
    """On pods of their own addresses, or all on one with ports of their own (macOS)."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    model_file = manifests / "model.yaml"

    def apply(*names: str) -> None:
        doc = sim_model(backend=AGGREGATED, replicas=2, loraAdapters=adapters(*names))
        model_file.write_text(yaml.safe_dump(doc))

    apply("a")
    pool_file = tmp_path / "pool.yaml"
    app = Standalone(manifests, tmp_path / "state", pool_file, pod_addresses=addresses)
    await app.start()
    picker, port, grpc_port = await start_picker(tmp_path, pool_file)
    store = app.store
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def every_pod_serves(want: set[str], unwanted: set[str] = frozenset()):
                seen = await picker_models(session, port)
                ok = len(seen) == 2 and all(want <= m and not (unwanted & m) for m in seen.values())
                return seen if ok else None

            await wait_for_cluster(lambda: every_pod_serves({"tiny", "a"}), "adapter a on both")
            before = identity(app, await pods_of(store))
            engine_args = (await pods_of(store))[0]["spec"]["containers"][0]["args"]
            assert "--enable-lora" in engine_args and "--lora-modules" not in engine_args

            assert await not_served(grpc_port, "b")  # before it is added: 404
            apply("a", "b")
            seen = await wait_for_cluster(
                lambda: every_pod_serves({"tiny", "a", "b"}), "adapter b loaded on every pod"
            )
            pods = await pods_of(store)
            assert identity(app, pods) == before  # no pod recreated, no process restarted
            assert all(ready(p) for p in pods)
            assert all(
                c["restartCount"] == 0 for p in pods for c in p["status"]["containerStatuses"]
            )
            # the picker routes a request for the new adapter to a pod that serves it
            address = await pick(grpc_port, "b")
            assert address in seen and "b" in seen[address]
            body = {"model": "b", "prompt": "hello", "max_tokens": 2}
            async with session.post(f"http://{address}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == "b"
            # the sidecar's own report
            ip, sidecar = pods[0]["status"]["podIP"], reached_port(pods[0], RUNTIME_PORT)
            assert (sidecar == RUNTIME_PORT) == (addresses == MANY)
            async with session.get(f"http://{ip}:{sidecar}/status") as r:
                status = await r.json()
            assert status["ready"] and {a["name"] for a in status["adapters"]} == {"a", "b"}

            apply("a")
            await wait_for_cluster(
                lambda: every_pod_serves({"tiny", "a"}, {"b"}), "adapter b unloaded everywhere"
            )
            # and the picker no longer sends it anywhere: answered at once, not routed
            assert await not_served(grpc_port, "b")
            assert identity(app, await pods_of(store)) == before
    finally:
        picker.send_signal(signal.SIGTERM)
        await picker.wait()
        await app.stop()


def downloaded_model(names: list[str], hub: str) -> dict:
    """A vLLM-typed Model (its adapters downloaded by the sidecar) whose command is the
    simulator, so that it runs here."""
    doc = sim_model(
        backend=AGGREGATED,
        loraAdapters=[{"name": n, "artifactURL": f"hf://org/{n}"} for n in names],
        env=[{"name": "HF_ENDPOINT", "value": hub}],
    )
    doc["spec"]["image"] = "vllm/vllm-openai"
    doc["spec"]["engine"]["command"] = [sys.executable, "-m", "infergw.simulator"]
    return doc


async def test_an_adapter_that_cannot_be_had_holds_readiness_with_its_reason(tmp_path) -> None:
    mirror = Mirror("org/sql", LORA_FILES)
    with running_mirror(mirror):
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        model_file = manifests / "model.yaml"
        model_file.write_text(yaml.safe_dump(downloaded_model(["sql"], mirror.hub_url)))
        state = tmp_path / "state"
        app = await Standalone(
            manifests, state, tmp_path / "pool.yaml", weights_cache_dir=tmp_path / "cache"
        ).start()
        store = app.store
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

                async def sidecar_status():
                    pods = await pods_of(store)
                    ip = pods[0].get("status", {}).get("podIP") if pods else None
                    if ip is None:
                        return None
                    try:
                        async with session.get(f"http://{ip}:{RUNTIME_PORT}/status") as r:
                            return await r.json()
                    except (aiohttp.ClientError, OSError):
                        return None

                async def ready_pod():
                    pods = await pods_of(store)
                    return pods if pods and ready(pods[0]) else None

                [pod] = await wait_for_cluster(ready_pod, "the pod with adapter sql ready")
                link = state / "models" / "default" / "tiny" / "lora" / "sql"
                assert (link / "adapter_config.json").read_bytes() == LORA_FILES[
                    "adapter_config.json"
                ]
                before = identity(app, [pod])

                model_file.write_text(
                    yaml.safe_dump(downloaded_model(["sql", "gone"], mirror.hub_url))
                )

                async def failing():
                    status = await sidecar_status()
                    return status if status and status["reason"] == "SourceNotFound" else None

                status = await wait_for_cluster(failing, "the missing adapter's reason")
                assert not status["ready"]
                assert "adapter gone" in status["message"] and "org/gone" in status["message"]

                async def not_ready():
                    pods = await pods_of(store)
                    return pods and not ready(pods[0])

                await wait_for_cluster(not_ready, "the pod not ready while gone cannot load")
                ip = pod["status"]["podIP"]
                async with session.get(f"http://{ip}:{RUNTIME_PORT}/ready") as r:
                    assert r.status == 503

                async def model_says_why():
                    found = adapters_condition(await store.get(MODEL, "default", "tiny"))
                    return found if found.get("reason") == "SourceNotFound" else None

                said = await wait_for_cluster(model_says_why, "the Model's AdaptersLoaded reason")
                assert said["status"] == "False" and "org/gone" in said["message"]
                assert f"pod {pod['metadata']['name']}" in said["message"]
                assert identity(app, await pods_of(store)) == before

                model_file.write_text(yaml.safe_dump(downloaded_model(["sql"], mirror.hub_url)))
                await wait_for_cluster(ready_pod, "the pod ready again without gone")
                assert identity(app, await pods_of(store)) == before

                async def model_loaded():
                    found = adapters_condition(await store.get(MODEL, "default", "tiny"))
                    return found.get("status") == "True"

                await wait_for_cluster(model_loaded, "the Model's AdaptersLoaded True again")
        finally:
            await app.stop()
