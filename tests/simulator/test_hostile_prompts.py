"""Prompts sent to hurt the simulator: one far over the context must cost neither the pod's
memory nor its event loop (its health and metrics), as it did when it was encoded whole; one
that is long but allowed is encoded off the loop, so health checks answer meanwhile."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from infergw.simulator.prompts import MAX_ENCODE_BYTES, MAX_PROMPTS
from infergw.simulator.tokenization import ModelTokenizer
from tests.conftest import free_port, running, simulator_cmd
from tests.fuzzing import fuzz_settings
from tests.paths import TINY_MODEL

MAX_MODEL_LEN = 2048
# ~2M tokens of the tiny model: encoded whole, it took ~600 MiB and seconds of the event loop.
HUGE_TEXT = "a b " * (1 << 20)
# The process at rest is ~70 MiB; the body, its JSON and the rendered prompt a few copies of 4 MiB.
PEAK_RSS_LIMIT_KIB = 300 * 1024
TOKENIZER_TINY = ModelTokenizer.from_dir(TINY_MODEL)
TOKENIZER_DEFAULT = ModelTokenizer.from_dir(None)


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc status")


def peak_rss_kib(pid: int) -> int:
    return proc_status_kib(pid, "VmHWM")


def start_sim():
    port = free_port()
    cmd = simulator_cmd(
        port, "--model", str(TINY_MODEL), "--served-model-name", "tiny",
        "--max-model-len", str(MAX_MODEL_LEN), "--sim-time-scale", "0.05",
    )  # fmt: skip
    return running(cmd, ready_url=f"http://127.0.0.1:{port}/health"), port


@pytest.fixture(scope="module")
def sim():
    proc_cm, port = start_sim()
    with proc_cm as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


@pytest.fixture
def fresh_sim():
    # Its own process: encoding a long text raises the high-water mark other tests assert on.
    proc_cm, port = start_sim()
    with proc_cm as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": HUGE_TEXT}]},
            "messages",
        ),
        ("/v1/completions", {"prompt": HUGE_TEXT, "max_tokens": 4}, "prompt"),
        ("/v1/responses", {"input": HUGE_TEXT, "max_output_tokens": 4}, "messages"),
    ],
)
def test_prompt_far_over_the_context_is_refused_without_encoding_it(sim, path, body, param):
    url, pid = sim
    r = requests.post(url + path, json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]
    assert err["param"] == param
    assert peak_rss_kib(pid) < PEAK_RSS_LIMIT_KIB
    ok = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    assert requests.post(url + "/v1/completions", json=ok, timeout=30).status_code == 200


@fuzz_settings(100)
@given(text=st.text(max_size=300) | st.sampled_from(["a" * 500, " " * 500, "\n" * 300]))
def test_the_token_bound_never_exceeds_the_real_count(text):
    # The refusal above is sound only if the bound is a true lower bound, for every text.
    for tok in (TOKENIZER_TINY, TOKENIZER_DEFAULT):
        assert tok.tokens_at_least(text) <= len(tok.encode(text, add_special_tokens=False))


def test_a_tokenizer_that_may_delete_text_has_no_bound(tmp_path):
    # A normalizer can drop characters (BERT's drops control characters): no bound is claimed.
    spec = json.loads((TINY_MODEL / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "config.json"):
        (tmp_path / name).write_text((TINY_MODEL / name).read_text())
    assert ModelTokenizer.from_dir(tmp_path).tokens_at_least(" " * 10_000) == 0


# ~1 MiB of UTF-8, the most one text may be: ~500k tokens, about a second or more of encoding.
LONG_ALLOWED_TEXT = "a b " * (MAX_ENCODE_BYTES // 4)


def test_health_and_a_small_request_answer_while_a_long_text_is_encoded(fresh_sim):
    url, pid = fresh_sim
    at_rest = proc_status_kib(pid, "VmRSS")
    events: list[str] = []
    answers: dict[str, requests.Response] = {}

    def call(name: str, path: str, body: dict | None) -> None:
        r = requests.post(url + path, json=body, timeout=300) if body else requests.get(url + path)
        answers[name] = r
        events.append(name)

    big = threading.Thread(
        target=call, args=("tokenize", "/tokenize", {"model": "tiny", "prompt": LONG_ALLOWED_TEXT})
    )
    big.start()
    # Encoding is under way once the child's memory grows by far more than the body's size.
    while big.is_alive() and proc_status_kib(pid, "VmRSS") < at_rest + 100 * 1024:
        threading.Event().wait(0.005)
    assert big.is_alive(), "the long text was encoded before the test saw it start"
    call("health", "/health", None)
    call("small", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    big.join()
    assert events == ["health", "small", "tokenize"]
    assert answers["health"].status_code == answers["small"].status_code == 200
    assert answers["tokenize"].status_code == 200, answers["tokenize"].text
    want = len(TOKENIZER_TINY.encode(LONG_ALLOWED_TEXT, add_special_tokens=True))
    assert answers["tokenize"].json()["count"] == want


def test_a_text_over_the_encoding_cap_is_refused_unencoded(sim):
    url, pid = sim
    # /tokenize has no context limit (as vLLM's): the cap is what keeps memory bounded.
    r = requests.post(url + "/tokenize", json={"prompt": "a b " * (1 << 21)}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert f"at most {MAX_ENCODE_BYTES} bytes" in err["message"]
    assert err["param"] == "prompt"
    assert peak_rss_kib(pid) < PEAK_RSS_LIMIT_KIB


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (["a"] * 200_000, f"has 200000 prompts; the simulator takes at most {MAX_PROMPTS}"),
        ([1] * 6_000_000, f"maximum context length is {MAX_MODEL_LEN} tokens"),
        ([[1, 2]] * 1_000_000, f"the simulator takes at most {MAX_PROMPTS}"),
    ],
    ids=["200k-texts", "6M-ids", "1M-id-lists"],
)
def test_a_huge_prompt_list_is_refused_with_memory_bounded(sim, prompt, message):
    url, pid = sim
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
    r = requests.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert peak_rss_kib(pid) < PEAK_RSS_LIMIT_KIB
    assert requests.get(url + "/health", timeout=30).status_code == 200
