"""Hostile request bodies, each with the path it is sent to: shared by the picker's and the
body-based router's tests (both parse bodies with epp/request_body.py)."""

from __future__ import annotations

MESSAGE = b'[{"role":"user","content":"hi"}]'


def chat(messages: bytes = MESSAGE, model: bytes = b'"m"', extra: bytes = b"") -> bytes:
    return b'{"model":' + model + b',"messages":' + messages + extra + b"}"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HOSTILE = {
    # A lone UTF-16 surrogate, written as a JSON escape, wherever it is.
    "surrogate in the prompt": b'{"model":"m","prompt":"a\\ud800b"}',
    "surrogate in a message": chat(b'[{"role":"user","content":"\\udc00"}]'),
    "surrogate in the model": chat(model=b'"m\\ud800"'),
    "surrogate in another field": chat(extra=b',"user":"\\ud800"'),
    "surrogate ending a string": chat(extra=b',"x":["\\ud83d"]'),
    "invalid UTF-8": chat(extra=b',"x":"\xff\xfe"'),
    "5000-digit integer in another field": chat(extra=b',"seed":' + b"7" * 5000),
    "5000-digit negative integer in a list": chat(extra=b',"x":[-' + b"7" * 5000 + b"]"),
    "5000-digit max_tokens": chat(extra=b',"max_tokens":' + b"7" * 5000),
    "400-digit max_tokens": chat(extra=b',"max_tokens":' + b"7" * 400),
    "negative max_tokens": chat(extra=b',"max_tokens":-5'),
    "zero max_completion_tokens": chat(extra=b',"max_completion_tokens":0'),
    "absurd max_output_tokens": chat(extra=b',"max_output_tokens":1000000000000000000'),
    "float max_tokens": chat(extra=b',"max_tokens":1e18'),
    "prompt nested 100,000 deep": b'{"model":"m","prompt":' + nested(100_000) + b"}",
    "messages nested 100,000 deep": chat(nested(100_000)),
    "another field nested 100,000 deep": chat(extra=b',"x":' + nested(100_000)),
    "model name written with escapes": b'{"mod\\u0065l":"m","messages":' + MESSAGE + b"}",
    # Twice: the engine may read another copy than the picker routed (and a rewrite changed).
    "model twice": chat(extra=b',"model":"m"'),
    "model twice, the second with escapes": chat(extra=b',"mod\\u0065l":"m"'),
    "model twice, the first with escapes": b'{"mod\\u0065l":"x","model":"m","messages":'
    + MESSAGE
    + b"}",
    "stream_options twice, one with escapes": chat(
        extra=b',"stream":true,"stream_options":{},"stream_optio\\u006Es":{"include_usage":null}'
    ),
    "empty messages": chat(b"[ ]"),
    "stream_options not an object": chat(extra=b',"stream":true,"stream_options":"yes"'),
}
PATHS = {
    "surrogate in the prompt": "/v1/completions",
    "prompt nested 100,000 deep": "/v1/completions",
}


def path_of(name: str) -> str:
    return PATHS.get(name, "/v1/chat/completions")
