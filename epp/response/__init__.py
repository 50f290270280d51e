"""The answer on its way back to the client: one framer (`chain.py`) feeds a chain of stages
that read usage (`usage.py`), remove the usage event the picker asked for (`strip_usage.py`)
and give the client back the model name it asked for (`rewrite.py`); a Responses API answer's
ids are stamped with the pod that stored it (`ids.py`)."""

from __future__ import annotations

from infergw.epp.response.chain import MAX_HELD, Bytes, ResponseChain, Stage
from infergw.epp.response.rewrite import ModelNameRewriter
from infergw.epp.response.strip_usage import UsageEventStripper
from infergw.epp.response.usage import Usage, UsageReader

__all__ = ["MAX_HELD", "Bytes", "ResponseChain", "Usage", "UsageReader", "response_chain"]


def response_chain(
    streaming: bool,
    *,
    strip_usage: bool = False,
    served: str = "",
    asked: str = "",
    extra: Stage | None = None,
) -> tuple[ResponseChain, UsageReader]:
    """The chain one answer needs, and its usage reader (read it after `flush`). Usage is
    always read; the usage event is removed only from a stream the picker asked it of; the
    model name is rewritten when the engine serves it under another name (`served`);
    `extra` edits too (the Responses API's ids: `ids.py`)."""
    usage = UsageReader(streaming)
    stages: list[Stage] = [usage]  # first: it reads what the engine sent
    if strip_usage and streaming:
        stages.append(UsageEventStripper())
    if extra is not None:
        stages.append(extra)
    if served != asked:
        stages.append(ModelNameRewriter(served, asked))  # last: it may hold a tail back
    return ResponseChain(stages, streaming), usage
