"""LoRA adapters at run time against real vLLM (the CPU build): the runtime sidecar loads a
PEFT adapter (random weights, written by peft_adapter.py) into both running engines through
vLLM's `/v1/load_lora_adapter`, the picker routes a request for it through Envoy to a pod
holding it and vLLM answers it with the adapter applied; adapters vLLM refuses (a corrupt
safetensors file, a rank above `--max-lora-rank`) fail in the sidecar's status and log with
vLLM's own words while the engines keep serving; removed, the adapter is unloaded. The same
engine processes throughout: nothing restarts. Runs on conftest.py's stack."""

from __future__ import annotations

import pytest
import requests

from infergw.api.names import RUNTIME_PORT
from infergw.stack.pods import pool_pods
from tests.e2e.gateway_config import PIN, SERVED
from tests.paths import TINY_MODEL
from tests.real_engine.peft_adapter import write_adapter, write_corrupt_adapter
from tests.real_engine.vllm_stack import (
    ENVOY,
    MAX_LORA_RANK,
    cached,
    completion,
    endpoints,
    engine_processes,
    post,
    predicted,
    prompt,
    write_model,
)
from tests.real_engine.vllm_stack import SERVED as MODEL
from tests.waiting import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]
ADAPTER = "tiny-sql"
CORRUPT = "tiny-cut"
TOO_WIDE = "tiny-wide"


def engine_models(address: str) -> set[str]:
    """What the engine at `address` serves, as its /v1/models says."""
    r = requests.get(f"http://{address}/v1/models", timeout=10)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def sidecar_status(address: str) -> dict:
    ip = address.split(":")[0]
    return requests.get(f"http://{ip}:{RUNTIME_PORT}/status", timeout=10).json()


def not_served(model: str) -> bool:
    """The picker answers a request for `model` 404 itself: no pod serves it, no route
    names it."""
    r = requests.post(ENVOY + "/v1/completions", json=completion("hi", model), timeout=60)
    return r.status_code == 404 and "not served" in r.text


def picker_models() -> dict[str, set[str]]:
    return {a: set(e.get("models") or []) for a, e in endpoints().items() if e["reachable"]}


def engines(addresses: list[str]) -> dict[str, int]:
    """Each pod's vLLM API server process."""
    return {a: engine_processes(a.split(":")[0])[0].pid for a in addresses}


def failed(status: dict) -> dict[str, dict]:
    return {a["name"]: a for a in status["adapters"] if a["state"] == "Failed"}


def test_adapters_load_serve_fail_and_unload_in_running_vllm(up, tmp_path):
    pods = wait_for(lambda: len(p := sorted(endpoints())) == 2 and p, "both pods")
    pids = engines(pods)
    assert all("--enable-lora" in engine_processes(a.split(":")[0])[0].cmdline for a in pods)
    good = write_adapter(tmp_path / ADAPTER, TINY_MODEL, rank=MAX_LORA_RANK)
    text = "SELECT name FROM users WHERE"

    # Not in the Model yet: the picker answers itself, no pod serves it.
    assert not_served(ADAPTER)

    # Added to the running Model: loaded into both engines, seen by the picker.
    write_model(up.example, {ADAPTER: good})
    wait_for(
        lambda: all(ADAPTER in engine_models(a) for a in pods), "the adapter in vLLM", within=120
    )
    held = wait_for(
        lambda: (m := picker_models()) and all(ADAPTER in s for s in m.values()) and m,
        "the adapter in the picker's view of both pods",
        within=30,
    )
    for _ in range(4):  # every request for it goes to a pod holding it, and vLLM serves it
        r = post("/v1/completions", completion(text, ADAPTER))
        assert ADAPTER in held[r.headers[SERVED]]
        assert r.json()["model"] == ADAPTER
    assert all(sidecar_status(a)["ready"] for a in pods)

    # vLLM runs it as a LoRA request (the dummy weights give every token the same logit, so
    # the answer's text cannot tell): its KV blocks are its own. On the pod holding the base
    # model's blocks of a prompt, the adapter's request for it hits none, as the picker
    # predicts; the adapter's own blocks then hit, as predicted.
    long = prompt("Adapter")
    holder = post("/v1/completions", completion(long)).headers[SERVED]
    wait_for(lambda: predicted(completion(long))[holder]["cached_tokens"] > 0, "base blocks")
    tuned = completion(long, ADAPTER)
    assert all(s["cached_tokens"] == 0 for s in predicted(tuned).values()), predicted(tuned)
    assert cached(post("/v1/completions", tuned, {PIN: holder})) == 0
    scores = wait_for(
        lambda: (s := predicted(tuned))[holder]["cached_tokens"] > 0 and s, "adapter blocks"
    )
    again = post("/v1/completions", tuned)
    assert again.headers[SERVED] == holder
    assert cached(again) == scores[holder]["cached_tokens"]

    # Two adapters vLLM cannot load: each fails on its own with vLLM's words, the engines
    # keep serving (the good adapter too), and the pods are not ready until they go.
    broken = write_corrupt_adapter(tmp_path / CORRUPT, TINY_MODEL)
    wide = write_adapter(tmp_path / TOO_WIDE, TINY_MODEL, rank=2 * MAX_LORA_RANK)
    write_model(up.example, {ADAPTER: good, CORRUPT: broken, TOO_WIDE: wide})

    def both_failed() -> dict[str, dict] | None:
        found = {a: failed(sidecar_status(a)) for a in pods}
        return found if all({CORRUPT, TOO_WIDE} <= set(f) for f in found.values()) else None

    for address, bad in wait_for(both_failed, "both refusals", within=120).items():
        assert bad[TOO_WIDE]["reason"] == "LoadFailed", bad
        assert f"greater than max_lora_rank {MAX_LORA_RANK}" in bad[TOO_WIDE]["message"], bad
        assert bad[CORRUPT]["reason"] == "LoadFailed", bad
        assert "Error while deserializing header" in bad[CORRUPT]["message"], bad
        status = sidecar_status(address)
        assert not status["ready"] and status["engine"]["up"], status
        assert requests.get(f"http://{address}/health", timeout=10).status_code == 200
        assert ADAPTER in engine_models(address)
        direct = requests.post(
            f"http://{address}/v1/completions", json=completion(text, ADAPTER), timeout=120
        )
        assert direct.status_code == 200, direct.text
    # not ready (the pod's readiness is its sidecar's): out of the pool, as Envoy and the
    # picker see it
    wait_for(lambda: not endpoints(), "both pods out of the pool", within=60)
    logs = "".join(up.pod_log(p.name, "runtime") for p in pool_pods(up.pool_file(), MODEL))
    assert f"adapter {TOO_WIDE}: LoadFailed" in logs and f"adapter {CORRUPT}: LoadFailed" in logs

    # Gone from the Model: the pods are ready again, then the good adapter is unloaded too.
    write_model(up.example, {ADAPTER: good})
    wait_for(lambda: sorted(endpoints()) == pods, "both pods back in the pool", within=120)
    write_model(up.example, {})
    wait_for(lambda: not any(ADAPTER in engine_models(a) for a in pods), "the unload", within=120)
    wait_for(
        lambda: not any(ADAPTER in s for s in picker_models().values()),
        "the picker to drop it",
        within=30,
    )
    # Once the Model's route no longer names it either, the picker answers 404 itself.
    wait_for(lambda: not_served(ADAPTER), "the picker's 404", within=30)
    assert engines(pods) == pids  # nothing restarted
