"""A continuous-batching engine loop, timed by a latency model instead of a GPU.

Each step: schedule (running requests first, then waiting ones while sequences, token budget,
LoRA slots and KV blocks allow; preempt the newest running request when blocks run out), sleep
for the step's simulated duration, then advance every scheduled request and sample one token for
each that has all its KV computed. Time to first token is therefore queueing plus prefill of the
*uncached* prompt tokens, and time per output token grows with the batch.

P/D disaggregation (kv_transfer.py): a decode leg gets its blocks when admitted, then waits
outside the batch while its KV is pulled from a prefill pod (vLLM's WAITING_FOR_REMOTE_KVS);
the pull's transfer time replaces the prefill of those tokens. A prefill leg that ends
length-capped hands its blocks to the connector instead of freeing them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from infergw.simulator.block_hashing import BlockHasher
from infergw.simulator.block_pool import BlockPool, KVEvent
from infergw.simulator.kv_transfer import KVTransfer, KVTransferError
from infergw.simulator.latency import LatencyModel, StepWork, attention_pairs
from infergw.simulator.request import SimRequest, Status, TokenOutput
from infergw.simulator.stats import EngineStats

log = logging.getLogger("simulator.engine")

# Lateness the next step absorbs: timer rounding, not an overloaded process.
_CATCH_UP_S = 0.002


@dataclass(slots=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_loras: int


@dataclass(slots=True)
class _Step:
    scheduled: list[tuple[SimRequest, int]] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    attention_pairs: int = 0

    def work(self) -> StepWork:
        return StepWork(
            self.prefill_tokens, self.decode_seqs, self.context_tokens, self.attention_pairs
        )


class Engine:
    def __init__(
        self,
        pool: BlockPool,
        hasher: BlockHasher,
        limits: EngineLimits,
        latency: LatencyModel,
        token_texts: dict[int, str],
        publish_events: Callable[[list[KVEvent]], None] | None = None,
        eos_token_id: int | None = None,
        kv: KVTransfer | None = None,
    ) -> None:
        self.pool = pool
        self.hasher = hasher
        self.limits = limits
        self.latency = latency
        self._token_texts = token_texts
        self._token_pool = sorted(token_texts)
        self._eos = eos_token_id
        self._publish = publish_events
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        # Decode legs whose KV is being pulled, with the task pulling it.
        self.loading: dict[SimRequest, asyncio.Task] = {}
        self.kv = kv
        self.stats = EngineStats(max_model_len=limits.max_model_len)
        # Waiting requests the last schedule passed over for want of a LoRA slot.
        self._lora_deferred = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        if kv is not None:
            kv.on_release = self._wakeup.set  # blocks a prefill leg held are free again

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        for task in self.loading.values():
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, req: SimRequest) -> None:
        # A request needing more KV than the whole cache would preempt itself forever and
        # block the queue behind it (the server refuses it first). The last sampled token
        # never gets KV, hence the - 1.
        most = min(req.num_prompt_tokens + req.params.max_tokens, self.limits.max_model_len) - 1
        if self.pool.blocks_for(most) > self.pool.num_usable:
            raise ValueError(
                f"request {req.request_id} needs KV for {most} tokens; the KV cache holds "
                f"{self.pool.num_usable * self.pool.block_size}"
            )
        req.arrival_time = time.monotonic()
        self.hasher.extend(
            req.block_hashes, req.all_token_ids, req.lora_name, req.cache_salt, req.lora_path
        )
        self.waiting.append(req)
        self._wakeup.set()

    def abort(self, req: SimRequest) -> None:
        """The client went away: release everything the request holds."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif req.status is Status.WAITING_FOR_REMOTE_KVS:
            self.loading.pop(req).cancel()
        else:
            self.running.remove(req)
        r = req.remote_prefill
        if r is not None and self.kv is not None and req.num_external_tokens == 0:
            self.kv.release_remote(r)  # never pulled: the prefill pod may free the blocks
        self._finish(req, "abort", notify=False)
        self._wakeup.set()  # freed blocks may let a waiting request in

    def reset_prefix_cache(self) -> bool:
        ok = self.pool.reset_prefix_cache()
        self._flush_events()
        return ok

    @property
    def num_waiting(self) -> int:
        """Requests not running; vLLM counts those waiting for remote KV among them."""
        return len(self.waiting) + len(self.loading)

    def waiting_by_reason(self) -> dict[str, int]:
        """vLLM's split of num_waiting: 'deferred' by a transient constraint (no free LoRA
        slot, KV still being pulled), 'capacity' for the rest; the two sum to num_waiting."""
        deferred = min(self._lora_deferred, len(self.waiting)) + len(self.loading)
        return {"capacity": self.num_waiting - deferred, "deferred": deferred}

    def lora_adapters(self) -> tuple[set[str], set[str]]:
        running = {r.lora_name for r in self.running if r.lora_name}
        waiting = {r.lora_name for r in self.waiting if r.lora_name}
        return running, waiting

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self.waiting and not self.running:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = loop.time()
            try:
                step = self._schedule()
                self._flush_events()  # evictions happen while scheduling
                if not step.scheduled:
                    # Nothing fits until a request arrives or an abort frees blocks.
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                duration = self.latency.work_seconds(step.work())
                # Sleep to a deadline carried from step to step, so the event loop's ~1 ms
                # timer rounding does not add up; a start later than that is not caught up.
                if started - deadline > _CATCH_UP_S:
                    deadline = started
                deadline += duration
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                # Busy time beyond the model means this process could not keep up.
                self.stats.steps += 1
                self.stats.step_seconds_modeled += duration
                self.stats.step_seconds_busy += loop.time() - started
                self.stats.iteration_tokens.observe(sum(n for _, n in step.scheduled))
                self._complete(step)
                self._flush_events()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not silently hang every client: fail the batch loudly.
                log.exception("engine step failed; aborting %d running requests", len(self.running))
                for req in list(self.running):
                    self.running.remove(req)
                    self._finish(req, "error")

    def _schedule(self) -> _Step:
        step = _Step()
        budget = self.limits.max_num_batched_tokens
        now = time.monotonic()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.pool.allocate(req, req.num_computed_tokens + n, []):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                self._account(step, req, n)
                budget -= n
                i += 1

        active_loras = {r.lora_name for r in self.running if r.lora_name}
        skipped: list[SimRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            req = self.waiting.popleft()
            if (
                req.lora_name
                and req.lora_name not in active_loras
                and len(active_loras) >= self.limits.max_loras
            ):
                skipped.append(req)  # no free LoRA slot: let requests behind it go first
                continue
            if req.remote_prefill is not None and not req.remote_prefill.started:
                if not self._start_pull(req, now):
                    self.waiting.appendleft(req)
                    break
                continue
            if req.blocks:  # its KV is in place already: pulled (or the pull failed)
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self.pool.allocate(req, req.num_computed_tokens + n, []):
                    self.waiting.appendleft(req)
                    break
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = req.num_computed_tokens
            else:
                # The last token is always computed again, so at most num_tokens - 1 can hit.
                max_hit_blocks = (req.num_tokens - 1) // self.pool.block_size
                computed = self.pool.find_cached_prefix(req.block_hashes, max_hit_blocks)
                num_cached = len(computed) * self.pool.block_size
                n = min(req.num_tokens - num_cached, budget)
                if not self.pool.allocate(req, num_cached + n, computed):
                    self.waiting.appendleft(req)
                    break
                req.num_computed_tokens = num_cached
                if req.num_cached_tokens < 0:
                    self._count_admission(req, num_cached, now)
                    req.num_cached_tokens = num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            if req.lora_name:
                active_loras.add(req.lora_name)
            self._account(step, req, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        self._lora_deferred = len(skipped)
        return step

    def _count_admission(self, req: SimRequest, num_local_hit: int, now: float) -> None:
        req.num_local_hit_tokens = num_local_hit
        req.first_scheduled_time = now
        self.stats.prefix_cache_queries += req.num_tokens
        self.stats.prefix_cache_hits += num_local_hit
        self.stats.prompt_tokens_cached_by_source["device"] += num_local_hit
        if self.kv is not None:  # vLLM counts connector lookups for every request
            self.stats.external_prefix_cache_queries += req.num_tokens

    # ---- decode legs: KV pulled from a prefill pod -------------------------------------------

    def _start_pull(self, req: SimRequest, now: float) -> bool:
        """Allocate the whole prompt's blocks and pull those the local cache lacks, beside
        the steps (vLLM's WAITING_FOR_REMOTE_KVS). False: the blocks do not fit yet."""
        remote = req.remote_prefill
        assert remote is not None and self.kv is not None
        bs = self.pool.block_size
        computed = self.pool.find_cached_prefix(req.block_hashes, (req.num_tokens - 1) // bs)
        if not self.pool.allocate(req, req.num_tokens, computed):
            return False
        remote.started = True
        num_local = len(computed) * bs
        req.num_computed_tokens = num_local
        self._count_admission(req, num_local, now)
        # The remote blocks cover the prompt from its start; read those not cached here.
        first, end = len(computed), self.pool.blocks_for(req.num_tokens)
        req.status = Status.WAITING_FOR_REMOTE_KVS
        task = asyncio.get_running_loop().create_task(
            self._pull(req, remote.block_ids[first:end], first), name="kv-pull"
        )
        self.loading[req] = task
        return True

    async def _pull(self, req: SimRequest, block_ids: list[int], first: int) -> None:
        assert self.kv is not None
        try:
            if len(block_ids) != self.pool.blocks_for(req.num_tokens) - first:
                n = len(req.remote_prefill.block_ids) if req.remote_prefill else 0
                raise KVTransferError(
                    f"KV transfer failed: kv_transfer_params name {n} remote blocks, but this "
                    f"prompt of {req.num_prompt_tokens} tokens fills "
                    f"{self.pool.blocks_for(req.num_tokens)}: the prefill leg's prompt differs"
                )
            await self.kv.pull(req, block_ids, first)
        except KVTransferError as exc:
            self._pull_failed(req, str(exc))
            return
        except Exception:  # a bug must fail the request, not leave it waiting for ever
            log.exception("KV pull for request %s failed", req.request_id)
            self._pull_failed(req, "KV transfer failed: internal error in the simulator")
            return
        if self.loading.pop(req, None) is None:
            return
        # As vLLM after a NIXL read: all prompt tokens but the last count as computed (the
        # last is computed again to sample), and the full blocks are cached: BlockStored.
        computed = req.num_tokens - 1
        req.num_external_tokens = req.num_tokens - req.num_computed_tokens
        req.num_computed_tokens = computed
        req.num_cached_tokens = computed
        self.stats.external_prefix_cache_hits += req.num_external_tokens
        # The KV came from another vLLM instance: vLLM's "p2p" tier.
        self.stats.prompt_tokens_cached_by_source["p2p"] += req.num_external_tokens
        self.pool.cache_full_blocks(req, computed)
        self._flush_events()
        self._back_to_waiting(req)

    def _pull_failed(self, req: SimRequest, message: str) -> None:
        if self.loading.pop(req, None) is None:
            return  # aborted meanwhile
        if self.kv is not None and self.kv.cfg.load_failure_policy == "recompute":
            log.warning("%s; computing the prompt here (kv_load_failure_policy=recompute)", message)
            self._back_to_waiting(req)  # its blocks stay; the missing tokens get prefilled
            return
        log.warning("request %s: %s", req.request_id, message)
        req.error = message
        self._finish(req, "error")
        self._wakeup.set()

    def _back_to_waiting(self, req: SimRequest) -> None:
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self._wakeup.set()

    def _account(self, step: _Step, req: SimRequest, n: int) -> None:
        step.scheduled.append((req, n))
        # The n new tokens attend to the tokens before them, whose KV the step reads.
        step.context_tokens += req.num_computed_tokens
        step.attention_pairs += attention_pairs(n, req.num_computed_tokens)
        if req.is_prefilling:
            step.prefill_tokens += n
        else:
            step.decode_seqs += 1

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.pool.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _complete(self, step: _Step) -> None:
        now = time.monotonic()
        for req, n in step.scheduled:
            if req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens:
                self._sample(req, now)
            self.pool.cache_full_blocks(req, req.num_computed_tokens)
            if req.num_created_cache_tokens is None and req.output_token_ids:
                # The prefill just ended: vLLM's PrefillStats.finalize, the prompt tokens
                # now in the prefix cache beyond those that were cached at admission.
                in_cache = min(req.num_cached_blocks * self.pool.block_size, req.num_prompt_tokens)
                req.num_created_cache_tokens = max(0, in_cache - max(req.num_cached_tokens, 0))
            if req.finish_reason is not None:
                self.running.remove(req)
                self._finish(req, req.finish_reason)

    def _sample(self, req: SimRequest, now: float) -> None:
        token = self._eos if self._answer_is_complete(req) else req.rng.choice(self._token_pool)
        req.all_token_ids.append(token)
        req.output_token_ids.append(token)
        self.hasher.extend(
            req.block_hashes, req.all_token_ids, req.lora_name, req.cache_salt, req.lora_path
        )
        stats = self.stats
        stats.generation_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
            stats.prompt_tokens += req.num_prompt_tokens
            ext, local = req.num_external_tokens, req.num_local_hit_tokens
            stats.prompt_tokens_by_source["external_kv_transfer"] += ext
            stats.prompt_tokens_by_source["local_cache_hit"] += local
            stats.prompt_tokens_by_source["local_compute"] += req.num_prompt_tokens - ext - local
            stats.prompt_tokens_cached += ext + local
            stats.ttft.observe(now - req.arrival_time)
        else:
            stats.inter_token_latency.observe(now - req.last_token_time)
        req.last_token_time = now
        reason, stop_reason = self._check_stop(req, token)
        req.finish_reason, req.stop_reason = reason, stop_reason
        text = self._release_text(req, finished=reason is not None)
        req.outputs.put_nowait(TokenOutput(token, text, reason, stop_reason))

    def _answer_is_complete(self, req: SimRequest) -> bool:
        """The simulated model ends its answer after the length drawn for the request."""
        p = req.params
        n_next = len(req.output_token_ids) + 1
        return (
            req.natural_len is not None
            and self._eos is not None
            and not p.ignore_eos
            and n_next >= max(req.natural_len, p.min_tokens + 1)
        )

    def _check_stop(self, req: SimRequest, token: int) -> tuple[str | None, str | int | None]:
        """Add the token's text to output_text; return (finish_reason, stop_reason).

        vLLM's order: the length limits, then EOS and stop token ids (whose text is not
        shown), then stop strings, which win over "length" and cut the text where they start.
        A model cannot sample EOS or a stop token before min_tokens; random tokens can, so
        they only count after it, like stop strings.
        """
        params = req.params
        n_out = len(req.output_token_ids)
        reason = None
        if n_out >= params.max_tokens or req.num_tokens >= self.limits.max_model_len:
            reason = "length"
        elif token == self._eos:  # sampled only when the answer may end
            return "stop", None
        elif n_out > params.min_tokens and token in params.stop_token_ids:
            return "stop", token
        text = self._token_texts.get(token, "")  # EOS shows no text
        req.output_text += text
        if params.stop and text and n_out > params.min_tokens:
            stop = self._cut_at_stop_string(req, len(text))
            if stop is not None:
                return "stop", stop
        return reason, None

    @staticmethod
    def _cut_at_stop_string(req: SimRequest, new_chars: int) -> str | None:
        """The first stop string (in request order) that ends in the new text, as vLLM checks."""
        out = req.output_text
        for stop in req.params.stop:
            # Matches that end earlier were looked for when that text was new.
            at = out.find(stop, max(0, len(out) - new_chars - len(stop) + 1))
            if at != -1:
                req.output_text = out[:at]
                return stop
        return None

    @staticmethod
    def _release_text(req: SimRequest, *, finished: bool) -> str:
        """The text to send now: all but the tail a stop string may still cut, all at the end.

        So a stream never shows text the whole answer does not have (vLLM's stop buffer).
        Without stop strings the buffer is 0 and this is just the new text.
        """
        out, sent = req.output_text, req.num_sent_chars
        end = len(out) if finished else len(out) - req.params.stop_buffer
        if end <= sent:
            return ""
        req.num_sent_chars = end
        return out[sent:end]

    def _finish(self, req: SimRequest, reason: str, *, notify: bool = True) -> None:
        if req.hold_kv and reason == "length" and self.kv is not None and req.blocks:
            # A prefill leg: keep its KV for the decode pod. This runs before the API layer
            # reads the final output, so the response carries the params.
            req.kv_transfer_params = self.kv.hold(req)
        else:
            self.pool.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        stats = self.stats
        stats.finished[reason] += 1
        now = time.monotonic()
        stats.e2e_latency.observe(now - req.arrival_time)
        stats.request_prompt_tokens.observe(req.num_prompt_tokens)
        stats.request_generation_tokens.observe(len(req.output_token_ids))
        # n is always 1 here, so the most tokens the request could generate is max_tokens.
        stats.request_params_n.observe(1)
        stats.request_params_max_tokens.observe(req.params.max_tokens)
        stats.request_max_num_generation_tokens.observe(req.params.max_tokens)
        stats.request_num_preemptions.observe(req.num_preemptions)
        cached = max(req.num_cached_tokens, 0)
        stats.request_prefill_kv_computed_tokens.observe(req.num_prompt_tokens - cached)
        if req.first_scheduled_time is not None:
            stats.queue_time.observe(req.first_scheduled_time - req.arrival_time)
            stats.inference_time.observe(now - req.first_scheduled_time)
        if req.first_token_time is not None and req.first_scheduled_time is not None:
            stats.prefill_time.observe(req.first_token_time - req.first_scheduled_time)
            stats.decode_time.observe(now - req.first_token_time)
            n_out = len(req.output_token_ids)
            if n_out > 1:
                stats.time_per_output_token.observe((now - req.first_token_time) / (n_out - 1))
        if notify and reason in ("abort", "error"):
            req.outputs.put_nowait(TokenOutput(None, "", reason))

    def _flush_events(self) -> None:
        events = self.pool.take_events()
        if events and self._publish is not None:
            self._publish(events)
