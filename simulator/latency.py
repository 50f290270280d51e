"""How long an engine step takes: the simulator's stand-in for a GPU's forward pass.

Two ways to combine the terms (latency_profiles.py names sets of values for them):

- additive (roofline False, the simulator's original model): overhead + prefill tokens ×
  per-token prefill time + (if any sequence decodes) a decode step + batch × per-sequence time.
- roofline (True): a forward pass is bound by compute or by HBM bandwidth, whichever is
  slower. Compute: every scheduled token (prompt or decode) runs through the matmuls, plus
  the attention between each new token and the tokens before it. Memory: the weights are
  read once per step, plus the KV of every token the batch attends to. So a decode step is
  flat while the weight read dominates, then grows with batch and context.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one engine step computes, as the latency model needs it."""

    prefill_tokens: int = 0  # prompt tokens computed this step (all chunks)
    decode_seqs: int = 0  # sequences sampling their next token
    # Tokens whose KV the step reads: each scheduled sequence's tokens computed before it.
    context_tokens: int = 0
    # (new token, earlier-or-same token) pairs attention scores: the quadratic prompt term.
    attention_pairs: int = 0


def attention_pairs(new_tokens: int, context: int) -> int:
    """Causal attention pairs of `new_tokens` appended after `context` computed tokens."""
    return new_tokens * context + new_tokens * (new_tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Step time of a continuous-batching engine. A KV pull from a prefill pod runs beside the
    steps (asynchronously, as NIXL's does)."""

    prefill_s_per_token: float = 60e-6
    decode_s_per_step: float = 8e-3  # roofline: the weight read of every step
    decode_s_per_seq: float = 0.15e-3  # roofline: one decode token's matmul compute
    step_overhead_s: float = 1e-3
    kv_read_s_per_token: float = 0.0  # reading one context token's KV
    attention_s_per_pair: float = 0.0  # attention compute for one (query, key) pair
    roofline: bool = False
    kv_transfer_s_per_block: float = 0.1e-3
    time_scale: float = 1.0

    def step_seconds(self, prefill_tokens: int, decode_seqs: int) -> float:
        return self.work_seconds(StepWork(prefill_tokens, decode_seqs))

    def work_seconds(self, work: StepWork) -> float:
        compute = (
            work.prefill_tokens * self.prefill_s_per_token
            + work.attention_pairs * self.attention_s_per_pair
        )
        decode = work.decode_seqs * self.decode_s_per_seq
        memory = work.context_tokens * self.kv_read_s_per_token
        if self.roofline:
            # The weights are read whatever the step computes.
            t = max(compute + decode, self.decode_s_per_step + memory)
        else:
            t = compute + memory
            if work.decode_seqs:
                t += self.decode_s_per_step + decode
        return (self.step_overhead_s + t) * self.time_scale

    def transfer_seconds(self, num_blocks: int) -> float:
        return num_blocks * self.kv_transfer_s_per_block * self.time_scale
