"""Many tenants, each with its own long system prompt, sharing one fleet (chat).

A tenant's system prompt (its instructions, persona, few-shot examples) is the same in every
one of its requests; the user question after it is short and new. Tenants differ in prompt
length and, above all, in traffic: popularity is Zipf-distributed, so a few tenants send most
requests and a long tail sends a few each. A router that keeps each popular tenant on pods
that hold its prompt — without piling every request of the top tenant onto one pod — wins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from infergw.bench.routing.arrivals import ArrivalProcess, Poisson
from infergw.bench.routing.workloads import Arrival, parameters, words, zipf_weights
from infergw.bench.workload import chat


@dataclass(slots=True)
class Tenants:
    tenants: int = 40
    zipf_s: float = 1.1  # popularity of the i-th tenant ∝ 1 / i^s
    # System prompts of 300-1500 words (≈ 450-2,250 tokens): all but the longest few fit
    # two to a pod's 5,100-token cache, and every request fits the pods' 4,096-token limit.
    min_system_words: int = 300
    max_system_words: int = 1500
    question_words: int = 12
    output_tokens: int = 16
    seed: int = 7  # draws the tenants' prompts; the trace's seed draws the traffic
    arrivals: ArrivalProcess = field(default_factory=Poisson)
    name: str = "tenants"
    systems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.systems = [
            f"You are tenant {i}'s assistant. "
            + words(rng, rng.randint(self.min_system_words, self.max_system_words))
            for i in range(self.tenants)
        ]

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        weights = zipf_weights(self.tenants, self.zipf_s)
        out = []
        for t in self.arrivals.times(rng, rate, duration):
            (tenant,) = rng.choices(range(self.tenants), weights)
            messages = [
                {"role": "system", "content": self.systems[tenant]},
                {"role": "user", "content": words(rng, self.question_words) + "?"},
            ]
            out.append(Arrival(t, "chat", chat(messages, self.output_tokens)))
        return out

    def describe(self) -> dict:
        return parameters(self)
