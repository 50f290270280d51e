"""Retrieval-augmented prompts: k document chunks from a shared pool, then a question
(completions).

Chunks are drawn with Zipf popularity (some documents answer many questions) and without
repeats, in the order drawn — so popular chunks tend to come first, but two prompts that
share chunks rarely share their order. A pod can reuse a prompt's cached prefix only up to
the first chunk where it differs from an earlier prompt: reuse is partial, unlike a shared
system prompt, and a router that matches whole prompts or only the first block misjudges it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import accumulate

from infergw.bench.routing.arrivals import ArrivalProcess, Poisson
from infergw.bench.routing.workloads import Arrival, parameters, words, zipf_weights
from infergw.bench.workload import completion

INSTRUCTION = "Answer the question from the documents below.\n"
CHUNK_LABEL = re.compile(r"^\[doc (\d+)\]", re.MULTILINE)


@dataclass(slots=True)
class Rag:
    chunks: int = 80  # the pool the retriever draws from
    k: int = 6  # chunks per prompt
    zipf_s: float = 1.0  # popularity of the i-th chunk ∝ 1 / i^s
    # 6 × 150 words ≈ 1,400 tokens a prompt, like shared-prefix's prompts.
    chunk_words: int = 150
    question_words: int = 15
    output_tokens: int = 16
    seed: int = 7  # draws the chunks' text; the trace's seed draws the traffic
    arrivals: ArrivalProcess = field(default_factory=Poisson)
    name: str = "rag"
    pool: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.pool = [f"[doc {i}] {words(rng, self.chunk_words)}" for i in range(self.chunks)]

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        cum = list(accumulate(zipf_weights(self.chunks, self.zipf_s)))
        out = []
        for t in self.arrivals.times(rng, rate, duration):
            picked: list[int] = []
            while len(picked) < self.k:
                (c,) = rng.choices(range(self.chunks), cum_weights=cum)
                if c not in picked:
                    picked.append(c)
            docs = "\n".join(self.pool[c] for c in picked)
            prompt = f"{INSTRUCTION}{docs}\nQuestion: {words(rng, self.question_words)}?"
            out.append(Arrival(t, "completions", completion(prompt, self.output_tokens)))
        return out

    def describe(self) -> dict:
        return parameters(self)


def chunks_of(prompt: str) -> list[int]:
    """The pool indices of a rag prompt's chunks, in prompt order."""
    return [int(m) for m in CHUNK_LABEL.findall(prompt)]
