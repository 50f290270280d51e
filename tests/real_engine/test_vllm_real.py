"""Two real vLLM pods (the CPU build, the fixture's tiny model with random weights) behind
`infergate up`, checked through Envoy: the OpenAI routes with usage, the picker's live view of
vLLM's metrics, prefix-aware routing that vLLM's own cache confirms, cache_salt isolation,
and a killed engine that leaves nothing behind and is replaced. `make test-vllm` runs it (the
stack of conftest.py, one for the whole suite: two vLLMs take minutes to start on two cores)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests

from infergw.controllers.process_group import live_members
from tests.e2e.gateway_config import PIN, SERVED
from tests.real_engine.vllm_stack import (
    BLOCK_SIZE,
    ENVOY,
    alive,
    cached,
    completion,
    endpoints,
    engine_processes,
    index_pods,
    post,
    predicted,
    prompt,
)
from tests.real_engine.vllm_stack import SERVED as MODEL
from tests.waiting import wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]


def sse(r: requests.Response) -> list[dict]:
    lines = r.text.splitlines()
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    return [json.loads(e) for e in events[:-1]]


def test_both_pods_serve_the_openai_routes_with_usage(up):
    pods = endpoints()
    assert len(pods) == 2, pods
    for pod in pods:  # each pod answers through Envoy (pinned), and it is a vLLM
        assert requests.get(f"http://{pod}/version", timeout=10).json()["version"] == "0.32.0"
        r = post("/v1/completions", completion("Hello"), {PIN: pod})
        assert r.headers[SERVED] == pod
        body = r.json()
        assert body["model"] == MODEL and body["choices"][0]["text"] is not None
        assert body["usage"]["completion_tokens"] <= 2
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    body = post("/v1/chat/completions", chat).json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] <= 3

    # Streaming: the usage the client asked for comes last, with cached tokens in it.
    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    r = requests.post(ENVOY + "/v1/chat/completions", json=stream, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks), chunks
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] <= 3 and "cached_tokens" in usage["prompt_tokens_details"]


def test_the_picker_reads_both_pods_live_metrics(up):
    def scraped():
        pods = endpoints()
        fresh = [
            e
            for e in pods.values()
            if e["metrics_age_s"] is not None and e["metrics_age_s"] < 5 and e["reachable"]
        ]
        return pods if len(fresh) == 2 else None

    pods = wait_for(scraped, "fresh metrics of both pods", within=30)
    for e in pods.values():
        # vLLM's own names (api/engines.py): queue, running, KV use, and the cache config
        assert e["engine"] == "vllm" and not e["stale"], e
        assert e["waiting"] == 0 and e["running"] is not None, e
        assert 0.0 <= e["kv_usage"] <= 1.0, e
        assert (e["block_size"], e["num_blocks"]) == (BLOCK_SIZE, 80), e


def test_follow_ups_sharing_a_prefix_go_to_its_holder_and_hit_its_cache(up):
    shared = prompt("Follow-up")
    holder = post("/v1/completions", completion(shared + " first")).headers[SERVED]
    # vLLM's BlockStored events reach the index: the holder is predicted to reuse whole blocks
    scores = wait_for(
        lambda: (
            (s := predicted(completion(shared)))[holder]["cached_tokens"] >= 4 * BLOCK_SIZE and s
        ),
        "the holder's blocks in the index",
        within=30,
    )
    assert all(s["cached_tokens"] == 0 for a, s in scores.items() if a != holder), scores
    for i in range(3):  # each follow-up shares the prefix (and some blocks of the one before)
        follow = completion(f"{shared} second {i}")
        expected = predicted(follow)[holder]["cached_tokens"]
        r = post("/v1/completions", follow)
        assert r.headers[SERVED] == holder
        assert cached(r) == expected >= 4 * BLOCK_SIZE, (r.json()["usage"], expected)
    # chat follow-ups too: the picker tokenizes with the chat template, as vLLM does
    turn = {"model": MODEL, "messages": [{"role": "user", "content": shared}], "max_tokens": 2}
    chat_holder = post("/v1/chat/completions", turn).headers[SERVED]
    wait_for(lambda: predicted(turn)[chat_holder]["cached_tokens"] > 0, "chat blocks", within=30)
    again = post("/v1/chat/completions", turn)
    assert again.headers[SERVED] == chat_holder
    assert cached(again) == predicted(turn)[chat_holder]["cached_tokens"] > 0


def test_a_salted_request_is_not_predicted_to_hit_another_salts_blocks(up):
    text = prompt("Salted")
    holder = post("/v1/completions", completion(text)).headers[SERVED]
    wait_for(lambda: predicted(completion(text))[holder]["cached_tokens"] > 0, "the blocks")

    salted = completion(text, cache_salt="tenant-a")
    assert all(s["cached_tokens"] == 0 for s in predicted(salted).values())
    r = post("/v1/completions", salted, {PIN: holder})  # on the pod holding the unsalted blocks
    assert cached(r) == 0  # vLLM agrees: another salt's blocks are not shared

    # The same salt again: its own blocks now, predicted as vLLM counts them.
    scores = wait_for(
        lambda: (s := predicted(salted))[holder]["cached_tokens"] > 0 and s, "salted blocks"
    )
    again = post("/v1/completions", salted)
    assert again.headers[SERVED] == holder
    assert cached(again) == scores[holder]["cached_tokens"]


def test_a_killed_engine_leaves_no_process_and_a_replacement_serves(up):
    body = completion(prompt("Killed"))
    victim = post("/v1/completions", body).headers[SERVED]
    wait_for(lambda: predicted(body)[victim]["cached_tokens"] > 0, "the victim's blocks")
    (survivor,) = set(endpoints()) - {victim}
    holding = index_pods()  # pods with blocks in the index, the victim among them
    main, family = engine_processes(victim.split(":")[0])
    assert len(family) > 1, family  # vLLM runs its engine core in a child process

    # The API server dies at once (an OOM kill): the runtime ends the rest of its group.
    os.kill(main.pid, signal.SIGKILL)
    # Nothing of it runs: neither what it had started nor anything since in its group.
    wait_for(
        lambda: not alive(family) and not live_members(main.pid),
        f"every process of {victim}'s engine to end",
        within=60,
    )
    wait_for(lambda: victim not in endpoints(), f"{victim} to leave the picker", within=30)
    # The index dropped all the dead engine held: one pod fewer holds blocks.
    wait_for(lambda: index_pods() == holding - 1, "the victim's blocks to leave the index")
    assert all(s["cached_tokens"] == 0 for s in predicted(body).values())

    # A replacement (the ModelInfer controller recreates a serving group whose pod failed)
    # loads vLLM, joins the picker and serves.
    def replaced() -> str | None:
        now = set(endpoints())
        return next(iter(now - {survivor}), None) if len(now) == 2 else None

    try:
        new = wait_for(replaced, "a replacement pod", within=900, interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{up.output}\n{up.diagnosis()}") from None
    assert engine_processes(new.split(":")[0])[0].pid != main.pid
    assert predicted(body)[new]["cached_tokens"] == 0  # nothing of the dead engine's blocks
    r = post("/v1/completions", body, {PIN: new})
    assert r.headers[SERVED] == new and cached(r) == 0
    # The new engine's KV events fill the index: the prompt goes back to it, and hits.
    wait_for(lambda: predicted(body)[new]["cached_tokens"] > 0, "the new engine's blocks")
    expected = predicted(body)[new]["cached_tokens"]
    follow = post("/v1/completions", body)
    assert follow.headers[SERVED] == new and cached(follow) == expected
