"""Agent sessions: a task, then rounds of a short model turn (a tool call) and a long tool
output appended to the history, each round one more request (chat).

Every request of a session extends the previous one, so its whole history is a cached prefix
on the pod that served the last turn — only the newest model turn and tool output are new.
Tool outputs vary a lot in length (a file, a search result, an error); between turns the
tool runs. Model turns are fixed text, so the trace does not depend on the answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from infergw.bench.routing.arrivals import ArrivalProcess, Poisson
from infergw.bench.routing.workloads import Arrival, parameters, words
from infergw.bench.workload import chat


@dataclass(slots=True)
class Agentic:
    turns: int = 6  # requests per session
    system_words: int = 300  # the agent's instructions and tool descriptions
    task_words: int = 50
    call_words: int = 25  # the model's turn: which tool, with what
    # Tool outputs of 60-300 words; six turns stay under ~3,000 tokens, inside the pods'
    # 4,096-token limit with room to spare.
    min_tool_words: int = 60
    max_tool_words: int = 300
    tool_s: float = 1.0  # mean time the tool (and the agent's loop) takes between turns
    output_tokens: int = 16
    arrivals: ArrivalProcess = field(default_factory=Poisson)
    name: str = "agentic"

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        """`rate` is requests per second overall: sessions start at rate / turns."""
        rng = random.Random(seed)
        out = []
        for s, start in enumerate(self.arrivals.times(rng, rate / self.turns, duration)):
            messages = [
                {"role": "system", "content": f"Agent {s}. {words(rng, self.system_words)}"},
                {"role": "user", "content": words(rng, self.task_words)},
            ]
            t = start
            for turn in range(self.turns):
                if t >= duration:
                    break
                out.append(Arrival(t, "chat", chat(list(messages), self.output_tokens)))
                call = f"call_{s}_{turn}"
                tool_words = rng.randint(self.min_tool_words, self.max_tool_words)
                messages += [
                    {"role": "assistant", "content": f"{call}: {words(rng, self.call_words)}"},
                    {"role": "tool", "tool_call_id": call, "content": words(rng, tool_words)},
                ]
                t += rng.expovariate(1 / self.tool_s)
        out.sort(key=lambda a: a.at)
        return out

    def describe(self) -> dict:
        return parameters(self)
