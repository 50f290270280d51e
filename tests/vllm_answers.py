"""The request kinds whose answers the simulator must shape as vLLM 0.32 does, and how to
record them: the drift test sends the same kinds to the simulator and compares.

Recording against a real vLLM (see tests/fixtures/vllm-cpu-tiny/README.md for how to start
one with the fixture's model and flags, plus --enable-prompt-tokens-details):

    python -m tests.vllm_answers http://127.0.0.1:8391 > tests/fixtures/vllm-cpu-tiny/answers.jsonl
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import requests

# Long enough to fill several 32-token blocks, so a repeat shows cached and created tokens.
_LONG = "Summarise the design of a paged KV cache. " + " ".join(f"page{i}" for i in range(90))
_CHAT = [{"role": "user", "content": _LONG}]
# ignore_eos: a random-weight model may sample EOS at once; every kind runs to max_tokens.
_BASE = {"model": "tiny", "max_tokens": 4, "ignore_eos": True}


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


KINDS = [
    Kind("completion", "/v1/completions", {**_BASE, "prompt": _LONG}),
    Kind(
        "completion_token_ids",
        "/v1/completions",
        {**_BASE, "prompt": _LONG, "return_token_ids": True},
    ),
    Kind("completion_stream", "/v1/completions", {**_BASE, "prompt": _LONG, "stream": True}),
    Kind(
        "completion_stream_usage_token_ids",
        "/v1/completions",
        {
            **_BASE,
            "prompt": _LONG,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    ),
    Kind("chat", "/v1/chat/completions", {**_BASE, "messages": _CHAT}),
    Kind(
        "chat_token_ids",
        "/v1/chat/completions",
        {**_BASE, "messages": _CHAT, "return_token_ids": True},
    ),
    Kind("chat_stream", "/v1/chat/completions", {**_BASE, "messages": _CHAT, "stream": True}),
    Kind(
        "chat_stream_usage",
        "/v1/chat/completions",
        {**_BASE, "messages": _CHAT, "stream": True, "stream_options": {"include_usage": True}},
    ),
    Kind(
        "chat_stream_usage_token_ids",
        "/v1/chat/completions",
        {
            **_BASE,
            "messages": _CHAT,
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    ),
    Kind(
        "chat_prompt_text",
        "/v1/chat/completions",
        {**_BASE, "messages": _CHAT, "return_prompt_text": True},
    ),
]


def answer(base_url: str, kind: Kind) -> dict[str, Any]:
    """One exchange: {"kind", "body"} for a plain answer, {"kind", "chunks"} for a stream."""
    r = requests.post(base_url + kind.path, json=kind.body, timeout=120, stream=kind.stream)
    r.raise_for_status()
    if not kind.stream:
        return {"kind": kind.name, "body": r.json()}
    chunks = []
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(json.loads(line[6:]))
    return {"kind": kind.name, "chunks": chunks}


def record(base_url: str) -> list[dict[str, Any]]:
    # The kinds run in order on a fresh server: the first prompt is computed, every later
    # one repeats it and hits the prefix cache.
    return [answer(base_url, kind) for kind in KINDS]


if __name__ == "__main__":
    for exchange in record(sys.argv[1]):
        print(json.dumps(exchange))
