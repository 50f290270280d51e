"""One generation request as the engine sees it."""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass, field

from infergw.simulator.block_pool import Block


class Status(enum.Enum):
    WAITING = "waiting"
    # Blocks allocated, KV being pulled from a prefill pod (vLLM's WAITING_FOR_REMOTE_KVS).
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RemotePrefill:
    """Where a decode leg's KV waits: the prefill pod's kv_transfer_params."""

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: list[int]
    started: bool = False  # one pull per request, as vLLM clears do_remote_prefill after it


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    seed: int | None = None
    # Characters a stream holds back because a stop string may still cut them (vLLM's
    # stop_buffer_length): the longest stop string minus one.
    stop_buffer: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.stop_buffer = max(map(len, self.stop), default=1) - 1


@dataclass(slots=True)
class TokenOutput:
    """What the engine hands the API layer after each step that sampled a token."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    # The stop string or stop token id that ended the request; None for EOS and the rest.
    stop_reason: str | int | None = None


@dataclass(slots=True, eq=False)
class SimRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    rng: random.Random
    lora_id: int | None = None
    lora_name: str | None = None
    lora_path: str | None = None  # vLLM hashes the adapter's path into its blocks
    # Salts the first block's hash, as vLLM does: requests share blocks only with equal salts.
    cache_salt: str | None = None
    # Output length at which the simulated model emits EOS; None: never (a random-weight model).
    natural_len: int | None = None
    all_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    num_sent_chars: int = 0  # how much of output_text the outputs queue has carried
    block_hashes: list[bytes] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until then
    # Prompt tokens this request computed and wrote to the prefix cache; None until its
    # prefill ends (the usage's created_cache_tokens).
    num_created_cache_tokens: int | None = None
    num_preemptions: int = 0
    num_local_hit_tokens: int = 0  # prefix-cache hit in this pod at first admission
    num_external_tokens: int = 0  # tokens whose KV came from a prefill pod
    # P/D: a prefill leg keeps its KV for a remote decode; a decode leg pulls it first.
    hold_kv: bool = False
    remote_prefill: RemotePrefill | None = None
    kv_transfer_params: dict | None = None  # what the response reports (prefill legs)
    error: str | None = None  # why the request failed, for the client
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    outputs: asyncio.Queue[TokenOutput] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_prefilling(self) -> bool:
        # Decoding means exactly one token (the last sampled one) lacks KV.
        return self.num_tokens - self.num_computed_tokens > 1
