"""The recorded real vLLM output of tests/fixtures/vllm-cpu-tiny as Python objects, and a parsed
request in its context as the picker hands it to the KV cache."""

from __future__ import annotations

import base64
import json

from infergw.epp.context import RequestContext
from infergw.epp.request import parse_request
from infergw.kvindex.events import decode_batch
from tests.paths import TINY


def recorded_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (TINY / name).read_text().splitlines() if line.strip()]


def recorded_batches():
    return [
        decode_batch(base64.b64decode(d["payload_b64"])) for d in recorded_lines("events.jsonl")
    ]


def request(path: str, body: dict) -> RequestContext:
    """A parsed request in its context, as the picker hands it to the KV cache."""
    return RequestContext(
        parse_request(path, json.dumps(body).encode(), {}, max_body_bytes=1 << 22)
    )
