"""The simulator's HTTP API as clients see it: the official openai client, vLLM's shapes, errors."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.conftest import free_port, running, simulator_cmd
from tests.paths import TINY, TINY_MODEL

FAST = ("--sim-time-scale", "0.05")


def fixture_requests() -> list[dict]:
    return [json.loads(line) for line in (TINY / "requests.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_url():
    port = free_port()
    cmd = simulator_cmd(
        port,
        "--model",
        str(TINY_MODEL),
        "--served-model-name",
        "tiny",
        "--block-size",
        "32",
        "--num-gpu-blocks-override",
        "400",
        "--max-model-len",
        "2048",
        "--enable-lora",
        "--lora-modules",
        "sql-lora=/adapters/sql",
        "--seed",
        "3",
        *FAST,
    )
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def client(tiny_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_url + "/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in /metrics")


@pytest.mark.parametrize("case", fixture_requests(), ids=lambda c: c["path"].rsplit("/", 1)[1])
def test_tokenize_matches_vllm(tiny_url, case):
    body = dict(case["body"])
    body.pop("max_tokens", None)
    r = requests.post(tiny_url + "/tokenize", json=body, timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens"] == case["tokenize"]["tokens"]
    assert got["count"] == case["tokenize"]["count"]
    assert got["max_model_len"] == case["tokenize"]["max_model_len"] == 2048


def test_usage_matches_vllm(tiny_url):
    for case in fixture_requests()[:6]:
        r = requests.post(tiny_url + case["path"], json=case["body"], timeout=30)
        assert r.status_code == 200, r.text
        use = r.json()["usage"]
        assert use["prompt_tokens"] == case["usage"]["prompt_tokens"]
        assert use["completion_tokens"] == case["usage"]["completion_tokens"]
        assert use["total_tokens"] == case["usage"]["total_tokens"]


def test_openai_client_completion_and_chat(client):
    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7)
    assert c.choices[0].finish_reason == "length" and c.choices[0].text
    assert c.usage.completion_tokens == 7 and c.usage.prompt_tokens > 0
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 5


def test_openai_client_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = client.completions.create(model="tiny", prompt="abc", max_tokens=4, stream=True)
    pieces = list(text)
    assert [p.choices[0].finish_reason for p in pieces] == [None, None, None, "length"]


def test_stream_and_non_stream_agree(tiny_url):
    body = {"model": "tiny", "prompt": "the same prompt twice", "max_tokens": 12}
    whole = requests.post(tiny_url + "/v1/completions", json=body, timeout=10).json()
    r = requests.post(
        tiny_url + "/v1/completions", json={**body, "stream": True}, timeout=10, stream=True
    )
    lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == b"data: [DONE]"
    streamed = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1])
    assert streamed == whole["choices"][0]["text"]
    assert r.headers["content-type"].startswith("text/event-stream")


def test_repeated_prompt_reports_cached_tokens(tiny_url):
    prompt = "cache me: " + " ".join(f"item{i}" for i in range(150))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
    hits_before = metric(tiny_url, "vllm:prefix_cache_hits_total")
    first = requests.post(tiny_url + "/v1/completions", json=body, timeout=10).json()["usage"]
    second = requests.post(tiny_url + "/v1/completions", json=body, timeout=10).json()["usage"]
    n = first["prompt_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 32 * 32 > 0
    assert metric(tiny_url, "vllm:prefix_cache_hits_total") - hits_before == (n - 1) // 32 * 32


def test_models_lists_base_and_lora(client):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny", "sql-lora"}
    assert ids["sql-lora"].model_extra["parent"] == "tiny"
    assert ids["tiny"].model_extra["max_model_len"] == 2048


def test_lora_requests_show_in_metrics(tiny_url):
    r = requests.post(
        tiny_url + "/v1/completions",
        json={"model": "sql-lora", "prompt": "select", "max_tokens": 2},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["model"] == "sql-lora"
    text = requests.get(tiny_url + "/metrics", timeout=5).text
    assert 'vllm:lora_requests_info{max_lora="1",running_lora_adapters=""' in text
    load = requests.post(
        tiny_url + "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/x"}, timeout=5
    )
    assert load.status_code == 200
    assert (
        requests.post(
            tiny_url + "/v1/completions",
            json={"model": "new", "prompt": "x", "max_tokens": 1},
            timeout=5,
        ).status_code
        == 200
    )
    assert (
        requests.post(
            tiny_url + "/v1/unload_lora_adapter", json={"lora_name": "new"}, timeout=5
        ).status_code
        == 200
    )
    assert (
        requests.post(
            tiny_url + "/v1/completions",
            json={"model": "new", "prompt": "x", "max_tokens": 1},
            timeout=5,
        ).status_code
        == 404
    )


REQUIRED_VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:cache_config_info",
    "vllm:lora_requests_info",
]


def test_metrics_use_vllm_names_and_labels(tiny_url):
    text = requests.get(tiny_url + "/metrics", timeout=5).text
    real = (TINY / "metrics.txt").read_text()
    for name in REQUIRED_VLLM_METRICS:
        assert f"\n{name}{{" in text, name
    # every required series also exists in the real vLLM's output, with the same labels
    for name in REQUIRED_VLLM_METRICS[:-1]:
        ours = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
        theirs = next(ln for ln in real.splitlines() if ln.startswith(name + "{"))
        assert _label_names(ours) <= _label_names(theirs) | {"le"}, name
    assert 'block_size="32"' in text and 'num_gpu_blocks="400"' in text
    assert metric(tiny_url, "vllm:generation_tokens_total") > 0


def _label_names(line: str) -> set[str]:
    inner = line[line.index("{") + 1 : line.index("}")]
    return {part.split("=", 1)[0] for part in inner.split('",') if part}


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "tiny"}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": 5}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": []}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": true}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": 5000}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400, "stream"),
        (b'{"model": "tiny", "prompt": "x", "n": 3}', 400, "n"),
        (b'{"model": "tiny", "prompt": "x", "logprobs": 2}', 400, "logprobs"),
        (b'{"model": "tiny", "prompt": "x", "logprobs": 0}', 400, "logprobs"),
        (b'{"model": "tiny", "prompt": "x", "prompt_logprobs": 0}', 400, "prompt_logprobs"),
        (
            b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": "yes"}}',
            400,
            "stream_options",
        ),
        (
            b'{"prompt": "x", "stream": true, "stream_options": {"continuous_usage_stats": 1}}',
            400,
            "stream_options",
        ),
        (b'{"model": "tiny", "prompt": [99999999]}', 400, "prompt"),
        (b'{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    ],
)
def test_bad_completion_requests(tiny_url, body, status, param):
    r = requests.post(
        tiny_url + "/v1/completions",
        data=body,
        headers={"content-type": "application/json"},
        timeout=5,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["param"] == param
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "body,status",
    [
        ({"model": "tiny"}, 400),
        ({"model": "tiny", "messages": []}, 400),
        ({"model": "tiny", "messages": [{"content": "no role"}]}, 400),
        ({"model": "tiny", "messages": "hello"}, 400),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "add_generation_prompt": True,
                "continue_final_message": True,
            },
            400,
        ),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ],
)
def test_bad_chat_requests(tiny_url, body, status):
    r = requests.post(tiny_url + "/v1/chat/completions", json=body, timeout=5)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == status


def test_prompt_longer_than_max_model_len(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=" word" * 3000, max_tokens=1)
    assert "maximum context length is 2048" in str(exc.value)


def test_unknown_route_and_method(tiny_url):
    r = requests.get(tiny_url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = requests.get(tiny_url + "/v1/completions", timeout=5)
    assert r.status_code == 405


def test_server_survives_a_client_that_disconnects(tiny_url):
    body = {"model": "tiny", "prompt": "long answer", "max_tokens": 1500, "stream": True}
    with requests.post(tiny_url + "/v1/completions", json=body, stream=True, timeout=10) as r:
        next(r.iter_lines())
    # the aborted request leaves the engine and the server keeps serving
    ok = requests.post(
        tiny_url + "/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 1},
        timeout=10,
    )
    assert ok.status_code == 200
    for _ in range(50):
        if metric(tiny_url, "vllm:num_requests_running") == 0:
            break
        import time

        time.sleep(0.1)
    assert metric(tiny_url, "vllm:num_requests_running") == 0
    assert metric(tiny_url, "vllm:request_success_total", finished_reason="abort") >= 1


def test_tokenize_token_strs_and_detokenize(tiny_url):
    r = requests.post(
        tiny_url + "/tokenize", json={"prompt": "hello world", "return_token_strs": True}, timeout=5
    ).json()
    assert len(r["token_strs"]) == r["count"]
    back = requests.post(tiny_url + "/detokenize", json={"tokens": r["tokens"]}, timeout=5)
    assert back.json()["prompt"] == "hello world"
    bad = requests.post(tiny_url + "/tokenize", json={"prompt": "a", "messages": []}, timeout=5)
    assert bad.status_code == 400


def test_same_seed_same_text_across_servers(sim_factory):
    a = sim_factory("--model", str(TINY_MODEL), "--seed", "11", *FAST)
    b = sim_factory("--model", str(TINY_MODEL), "--seed", "11", *FAST)
    c = sim_factory("--model", str(TINY_MODEL), "--seed", "12", *FAST)
    body = {"prompt": "determinism", "max_tokens": 10}
    texts = [
        requests.post(u + "/v1/completions", json=body, timeout=10).json()["choices"][0]["text"]
        for u in (a, b, c)
    ]
    assert texts[0] == texts[1] != texts[2]


def test_sglang_metric_names(sim_factory):
    url = sim_factory("--engine", "sglang", *FAST)
    requests.post(
        url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10
    ).raise_for_status()
    text = requests.get(url + "/metrics", timeout=5).text
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:cache_config_info",
    ):
        assert f"\n{name}{{" in text, name
    assert "vllm:" not in text


def test_default_model_serves_without_flags(sim_factory):
    url = sim_factory(*FAST)
    models = requests.get(url + "/v1/models", timeout=5).json()["data"]
    name = models[0]["id"]
    r = requests.post(
        url + "/v1/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_answers_end_with_eos_when_asked_to(sim_factory):
    url = sim_factory("--sim-output-len-mean", "5", *FAST)
    reasons = set()
    for i in range(8):
        r = requests.post(
            url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 200}, timeout=10
        ).json()
        reasons.add(r["choices"][0]["finish_reason"])
        assert r["usage"]["completion_tokens"] < 200
    assert reasons == {"stop"}


def test_completion_max_tokens_defaults_to_16_and_chat_to_the_context(tiny_url):
    r = requests.post(
        tiny_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10
    ).json()
    assert r["usage"]["completion_tokens"] == 16
    # chat without a limit may run to max_model_len: the server accepts it and streams
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with requests.post(
        tiny_url + "/v1/chat/completions", json=body, stream=True, timeout=10
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith(b"data: ")


def test_body_over_the_limit_gets_413(tiny_url):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    r = requests.post(
        tiny_url + "/v1/completions",
        data=big,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_a_list_of_prompts_gives_one_choice_each(tiny_url):
    body = {"model": "tiny", "prompt": ["first", [5, 6, 7]], "max_tokens": 3}
    r = requests.post(tiny_url + "/v1/completions", json=body, timeout=10).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["completion_tokens"] == 6
    streamed = requests.post(
        tiny_url + "/v1/completions", json={**body, "stream": True}, timeout=10
    )
    chunks = [json.loads(ln[6:]) for ln in streamed.iter_lines() if ln.startswith(b"data: {")]
    per_index = {0: 0, 1: 0}
    for c in chunks:
        per_index[c["choices"][0]["index"]] += 1
    assert per_index == {0: 3, 1: 3}


def _chunks(url: str, path: str, body: dict) -> list[dict]:
    r = requests.post(url + path, json={**body, "stream": True}, timeout=10)
    assert r.status_code == 200, r.text
    return [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith(b"data: {")]


def test_stop_string_across_tokens_agrees_in_stream_and_not(tiny_url):
    body = {"model": "tiny", "prompt": "stop me somewhere", "max_tokens": 24}
    pieces = [c["choices"][0]["text"] for c in _chunks(tiny_url, "/v1/completions", body)]
    full = "".join(pieces)
    for k in range(2, len(pieces) - 1):  # a stop string made of the ends of two tokens
        stop = pieces[k][-2:] + pieces[k + 1][:2]
        at = len("".join(pieces[: k + 1])) - 2
        if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2 and full.find(stop) == at:
            break
    else:
        pytest.fail(f"no two tokens to build a stop string from: {pieces}")
    whole = requests.post(
        tiny_url + "/v1/completions", json={**body, "stop": [stop]}, timeout=10
    ).json()["choices"][0]
    assert whole["text"] == full[:at]
    chunks = _chunks(tiny_url, "/v1/completions", {**body, "stop": [stop]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:at]
    assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", stop)
    last = chunks[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_token_id_with_stop_strings_is_the_stop_reason(tiny_url, path):
    body = {
        "model": "tiny",
        "max_tokens": 5,
        "stop": ["never appears"],
        "stop_token_ids": list(range(8192)),  # the first token stops the answer
        **(
            {"messages": [{"role": "user", "content": "hi"}]}
            if "chat" in path
            else {"prompt": "hi"}
        ),
    }
    r = requests.post(tiny_url + path, json=body, timeout=10)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and isinstance(choice["stop_reason"], int)
    assert (choice["message"]["content"] if "chat" in path else choice["text"]) == ""
    assert r.json()["usage"]["completion_tokens"] == 1
    last = _chunks(tiny_url, path, body)[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == choice["stop_reason"]


def test_max_model_len_is_lowered_to_what_the_kv_cache_holds(sim_factory):
    url = sim_factory(
        "--model", str(TINY_MODEL), "--num-gpu-blocks-override", "5", "--max-model-len", "2048"
    )  # 4 usable blocks of 16 tokens (block 0 is the null block): 64 tokens
    assert requests.get(url + "/v1/models", timeout=5).json()["data"][0]["max_model_len"] == 64
    body = {"prompt": "x", "max_tokens": 100}
    r = requests.post(url + "/v1/completions", json=body, timeout=5)
    assert r.status_code == 400 and "maximum context length is 64" in r.text
    r = requests.post(url + "/v1/completions", json={**body, "max_tokens": 60}, timeout=5)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
    chat = {"messages": [{"role": "user", "content": "x"}]}  # no limit: up to the cache
    r = requests.post(url + "/v1/chat/completions", json=chat, timeout=10).json()["usage"]
    assert r["total_tokens"] == 64


def test_max_model_len_lowering_is_logged(caplog):
    from infergw.simulator.config import SimulatorConfig
    from infergw.simulator.server import Simulator

    with caplog.at_level("WARNING", logger="simulator.server"):
        sim = Simulator(SimulatorConfig(model=str(TINY_MODEL), num_gpu_blocks=5))
    assert sim.max_model_len == sim.engine.limits.max_model_len == 64
    assert "lowering max_model_len from 4096 to 64" in caplog.text


def test_a_kv_cache_without_room_for_a_block_refuses_to_start():
    import subprocess

    done = subprocess.run(
        simulator_cmd(free_port(), "--num-gpu-blocks-override", "1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "--num-gpu-blocks-override" in done.stderr and "Traceback" not in done.stderr


def test_request_chat_template_needs_the_trust_flag(tiny_url):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template": "{{ messages[0]['content'] }}",
        "max_tokens": 2,
    }
    for path in ("/v1/chat/completions", "/tokenize"):
        r = requests.post(tiny_url + path, json=body, timeout=5)
        assert r.status_code == 400, r.text
        assert "--trust-request-chat-template" in r.json()["error"]["message"]


def test_trusted_chat_template_that_fails_gets_400(sim_factory):
    url = sim_factory("--model", str(TINY_MODEL), "--trust-request-chat-template", *FAST)
    body = {"model": str(TINY_MODEL), "messages": [{"role": "user", "content": "hi"}]}
    r = requests.post(
        url + "/tokenize", json={**body, "chat_template": "{{ messages[0]['content'] }}"}, timeout=5
    )
    assert r.status_code == 200 and r.json()["count"] == 1
    for template in (
        "{{ 1 // 0 }}",  # ZeroDivisionError
        "{{ 'a' + 1 }}",  # TypeError
        "{{ ''.split('') }}",  # ValueError
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # RecursionError
    ):
        for path in ("/v1/chat/completions", "/tokenize"):
            r = requests.post(url + path, json={**body, "chat_template": template}, timeout=5)
            assert r.status_code == 400, (template, r.text)
            assert r.json()["error"]["code"] == 400


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800"}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}"),
        ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ],
    ids=["surrogate-prompt", "surrogate-chat", "surrogate-tokenize", "huge-int", "deep-array"],
)
def test_bodies_python_cannot_take_get_400(tiny_url, path, body):
    r = requests.post(
        tiny_url + path, data=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == 400 and "Traceback" not in r.text


def test_a_surrogate_pair_is_a_valid_character(tiny_url):
    body = b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    r = requests.post(
        tiny_url + "/v1/completions",
        data=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def test_stream_options_without_include_usage_include_it_as_in_vllm(tiny_url):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream_options": {}}
    chunks = _chunks(tiny_url, "/v1/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "body,message",
    [
        ({"tokens": "abc"}, "'tokens' must be a list of integers"),
        ({"tokens": [1, True]}, "'tokens' must be a list of integers"),
        ({"tokens": [99999999]}, "out of vocabulary"),
    ],
)
def test_bad_detokenize_requests_name_tokens(tiny_url, body, message):
    r = requests.post(tiny_url + "/detokenize", json=body, timeout=5)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tokens" and message in err["message"]


def test_fingerprint_mode_custom_and_none(sim_factory):
    body = {"prompt": "fingerprint", "max_tokens": 2}
    custom = sim_factory("--fingerprint-mode", "custom", "--fingerprint-value", "fp-1", *FAST)
    r = requests.post(custom + "/v1/completions", json=body, timeout=10).json()
    assert r["system_fingerprint"] == "fp-1"
    stream = requests.post(custom + "/v1/completions", json={**body, "stream": True}, timeout=10)
    chunks = [json.loads(ln[6:]) for ln in stream.iter_lines() if ln and ln != b"data: [DONE]"]
    # As vLLM: only the terminal chunk carries it when no usage chunk follows.
    assert [c.get("system_fingerprint") for c in chunks] == [None, "fp-1"]
    off = sim_factory("--fingerprint-mode", "none", *FAST)
    r = requests.post(off + "/v1/completions", json=body, timeout=10).json()
    assert "system_fingerprint" in r and r["system_fingerprint"] is None


# ---- the other APIs the gateway routes: Anthropic's Messages, rerank, score, audio ----------


def test_messages_answers_in_anthropics_shape(tiny_url):
    r = requests.post(
        tiny_url + "/v1/messages",
        json={
            "model": "tiny",
            "max_tokens": 4,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "tiny"
    assert body["id"].startswith("msg_")
    (block,) = body["content"]
    assert block["type"] == "text" and isinstance(block["text"], str)
    assert body["stop_reason"] == "max_tokens" and body["stop_sequence"] is None
    assert body["usage"]["output_tokens"] == 4 and body["usage"]["input_tokens"] > 1


def test_messages_streams_anthropics_events(tiny_url):
    r = requests.post(
        tiny_url + "/v1/messages",
        json={"model": "sql-lora", "max_tokens": 3, "stream": True,
              "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [
        (e.split("\n")[0].removeprefix("event: "), json.loads(e.split("\n")[1][6:]))
        for e in r.text.strip().split("\n\n")
    ]
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 3
    assert all(data["type"] == kind for kind, data in events)
    assert events[0][1]["message"]["model"] == "sql-lora"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"model": "tiny", "max_tokens": 2, "messages": []}, "messages"),
        ({"model": "tiny", "max_tokens": 2, "messages": [{"role": "system", "content": "x"}]},
         "messages"),
        ({"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
         "model"),
    ],
)  # fmt: skip
def test_bad_messages_requests_are_4xx(tiny_url, body, param):
    r = requests.post(tiny_url + "/v1/messages", json=body, timeout=30)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param


def test_rerank_ranks_the_matching_document_first(tiny_url):
    docs = ["the cat sat", "stock prices fell today", "a red fox"]
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = requests.post(
            tiny_url + path,
            json={"model": "tiny", "query": "why did stock prices fall", "documents": docs,
                  "top_n": 2},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]][:1] == [1] and len(body["results"]) == 2
        assert body["results"][0]["document"] == {"text": docs[1]}
        assert body["usage"]["total_tokens"] > 0 and body["model"] == "tiny"
    r = requests.post(tiny_url + "/v1/rerank", json={"model": "tiny", "query": 1}, timeout=30)
    assert r.status_code == 400


def test_score_pairs_texts(tiny_url):
    r = requests.post(
        tiny_url + "/v1/score",
        json={"model": "tiny", "text_1": "red fox", "text_2": ["a red fox", "blue sky"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["score"] > body["data"][1]["score"]
    assert body["usage"]["prompt_tokens"] > 0
    bad = {"model": "tiny", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}
    assert requests.post(tiny_url + "/v1/score", json=bad, timeout=30).status_code == 400


def test_transcriptions_take_a_form_and_answer_a_canned_text(tiny_url, client):
    audio = ("a.wav", b"RIFF....WAVE", "audio/wav")
    r = requests.post(
        tiny_url + "/v1/audio/transcriptions", files={"file": audio}, data={"model": "tiny"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    text = client.audio.transcriptions.create(model="tiny", file=audio, response_format="text")
    assert isinstance(text, str) and text
    r = requests.post(
        tiny_url + "/v1/audio/transcriptions", files={"file": audio}, data={"model": "nope"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 404
    r = requests.post(tiny_url + "/v1/audio/transcriptions", json={"model": "tiny"}, timeout=30)
    assert r.status_code == 400


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_comes_back_in_openais_shape(client, stream):
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "weather?"}],
           "max_tokens": 3, "tools": [WEATHER], "tool_choice": "required"}  # fmt: skip
    if stream:
        chunks = list(client.chat.completions.create(**ask, stream=True))
        (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        call = last.choices[0].delta.tool_calls[0]
        assert last.choices[0].finish_reason == "tool_calls"
    else:
        answer = client.chat.completions.create(**ask)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "days"} and isinstance(args["days"], int)


def test_a_named_tool_choice_and_its_errors(client):
    named = {"type": "function", "function": {"name": "weather"}}
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
        tools=[WEATHER], tool_choice=named,
    )  # fmt: skip
    assert answer.choices[0].message.tool_calls[0].function.name == "weather"
    auto = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
        tools=[WEATHER], tool_choice="auto",
    )  # fmt: skip
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
            tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip


def test_the_responses_api_answers_text(client):
    answer = client.responses.create(
        model="tiny", instructions="be brief", input="hi", max_output_tokens=4
    )
    assert answer.object == "response" and answer.model == "tiny"
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"
    assert isinstance(answer.output_text, str) and answer.output_text
    assert answer.usage.output_tokens == 4 and answer.usage.input_tokens > 1
    listed = client.responses.create(
        model="tiny",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        max_output_tokens=2,
    )
    assert listed.usage.output_tokens == 2
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=[{"type": "function_call_output"}])
