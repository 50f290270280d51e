"""ModelRoute token rate limits end to end through a real Envoy (issue 7).

One simulator pod behind Envoy with the quickstart's API keys (so `x-infergate-user` is a user
Envoy verified: Envoy removes any copy a client sends), and the picker's pool file holding
ModelRoutes with a `rateLimit` each, so every test spends its own budget.

What is checked, and how it is known:
- input tokens: the picker counts a prompt with the model's tokenizer (LocalStack passes
  `--tokenizer infergate-sim=<dir>`); the test counts the same body with the same
  `kvindex.tokenize.PromptTokenizer`, and the pod's usage agrees. Budgets are per minute, so one
  test's few seconds refill only a token or two: the admitted count is exact.
- output tokens: charged from the response's usage, streamed answers included; a stream whose
  client did not ask for usage is charged all the same (the picker asks the engine for it) and
  the client never sees the extra usage event; a client that hangs up mid-stream (so no usage
  event ever comes) is charged for the events that passed.
- a limit in Redis (`global.redis`) holds across two pickers (two Envoys) hammering it at once;
  the same limit kept in each picker lets about twice as much through.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter

import pytest
import requests
import yaml

from infergw.kvindex.tokenize import PromptTokenizer
from infergw.stack.example import Example
from infergw.stack.local import DEFAULT_MODEL_DIR, QUICKSTART, LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from tests.conftest import free_port
from tests.e2e.gateway_config import MODEL, config
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.slow

NET = "networking.infergate.io/v1alpha1"
USER = "x-infergate-user"
ALICE = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml: client id alice
BOB = "sk-infergate-dev-bob"
TOKENIZER = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
# 48 characters: about 12 tokens by the picker's 4-characters-a-token estimate, 17 by the
# tokenizer. The budgets below are multiples of the real count, so the estimate would fail them.
PROMPT = "one two three four five six seven eight nine ten"


def prompt_tokens(prompt: str) -> int:
    return len(TOKENIZER.tokens_for("completions", {"model": MODEL, "prompt": prompt}))


T = prompt_tokens(PROMPT)
INPUT_BUDGET = 5 * T + 3  # five PROMPTs and 3 tokens to spare, per minute
PER_USER_BUDGET = 2 * T + 1
OUTPUT_BUDGET = 20
SHARED_BUDGET = 10 * T  # per minute, for the two-picker tests


def objects(redis_address: str) -> list[dict]:
    """A ModelServer for the pod and one rate-limited ModelRoute per test."""

    def route(name: str, **limit) -> dict:
        return {
            "apiVersion": NET,
            "kind": "ModelRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "modelName": name,
                "rules": [{"name": "default", "targetModels": [{"modelServerName": "sim"}]}],
                "rateLimit": {"unit": "minute", **limit},
            },
        }

    shared = {"global": {"redis": {"address": redis_address}}}
    return [
        {
            "apiVersion": NET,
            "kind": "ModelServer",
            "metadata": {"name": "sim", "namespace": "default"},
            "spec": {
                "model": MODEL,
                "inferenceEngine": "vLLM",
                "workloadSelector": {"matchLabels": {"app": "quickstart-sim"}},
            },
        },
        route("input-limited", inputTokensPerUnit=INPUT_BUDGET),
        route("per-user", inputTokensPerUnit=PER_USER_BUDGET, perUser=True),
        route("output-limited", outputTokensPerUnit=OUTPUT_BUDGET),
        route("output-leaver", outputTokensPerUnit=OUTPUT_BUDGET),
        route("shared", inputTokensPerUnit=SHARED_BUDGET, **shared),
        route("separate", inputTokensPerUnit=SHARED_BUDGET),
        route("warm-up", inputTokensPerUnit=1_000_000, **shared),
    ]


def stack_config(workdir, pod_ports: list[int]) -> StackConfig:
    workdir.mkdir(parents=True, exist_ok=True)
    picker_config = workdir / "epp-config.yaml"
    picker_config.write_text(config(("least-request", 1), ("max-score-picker", None)))
    return StackConfig(
        workdir=workdir,
        pods=len(pod_ports),
        ports=free_stack_ports(len(pod_ports)),
        pod_ports=pod_ports,
        picker_config=picker_config,
        sim_args=["--sim-time-scale", "0.5"],  # about 4.5 ms an output token
        auth=Example.read(QUICKSTART).auth,
    )


def with_routes(stack: LocalStack, redis_address: str) -> LocalStack:
    with stack.pool_path.open("a") as f:  # before start: the picker reads it once it starts
        f.write("---\n" + yaml.safe_dump_all(objects(redis_address)))
    return stack


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(require_redis_server(), free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis):
    tmp = tmp_path_factory.mktemp("ratelimits")
    s = with_routes(LocalStack(stack_config(tmp / "a", [free_port()])), redis.address)
    s.start()
    yield s
    s.stop()


def ask(
    stack: LocalStack,
    model: str,
    *,
    key: str = ALICE,
    prompt: str = PROMPT,
    headers: dict | None = None,
    session: requests.Session | None = None,
    **body,
) -> requests.Response:
    return (session or requests).post(
        stack.url + "/v1/completions",
        headers={"authorization": f"Bearer {key}", **(headers or {})},
        json={"model": model, "prompt": prompt, "max_tokens": 1, **body},
        timeout=30,
    )


def denied(r: requests.Response, message: str) -> int | None:
    """A 429 in OpenAI's error format naming the limit; its Retry-After, if any."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == 429 and error["type"] == "TooManyRequests", error
    assert message in error["message"], error["message"]
    retry = r.headers.get("retry-after")
    return None if retry is None else int(retry)


