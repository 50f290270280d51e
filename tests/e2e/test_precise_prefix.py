"""Precise prefix-cache routing end to end: simulator pods publish KV events, the picker
indexes them and sends each prompt to the pod that still holds its prefix."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.gateway_config import MODEL, PIN, SERVED, config
from tests.e2e.stack_fixtures import make_stack, prefix_scores, wait_held

pytestmark = pytest.mark.slow

PRECISE = config(
    ("header-based-testing-filter", None),
    ("precise-prefix-cache-scorer", 1),
    ("max-score-picker", None),
)
# 64 blocks of 16 tokens: room for about three of the long prefixes below per pod.
SIM = ["--sim-time-scale", "0.2", "--num-gpu-blocks-override", "64", "--block-size", "16"]


def prefix(i: int) -> str:
    return f"Document {i}: " + " ".join(f"fact{i}-{j}" for j in range(80)) + "\nQuestion: "


def ask(stack, text: str, pin: str | None = None) -> requests.Response:
    r = requests.post(
        stack.url + "/v1/completions",
        timeout=60,
        headers={PIN: pin} if pin else {},
        json={"model": MODEL, "prompt": text, "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    return r


def scores(stack, text: str) -> dict[str, int]:
    return prefix_scores(stack.cfg.ports.picker_metrics, MODEL, text)


def wait_reachable(stack, address: str, within: float = 10.0) -> None:
    """A restarted pod is dropped while it is down; wait until the picker sees it again."""
    url = f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/debug/endpoints"
    deadline = time.monotonic() + within
    while True:
        eps = {e["address"]: e for e in requests.get(url, timeout=5).json()["endpoints"]}
        if eps[address]["reachable"] and not eps[address]["stale"]:
            return
        assert time.monotonic() < deadline, f"{address} never came back"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack for the tests below that take it (a stack takes 5–15 s to start): each
    pins its prompts to the pods it checks, with prefixes of its own, and the eviction test
    leaves every pod serving (its restarted pod reachable again)."""
    s = make_stack(tmp_path_factory.mktemp("precise"), picker_config=PRECISE, sim_args=SIM)
    yield s
    s.stop()


def test_each_prefix_goes_back_to_the_pod_that_holds_it(stack):
    pods = stack.pod_addresses
    home = {i: pods[i % len(pods)] for i in range(6)}
    for i, pod in home.items():  # spread: prefix i lives on pod i % 3
        ask(stack, prefix(i) + "first?", pin=pod)
    for i, pod in home.items():
        wait_held(stack, prefix(i) + "second?", pod)
    for i, pod in home.items():
        r = ask(stack, prefix(i) + f"another question {i}?")
        assert r.headers[SERVED] == pod, f"prefix {i} left its pod"
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 100


def test_evicted_and_restarted_pods_stop_attracting(stack):
    pods = stack.pod_addresses
    ask(stack, prefix(0) + "first?", pin=pods[0])
    wait_held(stack, prefix(0) + "x", pods[0])
    # Fill pod 0's small cache with other prompts: prefix 0's blocks are evicted.
    for i in range(10, 16):
        ask(stack, prefix(i) + "filler", pin=pods[0])
    deadline = time.monotonic() + 10
    while scores(stack, prefix(0) + "x")[pods[0]] > 0:
        assert time.monotonic() < deadline, "evicted blocks still in the index"
        time.sleep(0.1)
    # A restarted engine starts empty: its entries must go.
    ask(stack, prefix(1) + "first?", pin=pods[1])
    wait_held(stack, prefix(1) + "x", pods[1])
    stack.restart_pod(pods[1])
    wait_reachable(stack, pods[1])
    ask(stack, "wake up the restarted pod " * 20, pin=pods[1])  # its first events after restart
    deadline = time.monotonic() + 10
    while scores(stack, prefix(1) + "x")[pods[1]] > 0:
        assert time.monotonic() < deadline, "a restarted pod kept attracting its old prefix"
        time.sleep(0.1)


