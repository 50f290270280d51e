"""Prompts sent to hurt the simulator: one far over the context must cost neither the pod's
memory nor its event loop (its health and metrics), as it did when it was encoded whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

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


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def sim():
    port = free_port()
    cmd = simulator_cmd(
        port, "--model", str(TINY_MODEL), "--served-model-name", "tiny",
        "--max-model-len", str(MAX_MODEL_LEN), "--sim-time-scale", "0.05",
    )  # fmt: skip
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/health") as proc:
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
