"""Prefill/decode disaggregation in the simulator, as vLLM's NixlConnector shows it to clients.

Real simulator processes on 127.0.0.1: prefill pods keep a prefill leg's KV and name it in
`kv_transfer_params`; decode pods pull it over HTTP from the prefill pod, count it as cached,
announce it on their KV-event socket (real ZMQ) and fail clearly when the KV is gone.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from infergw.kvindex.events import BlockStored, decode_message
from infergw.simulator.config import DEFAULT_KV_HOLD_SECONDS, parse_config
from tests.conftest import free_port, running, simulator_cmd
from tests.kv_subscriber import Subscriber as KVEventSubscriber
from tests.paths import TINY_MODEL
from tests.waiting import wait_for

BLOCK = 32
NIXL_FIELDS = {
    "do_remote_prefill",
    "do_remote_decode",
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_port",
    "tp_size",
}
COMMON = (
    "--model",
    str(TINY_MODEL),
    "--served-model-name",
    "tiny",
    "--block-size",
    str(BLOCK),
    "--max-model-len",
    "2048",
)


class Subscriber(KVEventSubscriber):
    """test_simulator_kv_events' SUB socket (bound where a pod's PUB connects), asked for
    the BlockStored events since a point."""

    def stored_since(self, start: int) -> list[BlockStored]:
        return [
            ev
            for frames in self.raw[start:]
            for ev in decode_message(frames).batch.events
            if isinstance(ev, BlockStored)
        ]


@pytest.fixture(scope="module")
def events():
    s = Subscriber()
    yield s
    s.close()


def _pod(*flags: str):
    port = free_port()
    return port, running(
        simulator_cmd(port, *COMMON, *flags), ready_url=f"http://127.0.0.1:{port}/health"
    )


@pytest.fixture(scope="module")
def pods(events):
    """prefill (hold 60 s, fast prefill, a small cache), decode (slow prefill, so a pull is
    visibly cheaper; KV events on), a prefill pod that holds KV for 1.5 s only, and a decode
    pod that recomputes when a pull fails (vLLM's kv_load_failure_policy=recompute)."""
    events_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{events.port}",
        "topic": "kv@127.0.0.1:8400@tiny",
    }
    specs = {
        "prefill": (
            "--kv-role",
            "prefill",
            "--sim-kv-hold-seconds",
            "60",
            "--num-gpu-blocks-override",
            "80",
            "--sim-prefill-us-per-token",
            "20",
        ),
        "decode": (
            "--kv-role",
            "decode",
            "--num-gpu-blocks-override",
            "400",
            "--sim-prefill-us-per-token",
            "1000",
            "--sim-kv-transfer-ms-per-block",
            "2",
            "--kv-events-config",
            json.dumps(events_cfg),
        ),
        "short": (
            "--kv-role",
            "prefill",
            "--sim-kv-hold-seconds",
            "1.5",
            "--sim-prefill-us-per-token",
            "20",
        ),
        "plain": ("--sim-prefill-us-per-token", "20"),  # no KV connector at all
        "recompute": (
            "--kv-transfer-config",
            json.dumps(
                {
                    "kv_connector": "NixlConnector",
                    "kv_role": "kv_consumer",
                    "kv_load_failure_policy": "recompute",
                }
            ),
            "--sim-prefill-us-per-token",
            "20",
        ),
    }
    started, urls = [], {}
    try:
        for name, flags in specs.items():
            port, cm = _pod(*flags)
            cm.__enter__()
            started.append(cm)
            urls[name] = f"http://127.0.0.1:{port}"
        events.wait_connected()
        yield urls
    finally:
        for cm in reversed(started):
            cm.__exit__(None, None, None)


# ---- helpers ---------------------------------------------------------------------------------


def prompt_of(tag: str, words: int = 220) -> str:
    return f"{tag}: " + " ".join(f"{tag}{i}" for i in range(words))