def test_debug_prefix_scores_explains_a_choice(stack):
    pods = stack.pod_addresses
    ask(stack, prefix(7) + "first?", pin=pods[2])
    wait_held(stack, prefix(7) + "x", pods[2])
    r = requests.post(
        f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/debug/prefix-scores",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    ).json()
    assert r["prompt_tokens"] > 0 and r["block_size"] == 16
    body = requests.post(
        f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/debug/prefix-scores",
        json={"model": MODEL, "prompt": prefix(7) + "x"},
        timeout=10,
    ).json()
    top = max(body["endpoints"], key=lambda e: e["score"])
    assert top["address"] == pods[2] and top["matched_tokens"] == 16 * top["matched_blocks"]
    assert 0 < top["score"] <= 1
    bad = requests.post(
        f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/debug/prefix-scores",
        data=b"{nope",
        timeout=10,
    )
    assert bad.status_code == 400


def test_per_pod_mode_reads_every_pods_own_socket(tmp_path):
    """Each pod binds its own PUB (on loopback) and the picker connects to all of them."""
    s = make_stack(tmp_path, picker_config=PRECISE, sim_args=SIM, per_pod_kv=True)
    try:
        pods = s.pod_addresses
        for i, pod in enumerate(pods):
            ask(s, prefix(30 + i) + "first?", pin=pod)
        for i, pod in enumerate(pods):
            wait_held(s, prefix(30 + i) + "x", pod)
            r = ask(s, prefix(30 + i) + "again?")
            assert r.headers[SERVED] == pod
        log = (tmp_path / "picker.log").read_text()
        assert "KV events: per-pod" in log
    finally:
        s.stop()


def kvindex_metrics(stack) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics", timeout=5)
    return {
        ln.split(" ")[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.text.splitlines()
        if ln.startswith("infergate_kvindex_")
    }


EVENTS = 'infergate_kvindex_messages_total{outcome="events"}'


def test_kv_index_metrics_are_exported(stack):
    before = kvindex_metrics(stack).get(EVENTS, 0)  # the stack is shared: count from here
    ask(stack, prefix(9) + "first?")
    deadline = time.monotonic() + 10
    while True:
        lines = kvindex_metrics(stack)
        if lines.get(EVENTS, 0) > before:
            break
        assert time.monotonic() < deadline, "no KV events counted"
        time.sleep(0.1)
    assert lines["infergate_kvindex_entries"] > 0 and lines["infergate_kvindex_bytes"] > 0
    assert any(k.startswith("infergate_kvindex_lookup_seconds") for k in lines)


def test_lora_prompts_follow_the_adapters_blocks(tmp_path):
    lora_sim = [
        *SIM,
        "--enable-lora",
        "--lora-modules",
        "sql-lora=/adapters/sql",
        "--max-loras",
        "2",
    ]
    s = make_stack(tmp_path, picker_config=PRECISE, sim_args=lora_sim)
    try:
        pods = s.pod_addresses
        text = prefix(21) + "SELECT?"

        def ask_model(model: str, pin: str | None = None) -> requests.Response:
            r = requests.post(
                s.url + "/v1/completions",
                timeout=60,
                headers={PIN: pin} if pin else {},
                json={"model": model, "prompt": text, "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
            return r

        ask_model("sql-lora", pin=pods[1])
        deadline = time.monotonic() + 10
        while True:  # the picker learns the adapter's base model and the blocks arrive
            r = requests.post(
                f"http://127.0.0.1:{s.cfg.ports.picker_metrics}/debug/prefix-scores",
                json={"model": "sql-lora", "prompt": text},
                timeout=10,
            ).json()
            held = {e["address"]: e["matched_blocks"] for e in r.get("endpoints", [])}
            if held.get(pods[1], 0) > 0:
                break
            assert time.monotonic() < deadline, f"adapter blocks never indexed: {r}"
            time.sleep(0.1)
        for _ in range(3):
            assert ask_model("sql-lora").headers[SERVED] == pods[1]
        # the base model's keys differ: the adapter's blocks do not count for it
        assert scores(s, text)[pods[1]] == 0
    finally:
        s.stop()


def test_replay_repairs_the_index_after_dropped_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERGATE_TEST_HOOKS", "1")
    s = make_stack(tmp_path, picker_config=PRECISE, sim_args=SIM)
    try:
        pods = s.pod_addresses
        base = f"http://127.0.0.1:{s.cfg.ports.picker_metrics}"
        ask(s, prefix(30) + "first?", pin=pods[0])
        wait_held(s, prefix(30) + "x", pods[0])
        assert requests.post(base + "/debug/kv-events/drop?n=2", timeout=5).status_code == 200
        ask(s, prefix(31) + "lost?", pin=pods[0])  # its BlockStored is dropped on purpose
        ask(s, prefix(32) + "gap?", pin=pods[0])  # the next batch reveals the gap
        wait_held(s, prefix(32) + "x", pods[0])
        wait_held(s, prefix(31) + "x", pods[0])  # repaired from the pod's replay socket
        text = requests.get(base + "/metrics", timeout=5).text
        assert 'infergate_kvindex_messages_total{outcome="replays"}' in text
        assert 'infergate_kvindex_messages_total{outcome="gaps"}' in text
        assert 'infergate_kvindex_messages_total{outcome="dropped_by_test_hook"} 2.0' in text
    finally:
        s.stop()


def test_engine_keys_send_a_repeated_prompt_to_its_holder(tmp_path):
    """Keyed by the pods' own block hashes (the stack seeds its simulators alike and tells the
    picker so): a prompt sent to one pod directly, never through the picker (so no speculative
    entry), is indexed from that pod's KV events alone, and the same prompt through Envoy goes
    there with the cached tokens the picker predicted."""
    s = make_stack(tmp_path, picker_config=PRECISE, sim_args=SIM, kv_index_keys="engine")
    try:
        holder = s.pod_addresses[1]
        text = prefix(40) + "once more?"
        direct = requests.post(
            f"http://{holder}/v1/completions",
            json={"model": MODEL, "prompt": text, "max_tokens": 2},
            timeout=60,
        )
        assert direct.status_code == 200, direct.text
        wait_held(s, text, holder)
        predicted = requests.post(
            f"http://127.0.0.1:{s.cfg.ports.picker_metrics}/debug/prefix-scores",
            json={"model": MODEL, "prompt": text},
            timeout=10,
        ).json()
        [mine] = [e for e in predicted["endpoints"] if e["address"] == holder]
        assert mine["cached_tokens"] > 100
        r = ask(s, text)
        assert r.headers[SERVED] == holder
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == mine["cached_tokens"]
        assert "keyed by engine hashes" in (tmp_path / "picker.log").read_text()
        assert 'kind="root_mismatch"' not in "\n".join(kvindex_metrics(s))
    finally:
        s.stop()
