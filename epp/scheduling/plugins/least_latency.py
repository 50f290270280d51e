"""least-latency-scorer: the lowest expected latency from what each pod's recent answers took.

Expected latency = TTFT + TPOT × expected output tokens (the request's max_tokens, capped by
`maxOutputTokens`). Both come from exponentially weighted averages the picker keeps per
endpoint from responses it has seen. A pod with no history scores 1, so it gets tried.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from infergw.epp.scheduling.framework import Scorer
from infergw.epp.scheduling.params import MAX_TOKENS, PluginParams, parse_params
from infergw.epp.scheduling.plugins._normalize import lower_is_better


class LeastLatencyParams(PluginParams):
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] = 256


class LeastLatencyScorer(Scorer):
    type_name = "least-latency-scorer"
    params_type = LeastLatencyParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.max_output = parse_params(self.params_type, self.params).max_output_tokens

    def score(self, ctx, endpoints):
        out = min(ctx.request.max_tokens or self.max_output, self.max_output)
        known = [e for e in endpoints if e.ttft_ewma is not None]
        if not known:
            return [1.0] * len(endpoints)
        expected = {e.address: e.ttft_ewma + (e.tpot_ewma or 0.0) * out for e in known}
        scores = dict(zip(expected, lower_is_better(list(expected.values())), strict=True))
        return [scores.get(e.address, 1.0) for e in endpoints]
