"""What the trace benchmarks send: the served model, open-loop arrival times, request bodies.

Bodies stream with a final usage chunk (prompt and cached tokens) and ignore EOS, so an answer
is exactly `max_tokens` long whatever the model writes.
"""

from __future__ import annotations

import random

MODEL = "infergate-sim"
# Two-letter syllables: about 1.5 tokens a word with the simulator's bundled tokenizer.
SYLLABLES = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar")]

_STREAMED = {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def poisson(rng: random.Random, rate: float, duration: float) -> list[float]:
    """Arrival offsets of a Poisson stream of `rate` per second, up to `duration` seconds."""
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


def completion(prompt: str, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **_STREAMED}


def chat(messages: list[dict], max_tokens: int) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **_STREAMED}