def test_input_tokens_are_admitted_exactly_until_the_budget_is_spent(stack):
    assert T == 17 and len(PROMPT) // 4 == 12  # the estimate would be wrong by 5 a request
    t0 = time.monotonic()
    for _ in range(5):
        r = ask(stack, "input-limited")
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == T  # the pod counts as the picker does
        assert r.json()["model"] == "input-limited"
    # 3 tokens left (and at 88 a minute, under 1.5 more a second): a sixth PROMPT is refused,
    retry = denied(
        ask(stack, "input-limited"),
        f"token rate limit exceeded: {INPUT_BUDGET} input tokens per minute "
        "(ModelRoute input-limited)",
    )
    elapsed = time.monotonic() - t0
    rate = INPUT_BUDGET / 60
    # …told to come back when the bucket holds 17: (17 - 3 - what refilled) / rate seconds.
    longest = math.ceil((T - 3) / rate)
    shortest = math.ceil((T - 3 - rate * elapsed) / rate)
    assert shortest <= retry <= longest, (retry, elapsed)
    assert elapsed < 5  # so fewer than 8 tokens refilled: still no room for a PROMPT
    # …but a 2-token prompt fits in what is left: the budget is exact to the token.
    assert prompt_tokens("hi") == 2
    assert ask(stack, "input-limited", prompt="hi").status_code == 200
    # A prompt larger than the whole budget can never pass: 429 without Retry-After.
    huge = PROMPT + " eleven" * INPUT_BUDGET
    retry = denied(
        ask(stack, "input-limited", prompt=huge),
        f"request has {prompt_tokens(huge)} input tokens, more than the limit of "
        f"{INPUT_BUDGET} input tokens per minute",
    )
    assert retry is None


def test_per_user_budgets_follow_the_verified_user(stack):
    for key in (ALICE, BOB):
        for _ in range(2):
            r = ask(stack, "per-user", key=key)
            assert r.status_code == 200, r.text
        message = f"{PER_USER_BUDGET} input tokens per minute (ModelRoute per-user)"
        assert denied(ask(stack, "per-user", key=key), message) is not None
        # Naming another user does not help: Envoy replaces the header with the key's user.
        denied(ask(stack, "per-user", key=key, headers={USER: "carol"}), message)
    # Without a key Envoy answers 401 and the picker never counts the request.
    r = requests.post(
        stack.url + "/v1/completions",
        headers={USER: "carol"},
        json={"model": "per-user", "prompt": PROMPT, "max_tokens": 1},
        timeout=30,
    )
    assert r.status_code == 401


def sse_events(r: requests.Response) -> list[str]:
    return [line[6:].decode() for line in r.iter_lines() if line.startswith(b"data: ")]


