"""The answers of vLLM's non-generating APIs the gateway routes: `/v1/rerank` and `/v1/score`
(a cross-encoder's; here the relevance of two texts is the overlap of their words, so it is
deterministic and a matching document ranks first) and `/v1/audio/transcriptions` (a canned
text: no audio model runs). Token counts are the tokenizer's."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from infergw.simulator.protocol import ApiError
from infergw.simulator.responses import now

TRANSCRIPT = "The quick brown fox jumps over the lazy dog."
_WORD = re.compile(r"\w+")

Count = Callable[[str], int]  # a text's tokens


def relevance(query: str, document: str) -> float:
    """The share of the two texts' distinct words they have in common, in 0..1."""
    a, b = set(_WORD.findall(query.lower())), set(_WORD.findall(document.lower()))
    return len(a & b) / len(a | b) if a | b else 0.0


def _texts(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, f"'{key}' must be a string or a non-empty list of strings", key)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def rerank(body: Any, model: str, count: Count) -> dict:
    """vLLM's rerank answer (Jina/Cohere style): documents by relevance, best first."""
    body = _object(body)
    query = body.get("query")
    if not isinstance(query, str):
        raise ApiError(400, "'query' must be a string", "query")
    documents = _texts(body, "documents")
    top_n = body.get("top_n") or len(documents)
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise ApiError(400, "'top_n' must be a non-negative integer", "top_n")
    results = [
        {"index": i, "document": {"text": d}, "relevance_score": relevance(query, d)}
        for i, d in enumerate(documents)
    ]
    results.sort(key=lambda r: -r["relevance_score"])
    tokens = sum(count(query) + count(d) for d in documents)
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": results[:top_n],
    }


def score(body: Any, model: str, count: Count) -> dict:
    """vLLM's score answer: text_1 against each of text_2 (one text_1 for all, or pairwise)."""
    body = _object(body)
    firsts, seconds = _texts(body, "text_1"), _texts(body, "text_2")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ApiError(400, "'text_1' and 'text_2' must be as long, or 'text_1' one text", "text_1")
    pairs = list(zip(firsts, seconds, strict=True))
    tokens = sum(count(a) + count(b) for a, b in pairs)
    return {
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": now(),
        "model": model,
        "data": [
            {"index": i, "object": "score", "score": relevance(a, b)}
            for i, (a, b) in enumerate(pairs)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None},
    }  # fmt: skip


def transcription(response_format: str | None) -> tuple[str, str]:
    """The canned transcript as (content type, body) in the requested format."""
    if response_format in (None, "", "json", "verbose_json"):
        return "application/json", json.dumps({"text": TRANSCRIPT})
    if response_format == "text":
        return "text/plain", TRANSCRIPT
    raise ApiError(400, f"response_format {response_format!r} is not supported", "response_format")
