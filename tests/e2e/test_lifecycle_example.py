"""examples/lifecycle end to end, as `infergate up examples/lifecycle` runs it (the same
StackConfig.from_example, the example copied only to move its local S3 to a free port): the
stack starts moto's S3 server and uploads the model's files and the adapter, then the
standalone controllers, picker and Envoy, all real processes.

The walk of the README: idle → zero pods; a request → held by the picker while a pod starts,
its init container downloading the weights from the local S3 into the weights cache; 200,
the runtime sidecar having downloaded the adapter and loaded it through the engine's API; a
request for the adapter → 200 from the engine under the adapter's name; idle → zero pods
again; a cold request for the adapter → held, 200, nothing downloaded again. Each cold
request is streamed and its time from request to first token printed. The picker's
tokenizer is the model's own, from the same S3 prefix."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import requests

from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.object_store import moto_installed
from infergw.stack.pods import pool_pods
from infergw.stack.ports import free_port, free_stack_ports
from tests.paths import DEFAULT_MODEL, EXAMPLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not moto_installed(), reason="needs moto's S3 server (the dev extra)"),
]
POOL = "lifecycle"
ADAPTER = "tiny-sql"
IDLE_TO_ZERO = 60  # the example's 10 s window, the autoscaler's cycle (2 s here), a pod's stop


@pytest.fixture
def stack(tmp_path):
    example = Example.read(EXAMPLES / "lifecycle").with_changes(
        tmp_path / "example", object_store=f"http://127.0.0.1:{free_port()}"
    )
    cfg = StackConfig.from_example(
        example,
        tmp_path / "stack",
        free_stack_ports(1),
        # This machine's cache stays untouched; the autoscaler's cycle shortened (at zero it
        # looks every second whatever the interval).
        weights_cache_dir=tmp_path / "cache",
        controllers_args=["--autoscale-interval", "2"],
    )
    s = LocalStack(cfg)
    s.start()
    yield s
    s.stop()


def wait_for_zero(stack: LocalStack) -> None:
    deadline = time.monotonic() + IDLE_TO_ZERO
    while pool_pods(stack.pool_path, POOL) or stack.picker_endpoints():
        assert time.monotonic() < deadline, "the Model never went to zero pods"
        time.sleep(0.2)


def served_models(stack: LocalStack) -> set[str]:
    """Every model the picker has read from the pods' /v1/models."""
    return {m for e in stack.picker_endpoints().values() for m in e.get("models") or []}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    model: str | None  # as the streamed chunks name it
    text: str  # the tokens, or the error body
    first_token: float | None  # seconds from sending the request to the first streamed token
    took: float


def completion(stack: LocalStack, model: str) -> Answer:
    """A streamed completion, timed from the request to its first token and to its end."""
    t0 = time.monotonic()
    first, named, text = None, None, []
    body = {"model": model, "prompt": "select the rows", "max_tokens": 4, "stream": True}
    with requests.post(stack.url + "/v1/completions", json=body, stream=True, timeout=90) as r:
        if r.status_code != 200:
            return Answer(r.status_code, None, r.text, None, time.monotonic() - t0)
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line.removeprefix(b"data: "))
            if first is None:
                first = time.monotonic() - t0
            named = chunk.get("model", named)
            text += [c.get("text") or "" for c in chunk.get("choices") or []]
    return Answer(r.status_code, named, "".join(text), first, time.monotonic() - t0)


def test_the_lifecycle_example_downloads_loads_its_adapter_and_scales_from_zero(stack, tmp_path):
    store = stack.cfg.object_stores[0]
    listing = requests.get(f"{store.endpoint}/{store.bucket}?list-type=2", timeout=5).text
    assert "<Key>tiny/tokenizer.json</Key>" in listing
    assert f"<Key>{ADAPTER}/adapter_config.json</Key>" in listing

    # The picker tokenizes with the model's own files, fetched from the local S3 before it
    # started (nothing was downloaded yet to take them from).
    tokenizer = stack.cfg.workdir / "tokenizers" / POOL
    assert stack.plans[0].tokenizer_dir == tokenizer
    uploaded = (DEFAULT_MODEL / "tokenizer.json").read_bytes()  # object-store.yaml's upload
    assert (tokenizer / "tokenizer.json").read_bytes() == uploaded

    wait_for_zero(stack)  # idle → zero pods
    time.sleep(1)
    assert not pool_pods(stack.pool_path, POOL)

    cold = completion(stack, "tiny")  # held while a pod starts
    assert cold.status == 200, cold.text
    assert cold.model == "tiny" and cold.text and cold.first_token is not None
    print(
        f"\ncold start from S3: first token {cold.first_token:.2f}s after the request, "
        f"done in {cold.took:.2f}s"
    )
    assert len(pool_pods(stack.pool_path, POOL)) >= 1

    # The weights and the adapter came from the local S3 into the weights cache, each an
    # entry of its own, and the engine runs on the downloaded base.
    entries = sorted((tmp_path / "cache" / "entries").iterdir())
    assert len(entries) == 2, entries
    tokenizers = [e for e in entries if (e / "tokenizer.json").is_file()]
    adapters = [e for e in entries if (e / "adapter_config.json").is_file()]
    assert len(tokenizers) == 1 and len(adapters) == 1
    assert json.loads((adapters[0] / "adapter_config.json").read_text())["peft_type"] == "LORA"
    link = stack.cfg.workdir / "state" / "models" / "default" / POOL / "base"
    assert link.resolve() == tokenizers[0].resolve()

    # The sidecar loaded the adapter before the pod was ready; the picker reads it from the
    # pod's /v1/models within a scrape, then routes the adapter's requests.
    deadline = time.monotonic() + 15
    while ADAPTER not in served_models(stack):
        assert time.monotonic() < deadline, served_models(stack)
        time.sleep(0.2)
    warm = completion(stack, ADAPTER)
    assert warm.status == 200, warm.text
    assert warm.model == ADAPTER

    # Idle → zero again, after the window; a cold request for the adapter is held too, and
    # the new pod finds the weights and the adapter in the cache (no new entry).
    assert pool_pods(stack.pool_path, POOL)
    wait_for_zero(stack)
    cold = completion(stack, ADAPTER)
    assert cold.status == 200, cold.text
    assert cold.model == ADAPTER and cold.first_token is not None
    print(
        f"cold start of the adapter, from the cache: first token {cold.first_token:.2f}s "
        f"after the request, done in {cold.took:.2f}s"
    )
    assert sorted((tmp_path / "cache" / "entries").iterdir()) == entries
