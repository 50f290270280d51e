"""A validated generation request turned into the engine's SimRequest: the context-length
checks, the seeded output length, and the P/D leg its kv_transfer_params ask for."""

from __future__ import annotations

import hashlib
import logging
import random

from infergw.simulator import responses
from infergw.simulator.config import SimulatorConfig
from infergw.simulator.kv_transfer import KVTransfer, parse_remote_prefill
from infergw.simulator.protocol import ApiError, GenerationRequest
from infergw.simulator.request import SamplingParams, SimRequest
from infergw.simulator.served_models import LoraAdapter

# The name operators already filter on: these lines came from the HTTP module.
log = logging.getLogger("simulator.server")


def context_too_long(limit: int, tokens: str, param: str) -> ApiError:
    """vLLM's 400 for a prompt that leaves no room to generate."""
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, your request has "
        f"{tokens} input tokens. Please reduce the length of the input messages.",
        param,
    )


class RequestBuilder:
    def __init__(self, cfg: SimulatorConfig, max_model_len: int, kv: KVTransfer) -> None:
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.kv = kv

    def build(self, gen: GenerationRequest, lora: LoraAdapter | None, ids: list[int]) -> SimRequest:
        n = len(ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty after tokenization", "prompt")
        # max_model_len is at most what the KV cache holds (server._fit_to_cache), so these
        # checks also refuse a request the cache could never finish.
        limit = self.max_model_len
        if n >= limit:
            raise context_too_long(limit, str(n), "messages" if gen.messages else "prompt")
        max_tokens = gen.max_tokens if gen.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ApiError(
                400,
                f"'max_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {limit} tokens and your request has {n} input "
                f"tokens ({max_tokens} > {limit} - {n}).",
                "max_tokens",
            )
        # Same seed, prompt and request seed give the same output, like greedy decoding.
        digest = hashlib.blake2b(
            repr((self.cfg.seed, gen.seed, ids)).encode(), digest_size=8
        ).digest()
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=gen.min_tokens,
            stop=gen.stop,
            stop_token_ids=gen.stop_token_ids,
            ignore_eos=gen.ignore_eos,
            seed=gen.seed,
        )
        rng = random.Random(int.from_bytes(digest, "big"))
        mean = self.cfg.output_len_mean
        req = SimRequest(
            natural_len=1 + int(rng.expovariate(1 / mean)) if mean > 0 else None,
            request_id=responses.new_id(False),
            prompt_token_ids=ids,
            params=params,
            rng=rng,
            lora_id=lora.lora_id if lora else None,
            lora_name=lora.name if lora else None,
            lora_path=lora.path if lora else None,
            cache_salt=gen.cache_salt,
        )
        # Without a KV connector configured, vLLM ignores kv_transfer_params (the prefill leg
        # gets null back and its blocks are freed as usual).
        if gen.kv_transfer_params and self.cfg.kv_transfer.connector:
            self._apply_kv_transfer_params(req, gen.kv_transfer_params)
        return req

    def _apply_kv_transfer_params(self, req: SimRequest, params: dict) -> None:
        """Mark a prefill leg (keep the KV for a remote decode) or a decode leg (pull it)."""
        req.hold_kv = bool(params.get("do_remote_decode"))
        if params.get("do_remote_prefill"):
            req.remote_prefill = parse_remote_prefill(params)
            if req.remote_prefill is None:
                # vLLM's NixlConnector: a warning, and the prompt is computed here.
                log.warning(
                    "invalid kv_transfer_params %s (a decode leg needs remote_block_ids, "
                    "remote_engine_id, remote_request_id, remote_host and remote_port): "
                    "computing the prompt locally",
                    params,
                )
        self.kv.note_leg(prefill_leg=req.hold_kv, decode_leg=req.remote_prefill is not None)