def test_output_tokens_are_charged_from_usage_streamed_or_not(stack):
    """20 output tokens a minute; each answer is 8 tokens (ignore_eos). Only with all three
    charged is the bucket in debt (20 - 24 = -4) and the fourth request refused: if the stream
    that did not ask for usage went uncharged, 4 tokens would be left and it would pass."""
    import openai

    answer = {"max_tokens": 8, "ignore_eos": True}
    headers = {"authorization": f"Bearer {ALICE}"}
    # 1. A streamed chat without stream_options: charged, and no usage event reaches the client.
    with requests.post(
        stack.url + "/v1/chat/completions",
        headers=headers,
        json={
            "model": "output-limited",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            **answer,
        },
        stream=True,
        timeout=30,
    ) as r:
        assert r.status_code == 200, r.text
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 8
    assert all("usage" not in c and c["choices"] for c in chunks), chunks[-2:]
    # 2. A client that asks for usage gets it, in the last chunk, as OpenAI sends it.
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=ALICE, max_retries=0)
    streamed = list(
        client.completions.create(
            model="output-limited",
            prompt="hi",
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == 8
    # 3. Not streamed: 8 more, 4 tokens of debt. Then 4 is refused until the debt is repaid.
    r = ask(stack, "output-limited", **answer)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    retry = denied(
        ask(stack, "output-limited"),
        f"token rate limit exceeded: {OUTPUT_BUDGET} output tokens per minute "
        "(ModelRoute output-limited)",
    )
    # From -4 to the 1 token a request needs at 20 a minute: 15 s, less what refilled since.
    assert 13 <= retry <= 15, retry


def test_a_client_that_leaves_mid_stream_is_charged_for_what_it_got(stack):
    """No usage event comes when the client hangs up mid-answer; the picker charges the
    events that passed (one a token), so hanging up does not dodge an output limit."""
    (pod,) = stack.pod_addresses
    aborted = pod_metric(pod, ABORTED)
    body = {"model": "output-leaver", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}
    with requests.post(
        stack.url + "/v1/completions",
        headers={"authorization": f"Bearer {ALICE}"},
        json={**body, "stream": True},
        stream=True,
        timeout=30,
    ) as r:
        assert r.status_code == 200, r.text
        got = 0
        for line in r.iter_lines():
            got += line.startswith(b"data: {")
            if got == 40:
                break  # and hang up, some 4 s before the answer would end
    deadline = time.monotonic() + 5
    while pod_metric(pod, ABORTED) == aborted:
        assert time.monotonic() < deadline, "the pod never saw the client leave"
        time.sleep(0.05)
    retry = denied(
        ask(stack, "output-leaver"),
        f"token rate limit exceeded: {OUTPUT_BUDGET} output tokens per minute "
        "(ModelRoute output-leaver)",
    )
    # The 40 tokens the client read were charged (less the one the count may be short): from
    # 20 - 39 = -19 back to the 1 token a request needs, at 20 a minute, is a minute or more.
    # Uncharged, the budget would be whole and this request would pass.
    assert retry >= 60, retry


ABORTED = 'vllm:request_success_total{engine="0",finished_reason="abort"'


def pod_metric(address: str, prefix: str) -> float:
    text = requests.get(f"http://{address}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def hammer(stacks: list[LocalStack], model: str, seconds: float, threads_each: int = 4):
    """Requests from `threads_each` threads per stack, all at once, for `seconds`; returns
    the statuses each stack answered ({status: count} per stack) and the wall time."""
    statuses: list[Counter] = [Counter() for _ in stacks]
    lock = threading.Lock()
    start = threading.Barrier(len(stacks) * threads_each + 1)

    def run(i: int) -> None:
        with requests.Session() as session:
            start.wait()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                status = ask(stacks[i], model, session=session).status_code
                with lock:
                    statuses[i][status] += 1

    workers = [
        threading.Thread(target=run, args=(i,))
        for i in range(len(stacks))
        for _ in range(threads_each)
    ]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.monotonic()
    for w in workers:
        w.join()
    return statuses, time.monotonic() - t0


def picker_metric(stack: LocalStack, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics", timeout=5)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.fixture(scope="module")
def second(stack, redis, tmp_path_factory):
    """Another Envoy and picker over the same pod, with the same routes."""
    tmp = tmp_path_factory.mktemp("ratelimits-b")
    s = with_routes(LocalStack(stack_config(tmp / "b", stack.pod_ports)), redis.address)
    try:
        s.start_picker()
        s.start_envoy()
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()  # its picker and Envoy: the pod is the first stack's


def test_two_pickers_sharing_a_redis_limit_stay_within_it(stack, second, redis):
    both = [stack, second]
    for s in both:  # a first request on each: TLS to the picker, tokenizer, Redis connection
        assert ask(s, "warm-up").status_code == 200
    window = 1.5
    rate = SHARED_BUDGET / 60
    statuses, elapsed = hammer(both, "shared", window)
    admitted = [c[200] for c in statuses]
    # Everything the two pickers let through fits in the budget plus what refilled meanwhile
    # (under one PROMPT's worth), and the budget was spent, not left over.
    assert sum(admitted) * T <= SHARED_BUDGET + rate * elapsed, (statuses, elapsed)
    assert sum(admitted) == SHARED_BUDGET // T, statuses
    # Both were hammered and both refused: each picker's own share of a separate budget would
    # have let it admit ten.
    assert all(set(c) <= {200, 429} and c[429] > 0 for c in statuses), statuses
    for s in both:  # Redis answered every time: nothing was let through by failing open
        assert picker_metric(s, "infergate_epp_ratelimit_backend_errors_total") == 0
        assert picker_metric(s, "infergate_epp_ratelimit_failure_mode_allowed_total") == 0

    # The same limit kept in each picker: each spends a whole budget, so twice as much gets
    # through, which the bound above would have caught.
    statuses, elapsed = hammer(both, "separate", window)
    admitted = [c[200] for c in statuses]
    assert admitted == [SHARED_BUDGET // T] * 2, statuses
    assert sum(admitted) * T > SHARED_BUDGET + rate * elapsed
