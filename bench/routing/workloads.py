"""The routing benchmark's workloads, each a deterministic trace of timed requests.

A trace depends only on the workload, the rate, the duration and the seed — never on what a
router did — so every router sees the very same requests at the very same offsets.

- shared prefix: G groups × U users, a long group prefix and a short question (the shape of
  inference-perf's shared_prefix); completions.
- multi-turn chat: conversations start as a Poisson stream; each turn resends the whole
  history plus a new question after a think time (assistant turns are fixed text, so the
  trace does not depend on the answers; the pods still cache every earlier prompt); chat.
- no reuse: random prompts of the shared-prefix length, nothing in common; completions.

The production-shaped workloads (tenants, agentic, rag, mixed) live in their own modules;
`catalog.py` names them all. Every workload takes its arrival process (`arrivals.py`):
Poisson unless told otherwise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from infergw.bench.routing.arrivals import ArrivalProcess, Poisson
from infergw.bench.workload import SYLLABLES, chat, completion


def words(rng: random.Random, n: int) -> str:
    """n random words, about 1.5 tokens each with the simulator's tokenizer."""
    return " ".join(rng.choice(SYLLABLES) for _ in range(n))


def parameters(workload) -> dict:
    """A workload's name, the parameters it was made with and its arrival process, for the
    results: the scalar fields (not the text they drew, nor the seed of that text)."""
    hidden = {"name", "seed", "arrivals"}
    out = {"name": workload.name}
    for f in fields(workload):
        value = getattr(workload, f.name)
        if f.name not in hidden and isinstance(value, int | float | str):
            out[f.name] = value
    return out | workload.arrivals.describe()


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of n items by rank: the i-th most popular is drawn ∝ 1 / i^s."""
    return [1 / (i**s) for i in range(1, n + 1)]


@dataclass(slots=True, frozen=True)
class Arrival:
    at: float  # seconds after the run starts
    api: str  # "completions" or "chat"
    body: dict


@dataclass(slots=True)
class SharedPrefix:
    groups: int
    users: int
    prefix_words: int = 1200
    question_words: int = 8
    output_tokens: int = 16
    seed: int = 7
    arrivals: ArrivalProcess = field(default_factory=Poisson)
    name: str = "shared-prefix"
    prefixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.prefixes = [
            f"Group {g} context: {words(rng, self.prefix_words)}" for g in range(self.groups)
        ]

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        out = []
        for t in self.arrivals.times(rng, rate, duration):
            g, u = rng.randrange(self.groups), rng.randrange(self.users)
            question = " ".join(f"q{u}x{rng.randrange(1000)}" for _ in range(self.question_words))
            prompt = f"{self.prefixes[g]}\nUser {u} asks: {question}"
            out.append(Arrival(t, "completions", completion(prompt, self.output_tokens)))
        return out

    def describe(self) -> dict:
        return parameters(self)


@dataclass(slots=True)
class MultiTurn:
    turns: int = 6
    system_words: int = 150
    user_words: int = 120
    answer_words: int = 60
    think_s: float = 2.0  # mean pause between a conversation's turns
    output_tokens: int = 16
    arrivals: ArrivalProcess = field(default_factory=Poisson)
    name: str = "multi-turn"

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        """`rate` is turns per second overall: conversations start at rate / turns."""
        rng = random.Random(seed)
        out = []
        for c, start in enumerate(self.arrivals.times(rng, rate / self.turns, duration)):
            messages = [{"role": "system", "content": f"Chat {c}. {words(rng, self.system_words)}"}]
            t = start
            for turn in range(self.turns):
                if t >= duration:
                    break
                messages.append({"role": "user", "content": words(rng, self.user_words)})
                out.append(Arrival(t, "chat", chat(list(messages), self.output_tokens)))
                messages.append(
                    {
                        "role": "assistant",
                        "content": f"Answer {turn}: {words(rng, self.answer_words)}",
                    }
                )
                t += rng.expovariate(1 / self.think_s)
        out.sort(key=lambda a: a.at)
        return out

    def describe(self) -> dict:
        return parameters(self)


@dataclass(slots=True)
class NoReuse:
    prompt_words: int = 1200
    output_tokens: int = 16
    arrivals: ArrivalProcess = field(default_factory=Poisson)
    name: str = "no-reuse"

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        return [
            Arrival(
                t,
                "completions",
                completion(f"{i}: {words(rng, self.prompt_words)}", self.output_tokens),
            )
            for i, t in enumerate(self.arrivals.times(rng, rate, duration))
        ]

    def describe(self) -> dict:
        return parameters(self)
