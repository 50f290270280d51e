"""Drift between the simulator and a real vLLM 0.32, caught against recordings of the real one
(tests/fixtures/vllm-cpu-tiny/): its /metrics families (names, types, label names, HELP,
histogram buckets, and the values the same requests leave), and the shape of its answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, running, simulator_cmd
from tests.paths import TINY, TINY_MODEL
from tests.vllm_answers import KINDS, answer

# The recording's flags (README.md there), so the same requests leave the same numbers.
RECORDED_FLAGS = (
    "--model", str(TINY_MODEL), "--served-model-name", "tiny", "--block-size", "32",
    "--num-gpu-blocks-override", "80", "--max-model-len", "2048", "--seed", "3",
    "--sim-time-scale", "0.05",
)  # fmt: skip

# Families a real vLLM exports that the simulator cannot have, with the reason.
NOT_SIMULATED = {
    # Model-FLOPs-utilization estimates of the work GPU kernels do; the simulator runs no
    # kernels (and the CPU recording reports 0 for all three).
    "vllm:estimated_flops_per_gpu": "no kernels, no FLOPs",
    "vllm:estimated_flops_per_gpu_created": "no kernels, no FLOPs",
    "vllm:estimated_read_bytes_per_gpu": "no kernels, no memory traffic",
    "vllm:estimated_read_bytes_per_gpu_created": "no kernels, no memory traffic",
    "vllm:estimated_write_bytes_per_gpu": "no kernels, no memory traffic",
    "vllm:estimated_write_bytes_per_gpu_created": "no kernels, no memory traffic",
}


@pytest.fixture(scope="module")
def replayed_url():
    """A simulator with the recording's flags that has served the recorded requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(simulator_cmd(port, *RECORDED_FLAGS), ready_url=url + "/health"):
        for line in (TINY / "requests.jsonl").read_text().splitlines():
            case = json.loads(line)
            r = requests.post(url + case["path"], json=case["body"], timeout=30)
            assert r.status_code == 200, r.text
        yield url


def vllm_families(text: str) -> dict[str, Any]:
    """name -> (type, label names, HELP, histogram buckets) of every vllm: family."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("vllm:"):
            continue
        labels = frozenset(k for s in fam.samples for k in s.labels if k != "le")
        buckets = tuple(sorted({s.labels["le"] for s in fam.samples if "le" in s.labels}))
        out[fam.name] = (fam.type, labels, fam.documentation, buckets)
    return out


def values(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("vllm:") and not s.name.endswith("_created")
    }


def test_metric_families_match_the_real_vllm(replayed_url):
    real = vllm_families((TINY / "metrics.txt").read_text())
    ours = vllm_families(requests.get(replayed_url + "/metrics", timeout=5).text)
    assert set(NOT_SIMULATED) <= set(real), "an allowlisted family is gone from vLLM"
    expected = {name: v for name, v in real.items() if name not in NOT_SIMULATED}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    assert not missing and not extra, f"missing {missing}, not in vLLM {extra}"
    for name, family in expected.items():
        assert ours[name] == family, name


# Counters and histograms whose values the recorded requests fix: the same prompts, block
# size and cache size must leave the same numbers (timings and steps are the simulator's own).
SAME_VALUES = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_by_source_total",
    "vllm:prompt_tokens_cached_total",
    "vllm:prompt_tokens_cached_by_source_total",
    "vllm:request_success_total",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_max_num_generation_tokens_bucket",
    "vllm:request_params_n_bucket",
    "vllm:request_params_max_tokens_bucket",
    "vllm:request_num_preemptions_bucket",
    "vllm:request_prefill_kv_computed_tokens_bucket",
    "vllm:num_requests_waiting_by_reason",
    "vllm:engine_sleep_state",
    "vllm:mm_cache_hits_total",
    "vllm:admission_rejections_total",
)


def test_the_recorded_requests_leave_the_real_vllms_numbers(replayed_url):
    real = values((TINY / "metrics.txt").read_text())
    ours = values(requests.get(replayed_url + "/metrics", timeout=5).text)
    checked = {key: v for key, v in real.items() if key[0] in SAME_VALUES}
    assert {key[0] for key in checked} == set(SAME_VALUES)
    differ = {key: (v, ours.get(key)) for key, v in checked.items() if ours.get(key) != v}
    assert not differ, differ


def shape(value: Any) -> Any:
    """A JSON value's structure: keys (recursively), element shapes, scalar types."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return None if value is None else type(value).__name__


def keys(value: Any) -> Any:
    """A JSON value's keys, recursively (lists of objects by their first element)."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [keys(value[0])]
    return None


def role(chunk: dict) -> str:
    if not chunk["choices"]:
        return "usage"
    choice = chunk["choices"][0]
    if "role" in choice.get("delta", {}):
        return "first"
    return "content" if choice["finish_reason"] is None else "final"


def stream_shapes(chunks: list[dict]) -> dict[str, list]:
    """Each kind of chunk's shapes. vLLM coalesces tokens into fewer chunks when its output
    loop lags, so content and final chunks are compared by their keys; the role chunk and
    the usage chunk, sent once each, by their full shape (a null where an object belongs)."""
    out: dict[str, list] = {}
    for chunk in chunks:
        r = role(chunk)
        s = shape(chunk) if r in ("first", "usage") else keys(chunk)
        if s not in out.setdefault(r, []):
            out[r].append(s)
    return out


def recorded_answers() -> dict[str, dict]:
    lines = (TINY / "answers.jsonl").read_text().splitlines()
    return {a["kind"]: a for a in map(json.loads, lines)}


@pytest.fixture(scope="module")
def fresh_answers():
    """The simulator's answers to the kinds, in the recording's order on a fresh server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(simulator_cmd(port, *RECORDED_FLAGS), ready_url=url + "/health"):
        yield {kind.name: answer(url, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", [k.name for k in KINDS])
def test_answers_have_the_real_vllms_shape(fresh_answers, kind):
    real, ours = recorded_answers()[kind], fresh_answers[kind]
    if "body" in real:
        assert shape(ours["body"]) == shape(real["body"])
    else:
        theirs, mine = stream_shapes(real["chunks"]), stream_shapes(ours["chunks"])
        if "content" not in theirs:  # every token came in the final chunk
            mine.pop("content", None)
        assert mine == theirs


def _usage(exchange: dict) -> dict:
    if "body" in exchange:
        return exchange["body"]["usage"]
    return next(c["usage"] for c in reversed(exchange["chunks"]) if "usage" in c)


@pytest.mark.parametrize("kind", [k.name for k in KINDS if "usage" in k.name or not k.stream])
def test_usage_counts_the_cache_as_the_real_vllm(fresh_answers, kind):
    """cached_tokens and created_cache_tokens follow the same prompts the same way."""
    assert _usage(fresh_answers[kind]) == _usage(recorded_answers()[kind])