def prefill_leg_body(body: dict) -> dict:
    """The prefill leg as llm-d's sidecar sends it with the nixl connector."""
    leg = {k: v for k, v in body.items() if k != "stream_options"}
    leg.update(stream=False, max_tokens=1, max_completion_tokens=1, min_tokens=1)
    leg["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return leg


def post(url: str, body: dict, path: str = "/v1/completions", **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=kw.pop("timeout", 30), **kw)


def prefill(url: str, body: dict, path: str = "/v1/completions") -> dict:
    r = post(url, prefill_leg_body(body), path)
    assert r.status_code == 200, r.text
    return r.json()


def tokens(url: str, prompt: str) -> list[int]:
    r = post(url, {"model": "tiny", "prompt": prompt}, "/tokenize")
    return r.json()["tokens"]


def sample(url: str, name: str, **labels: str) -> float:
    """A series of /metrics (0 when absent)."""
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def error_message(r: requests.Response) -> str:
    err = r.json()["error"]
    assert err["type"] == "InternalServerError" and err["code"] == 500
    return err["message"]


# ---- the prefill leg -------------------------------------------------------------------------


def test_prefill_leg_returns_kv_transfer_params_and_pins_the_blocks(pods):
    p = pods["prefill"]
    held_before = sample(p, "infergate_sim:kv_held_requests")
    body = {"model": "tiny", "prompt": prompt_of("pin")}
    out = prefill(p, body)
    kv = out["kv_transfer_params"]
    n = out["usage"]["prompt_tokens"]
    assert set(kv) == NIXL_FIELDS
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
    assert isinstance(kv["remote_engine_id"], str) and kv["remote_engine_id"]
    assert isinstance(kv["remote_request_id"], str) and kv["remote_request_id"]
    assert (kv["remote_host"], kv["remote_port"], kv["tp_size"]) == (
        "127.0.0.1",
        int(p.rsplit(":", 1)[1]),
        1,
    )
    blocks = kv["remote_block_ids"]
    assert len(blocks) == len(set(blocks)) == -(-n // BLOCK)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 1
    assert sample(p, "infergate_sim:kv_held_requests") == held_before + 1

    # Pinned: requests that need more blocks than are free evict cached blocks, never these.
    for i in range(3):
        filler = {"model": "tiny", "prompt": prompt_of(f"fill{i}", 380), "max_tokens": 1}
        assert post(p, filler).status_code == 200
    usable = 80 - 1  # block 0 is the null block
    assert sample(p, "vllm:kv_cache_usage_perc") >= len(blocks) / usable

    # ... and still there to pull.
    d = pods["decode"]
    r = post(d, {**body, "max_tokens": 2, "kv_transfer_params": kv})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
    assert sample(p, "infergate_sim:kv_held_requests") == held_before


def test_plain_requests_are_served_on_every_role(pods):
    for name in ("prefill", "decode"):
        r = post(pods[name], {"model": "tiny", "prompt": "plain", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["kv_transfer_params"] is None  # vLLM's responses carry it, null
        chat = post(
            pods[name],
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            "/v1/chat/completions",
        )
        assert chat.status_code == 200 and chat.json()["kv_transfer_params"] is None


# ---- the decode leg --------------------------------------------------------------------------


def test_decode_leg_pulls_the_kv_instead_of_computing_it(pods, events):
    p, d = pods["prefill"], pods["decode"]
    body = {"model": "tiny", "prompt": prompt_of("pd")}
    ids = tokens(d, body["prompt"])
    n = len(ids)
    kv = prefill(p, body)["kv_transfer_params"]
    before = {
        "ttft": sample(d, "vllm:time_to_first_token_seconds_sum"),
        "xfer": sample(d, "vllm:nixl_xfer_time_seconds_sum"),
        "xfers": sample(d, "vllm:nixl_xfer_time_seconds_count"),
        "ext": sample(d, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
        "hits": sample(d, "vllm:external_prefix_cache_hits_total"),
        "p2p": sample(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p"),
    }
    seen = len(events.raw)

    r = post(d, {**body, "max_tokens": 5, "kv_transfer_params": kv})
    assert r.status_code == 200, r.text
    out = r.json()
    # vLLM counts every prompt token but the last (computed again to sample) as cached.
    assert out["usage"]["prompt_tokens"] == n
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
    assert out["usage"]["completion_tokens"] == 5
    assert out["kv_transfer_params"] is None
    decode_ttft = sample(d, "vllm:time_to_first_token_seconds_sum") - before["ttft"]

    # The transfer was paid per block pulled (16 blocks x 2 ms), in NIXL's metrics.
    assert sample(d, "vllm:nixl_xfer_time_seconds_count") == before["xfers"] + 1
    pulled = -(-n // BLOCK)
    xfer = sample(d, "vllm:nixl_xfer_time_seconds_sum") - before["xfer"]
    assert xfer == pytest.approx(pulled * 0.002)
    ext = sample(d, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    assert ext - before["ext"] == n
    assert sample(d, "vllm:external_prefix_cache_hits_total") - before["hits"] == n
    # The cache tier that supplied them: another vLLM instance.
    p2p = sample(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p")
    assert p2p - before["p2p"] == n

    # The decode pod announces the pulled blocks, as vLLM does after a NIXL read: one
    # BlockStored for every full block of the prompt but its last token, from the root.
    full = (n - 1) // BLOCK

    def pulled_store():
        return [ev for ev in events.stored_since(seen) if list(ev.token_ids[:BLOCK]) == ids[:BLOCK]]

    stored = wait_for(
        pulled_store, "a BlockStored from the decode pod for the pulled blocks", within=5
    )
    assert stored[0].parent_block_hash is None
    assert len(stored[0].block_hashes) == full
    assert list(stored[0].token_ids) == ids[: full * BLOCK]

    # A cold prompt of the same length pays its prefill: 1 ms a token here.
    cold = {"model": "tiny", "prompt": prompt_of("cd"), "max_tokens": 5}
    before_cold = sample(d, "vllm:time_to_first_token_seconds_sum")
    r = post(d, cold)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cold_ttft = sample(d, "vllm:time_to_first_token_seconds_sum") - before_cold
    assert cold_ttft >= 0.9 * r.json()["usage"]["prompt_tokens"] * 1e-3
    assert decode_ttft < cold_ttft / 3, (decode_ttft, cold_ttft)


def test_streaming_chat_decode_leg(pods):
    p, d = pods["prefill"], pods["decode"]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt_of("chat", 150)}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    kv = prefill(p, body, "/v1/chat/completions")["kv_transfer_params"]
    client = openai.OpenAI(base_url=d + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=body["messages"],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"kv_transfer_params": kv},
    )
    chunks = list(stream)
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) == 6
    usage = chunks[-1].usage
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


# ---- when the KV is gone ---------------------------------------------------------------------


def test_blocks_expire_after_the_hold_and_a_late_decode_leg_fails_clearly(pods):
    short, d = pods["short"], pods["decode"]
    body = {"model": "tiny", "prompt": prompt_of("late", 120)}
    started = time.monotonic()
    kv = prefill(short, body)["kv_transfer_params"]
    assert sample(short, "vllm:kv_cache_usage_perc") > 0  # held
    wait_for(
        lambda: sample(short, "vllm:nixl_num_kv_expired_reqs_total") == 1,
        "the expired transfer counted",
        within=5,
    )
    assert time.monotonic() - started >= 1.5
    assert sample(short, "infergate_sim:kv_held_requests") == 0
    assert sample(short, "vllm:kv_cache_usage_perc") == 0  # freed (still cached, evictable)

    failed = sample(d, "vllm:nixl_num_failed_transfers_total")
    began = time.monotonic()
    r = post(d, {**body, "max_tokens": 4, "kv_transfer_params": kv}, timeout=15)
    assert time.monotonic() - began < 5
    assert r.status_code == 500
    message = error_message(r)
    assert "KV transfer failed" in message and "1.5 s hold expired" in message
    assert kv["remote_engine_id"] in message and kv["remote_request_id"] in message
    assert sample(d, "vllm:nixl_num_failed_transfers_total") == failed + 1

    # Streamed, the status is already 200 when the pull fails: the error is an event, as vLLM.
    r = post(d, {**body, "max_tokens": 4, "stream": True, "kv_transfer_params": kv}, timeout=15)
    assert r.status_code == 200
    lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    event = json.loads(lines[-2][6:])
    assert "1.5 s hold expired" in event["error"]["message"]


def test_a_second_pull_fails_clearly(pods):
    p, d = pods["prefill"], pods["decode"]
    body = {"model": "tiny", "prompt": prompt_of("twice", 80), "max_tokens": 2}
    kv = prefill(p, body)["kv_transfer_params"]
    assert post(d, {**body, "kv_transfer_params": kv}).status_code == 200
    r = post(d, {**body, "kv_transfer_params": kv})
    assert r.status_code == 500
    assert "already pulled" in error_message(r)


def test_unknown_engine_request_or_host_fail_clearly_and_leave_the_kv(pods):
    p, d = pods["prefill"], pods["decode"]
    body = {"model": "tiny", "prompt": prompt_of("lost", 100), "max_tokens": 2}
    kv = prefill(p, body)["kv_transfer_params"]
    for bad, expect in (
        ({"remote_engine_id": "no-such-engine"}, "unknown engine"),
        ({"remote_request_id": "cmpl-nobody"}, "never produced KV"),
        ({"remote_port": free_port()}, "cannot reach its KV side channel"),
    ):
        began = time.monotonic()
        r = post(d, {**body, "kv_transfer_params": {**kv, **bad}}, timeout=15)
        assert time.monotonic() - began < 8
        assert r.status_code == 500, r.text
        message = error_message(r)
        assert expect in message, message
        assert str(next(iter(bad.values()))) in message
    # None of that freed the prefill pod's blocks: the right params still work.
    r = post(d, {**body, "kv_transfer_params": kv})
    assert r.status_code == 200, r.text


def test_a_different_prompt_cannot_use_the_kv(pods):
    p, d = pods["prefill"], pods["decode"]
    kv = prefill(p, {"model": "tiny", "prompt": prompt_of("one", 100)})["kv_transfer_params"]
    r = post(d, {"model": "tiny", "prompt": prompt_of("two", 100), "kv_transfer_params": kv})
    assert r.status_code == 500
    assert "prompt differs" in error_message(r)


def test_recompute_policy_computes_the_prompt_when_the_pull_fails(pods):
    p, rc = pods["prefill"], pods["recompute"]
    body = {"model": "tiny", "prompt": prompt_of("rc", 100), "max_tokens": 3}
    kv = prefill(p, body)["kv_transfer_params"]
    failed = sample(rc, "vllm:nixl_num_failed_transfers_total")
    r = post(rc, {**body, "kv_transfer_params": {**kv, "remote_engine_id": "gone"}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert sample(rc, "vllm:nixl_num_failed_transfers_total") == failed + 1


# ---- roles and request validation ------------------------------------------------------------


def test_legs_on_the_other_role_are_served_and_counted(pods):
    p, d = pods["prefill"], pods["decode"]
    mismatch = "infergate_sim:kv_role_mismatch_total"
    body = {"model": "tiny", "prompt": prompt_of("swap", 60), "max_tokens": 2}
    kv = prefill(d, body)["kv_transfer_params"]  # a prefill leg on the decode pod
    assert sample(d, mismatch, leg="prefill_leg_on_decode_pod") >= 1
    r = post(p, {**body, "kv_transfer_params": kv})  # and its decode leg on the prefill pod
    assert r.status_code == 200, r.text
    assert sample(p, mismatch, leg="decode_leg_on_prefill_pod") >= 1


def test_kv_transfer_params_validation(pods):
    d = pods["decode"]
    r = post(d, {"model": "tiny", "prompt": "x", "kv_transfer_params": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
    two = {"model": "tiny", "prompt": ["a", "b"], "kv_transfer_params": {"do_remote_decode": 1}}
    assert post(d, two).status_code == 400
    # do_remote_prefill without where to pull from: vLLM warns and computes the prompt.
    r = post(
        d, {"model": "tiny", "prompt": "y z", "kv_transfer_params": {"do_remote_prefill": True}}
    )
    assert r.status_code == 200, r.text


def test_flags(monkeypatch):
    monkeypatch.delenv("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", raising=False)
    cfg = parse_config([])
    assert cfg.kv_transfer.role == "both"
    assert cfg.kv_transfer.hold_seconds == DEFAULT_KV_HOLD_SECONDS == 480
    assert cfg.latency.kv_transfer_s_per_block == pytest.approx(1e-4)
    monkeypatch.setenv("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", "30")
    assert parse_config([]).kv_transfer.hold_seconds == 30
    cfg = parse_config(
        [
            "--kv-transfer-config",
            '{"kv_connector": "NixlConnector", "kv_role": "kv_producer", "engine_id": "p0"}',
            "--sim-kv-hold-seconds",
            "5",
        ]
    )
    assert (cfg.kv_transfer.role, cfg.kv_transfer.engine_id) == ("prefill", "p0")
    assert cfg.kv_transfer.hold_seconds == 5
    for bad in (
        ["--kv-role", "decode", "--kv-transfer-config", '{"kv_role": "kv_producer"}'],
        ["--kv-transfer-config", '{"kv_connector": "LMCacheConnectorV1"}'],
        ["--kv-transfer-config", '{"kv_load_failure_policy": "retry"}'],
        ["--sim-kv-hold-seconds", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_a_pod_without_a_kv_connector_ignores_transfer_params(pods):
    """vLLM without --kv-transfer-config: a prefill leg is an ordinary request, its answer's
    kv_transfer_params is null and nothing stays held."""
    plain = pods["plain"]
    r = post(
        plain,
        {
            "model": "tiny",
            "prompt": prompt_of("plain", 64),
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
        },
    )
    assert r.status_code == 200 and r.json()["kv_transfer_params"] is None
    assert sample(plain, "infergate_sim:kv_held_requests") == 0
