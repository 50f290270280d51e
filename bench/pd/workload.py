"""The P/D benchmark's workload: a deterministic Poisson trace mixing two kinds of request.

- long-prompt: a long new prompt and a short answer (retrieval, summarising): prefill-heavy.
- decode-heavy: a short prompt and a long answer (chat, code): its time per output token is
  what prefill work sharing its engine's steps slows down.

Every prompt starts with its own tag, so no two share a KV block and prefix caching plays no
part; answers are exactly `max_tokens` long (`ignore_eos`). A trace depends only on the mix,
the rate, the duration and the seed, so both modes get the very same requests at the very
same offsets.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from infergw.bench.workload import SYLLABLES, completion, poisson

LONG, DECODE = "long-prompt", "decode-heavy"


@dataclass(slots=True, frozen=True)
class Request:
    at: float  # seconds after the run starts
    kind: str  # LONG or DECODE
    body: dict  # a streamed /v1/completions request


@dataclass(slots=True, frozen=True)
class Mix:
    long_share: float = 0.5
    long_prompt_words: int = 1300  # ~2,000 tokens
    long_output_tokens: int = 16
    decode_prompt_words: int = 100  # ~150 tokens
    decode_output_tokens: int = 128

    def trace(self, rate: float, duration: float, seed: int) -> list[Request]:
        rng = random.Random(seed)
        out = []
        for i, t in enumerate(poisson(rng, rate, duration)):
            long = rng.random() < self.long_share
            words = self.long_prompt_words if long else self.decode_prompt_words
            text = " ".join(rng.choice(SYLLABLES) for _ in range(words))
            prompt = f"Request {seed}-{i}: {text}"
            tokens = self.long_output_tokens if long else self.decode_output_tokens
            out.append(Request(t, LONG if long else DECODE, completion(prompt, tokens)))
        return out

    def describe(self) -> dict:
        return asdict(self)
