"""The picker's side of the KV-event path: a block index fed by a subscriber (through the
event translator), and the KV cache (kvindex.cache) that plugins score prompts with.

Built only when a plugin asks for it (precise-prefix-cache-scorer), so a picker without one
opens no ZMQ socket. With `--kv-index-backend redis` the index is shared through Redis
(kvindex.redis_index): the translator writes through a local index into it (unless this replica
only reads), and the cache reads it with one round trip a prompt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from infergw.epp.datastore import Datastore
from infergw.epp.kv_shards import KVShards
from infergw.epp.options import KV_EVENTS_PORT, default_kv_events_bind
from infergw.epp.replica_members import ReplicaMembers
from infergw.epp.replica_sync import ReplicaSync
from infergw.kvindex.backend import BlockIndex, PrefixIndex
from infergw.kvindex.cache import KVCache
from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.engine_hashing import EngineHashing, EngineKeys
from infergw.kvindex.engine_translate import EngineKeyTranslator
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.subscriber import KVEventSubscriber
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.kvindex.translate import EventTranslator

log = logging.getLogger("epp.kv_events")

KV_SPECULATIVE = "kv-speculative"  # the replica sync channel of speculative index entries


@dataclass(slots=True)
class KVEventOptions:
    mode: str = "central"  # central | per-pod
    bind: str = field(default_factory=default_kv_events_bind)
    pub_port: int = KV_EVENTS_PORT  # per-pod mode: a pod's PUB port of rank 0 (rank r: + r)
    replay_port: int | None = None  # a pod's ROUTER port of rank 0, if it runs one
    block_size: int = 16
    max_entries: int = 5_000_000
    tokenizers: dict[str, Path] | None = None
    backend: str = "memory"  # memory | redis
    layout: str = "dict"  # dict | packed: the local index's memory layout
    engine_hashing: EngineHashing | None = None  # set: keyed by the engines' block hashes
    redis_url: str | None = None
    redis_write: bool = True  # redis: subscribe and write (else only read)
    redis_shard: bool = False  # redis, per pod: only this replica's shard (epp/kv_shards.py)
    redis_timeout: float = 0.05  # a lookup's deadline
    redis_ttl: float = 3600.0
    # A lookup's reply: per pod holding a prompt's first block, a byte per block it holds.
    redis_max_reply_bytes: int = 16 << 20


class KVCacheView:
    """The index, its subscriber and the KV cache over them, kept in step with the pool."""

    def __init__(
        self,
        datastore: Datastore,
        opts: KVEventOptions,
        registry: CollectorRegistry | None = None,
        replicas: ReplicaSync | None = None,
        members: ReplicaMembers | None = None,
    ) -> None:
        self.datastore = datastore
        self.opts = opts
        lookup_seconds = Histogram(
            "infergate_kvindex_lookup_seconds",
            "Time to look a prompt's blocks up in the index.",
            buckets=(0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
            registry=registry,
        )
        layout = DictBlockIndex if opts.layout == "dict" else KVBlockIndex
        local = layout(block_size=opts.block_size, max_entries=opts.max_entries)
        index: BlockIndex = local
        reads: PrefixIndex = local
        self.redis = self.writer = None
        self._writer_task: asyncio.Task | None = None
        if opts.backend == "redis":
            index, reads = self._shared_index(local, registry)
        engine = None if opts.engine_hashing is None else EngineKeys(opts.engine_hashing)
        self.translator: EventTranslator | EngineKeyTranslator
        if engine is None:
            self.translator = EventTranslator(index, opts.layout)  # its maps as the index
        else:
            self.translator = EngineKeyTranslator(index, engine)
        self.cache = KVCache(
            tokenizers=PromptTokenizers(opts.tokenizers or {}),
            index=reads,
            base_model=self.base_model,
            lookup_seconds=lookup_seconds,
            engine_block_size=self.engine_block_size,
            engine_keys=engine,
        )
        self.subscriber = KVEventSubscriber(
            self.translator,
            replay_endpoint_for=self._replay_for,
            model_for=self._served_model,
            is_member=self._in_pool,
            decode_tokens=engine is None,  # engine keys need a request's first store's only
        )
        self._connected: set[str] = set()
        # Per-pod mode: the pods this replica subscribes to (epp/kv_shards.py narrows it to
        # this replica's shard; by default every pod).
        self.owns: Callable[[str], bool] = lambda _pod: True
        self.released = 0  # pods handed to another replica (sharded)
        self.shards: KVShards | None = None
        if opts.redis_shard and self.writer is not None:  # sets self.owns
            self.shards = KVShards(self, members or ReplicaMembers(replicas))
        if replicas is not None:  # other picker replicas hold our speculative entries too
            share = replicas.channel(KV_SPECULATIVE, self.cache.add_speculative_keys)
            self.cache.speculative_listeners.append(share)

    def _shared_index(
        self, local: KVBlockIndex | DictBlockIndex, registry: CollectorRegistry | None
    ) -> tuple[BlockIndex, PrefixIndex]:
        """(what the translator writes into, what the cache reads) for the Redis backend."""
        from infergw.epp.ratelimit.redis_backend import redis_client
        from infergw.kvindex.redis_index import (
            RedisIndexMetrics,
            RedisIndexWriter,
            RedisPrefixIndex,
        )

        opts = self.opts
        if not opts.redis_url:
            raise ValueError("the redis KV index backend needs a Redis address")
        self.redis = redis_client(
            opts.redis_url,
            timeout=max(opts.redis_timeout, 0.25),  # a write batch may take longer
            max_reply_bytes=opts.redis_max_reply_bytes,
        )
        metrics = RedisIndexMetrics(registry)
        reads = RedisPrefixIndex(
            self.redis, block_size=opts.block_size, timeout=opts.redis_timeout, metrics=metrics
        )
        if not opts.redis_write:
            return local, reads  # never fed: no subscription starts
        self.writer = RedisIndexWriter(local, self.redis, ttl=opts.redis_ttl, metrics=metrics)
        return self.writer, reads

    @property
    def subscribes(self) -> bool:
        """Whether this replica receives KV events (all but a read-only shared-index one)."""
        return self.opts.backend != "redis" or self.opts.redis_write

    def _endpoint_of(self, address: str, port: int | None) -> str | None:
        ep = self.datastore.endpoint(address)
        if ep is None or port is None:
            return None
        host = f"[{ep.ip}]" if ":" in ep.ip else ep.ip
        return f"tcp://{host}:{ep.host_ports.of(port + ep.rank)}"

    def base_model(self, model: str) -> tuple[str, str | None]:
        """(base model, LoRA adapter or None): vLLM keys an adapter's blocks by the base
        model's name with the adapter in every block, so the prompt must be keyed alike."""
        for ep in self.datastore.endpoints():
            base = ep.lora_parents.get(model)
            if base is not None:
                return base, model
        return model, None

    def engine_block_size(self, address: str) -> int | None:
        """A pod's engine block size: from its BlockStored events, else the `block_size` of
        its `vllm:cache_config_info` (scraped), else unknown."""
        size = self.translator.engine_block_size(address)
        if size is None:
            ep = self.datastore.endpoint(address)
            size = ep.metrics.block_size if ep is not None else None
        return size

    def _served_model(self, address: str) -> str | None:
        """The base model a pod serves (from its /v1/models), else the one model the picker
        has a tokenizer for: what a topic-less KV event's blocks belong to."""
        ep = self.datastore.endpoint(address)
        bases = sorted(m for m in (ep.models if ep else ()) if m not in ep.lora_parents)
        if bases:
            return bases[0]
        configured = list(self.opts.tokenizers or {})
        return configured[0] if len(configured) == 1 else None

    def _in_pool(self, address: str) -> bool:
        return self.datastore.endpoint(address) is not None

    def _replay_for(self, address: str) -> str | None:
        return self._endpoint_of(address, self.opts.replay_port)

    def start(self) -> None:
        if not self.subscribes:
            return
        if self.writer is not None:
            self._writer_task = asyncio.get_running_loop().create_task(self.writer.run())
        if self.opts.mode == "central":
            self.subscriber.bind(self.opts.bind)
        self.datastore.removal_listeners.append(self._pod_left)
        self.datastore.change_listeners.append(self.sync_pods)
        if self.shards is not None:
            self.shards.start()  # decides which pods are ours, then subscribes
        else:
            self.sync_pods()

    def sync_pods(self) -> None:
        """Per-pod mode: connect to the pods that joined (of those this replica owns), let go
        of those it no longer owns. Called when the pool changes (and by epp/kv_shards.py)."""
        if self.opts.mode != "per-pod" or not self.subscribes:
            return
        for ep in self.datastore.endpoints():
            address = ep.address
            if not self.owns(address):
                if address in self._connected:  # another replica follows it now
                    self._connected.discard(address)
                    self.subscriber.release_pod(address)
                    self.released += 1
            elif address not in self._connected:
                pub = self._endpoint_of(address, self.opts.pub_port)
                if pub:
                    self.subscriber.connect_pod(address, pub, self._replay_for(address))
                    self._connected.add(address)

    def _pod_left(self, address: str) -> None:
        self._connected.discard(address)
        self.subscriber.forget_pod(address)

    async def close(self) -> None:
        if self.shards is not None:
            await self.shards.close()
        await self.subscriber.close()
        if self._writer_task is not None:
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
            self._writer_task = None
        if self.writer is not None:
            await self.writer.flush()  # the last changes, if Redis answers (it has a deadline)
        if self.redis is not None:
            await self.redis.aclose()

    def collect(self):
        """Prometheus: what the subscriber received and the index holds, read at scrape."""
        events = CounterMetricFamily(
            "infergate_kvindex_messages",
            "KV-event messages and events, by outcome.",
            labels=["outcome"],
        )
        for outcome, n in sorted(self.subscriber.counts.items()):
            events.add_metric([outcome], n)
        yield events
        dropped = CounterMetricFamily(
            "infergate_kvindex_dropped_messages",
            "KV-event messages refused (malformed, unknown_pod, peer_mismatch, no_model, "
            "replay_buffer_full, error), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.subscriber.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        stats = self.translator.stats()
        skipped = CounterMetricFamily(
            "infergate_kvindex_skipped_events",
            "KV events the index did not apply (kv_cache_spec_kind, medium, block_size, "
            "token_count, extra_keys, offload_unknown_hash, unknown_event), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(stats["skipped"].items()):
            skipped.add_metric([reason], n)
        yield skipped
        unresolved = CounterMetricFamily(
            "infergate_kvindex_unresolved_hashes",
            "Engine block hashes a pod's events named that its earlier events never stored "
            "(parent, offload, removed), by pod: persistent parent misses mean its vLLM "
            "processes hash differently (PYTHONHASHSEED, --prefix-caching-hash-algo); with "
            "--kv-index-keys engine, root_mismatch: requests' first blocks the engine hashed "
            "unlike the picker (its engine-hash settings are not the engines').",
            labels=["pod", "kind"],
        )
        for pod, kinds in sorted(stats["unresolved"].items()):
            for kind, n in sorted(kinds.items()):
                unresolved.add_metric([pod, kind], n)
        yield unresolved
        subscribed = GaugeMetricFamily(
            "infergate_kvindex_subscribed",
            "Pods whose KV events this picker subscribes to (per-pod mode), 1 each; sharded "
            "(--kv-index-redis-shard) its own shard only.",
            labels=["pod"],
        )
        for pod in sorted(self._connected):
            subscribed.add_metric([pod], 1)
        yield subscribed
        yield CounterMetricFamily(
            "infergate_kvindex_released_pods",
            "Pods this picker stopped subscribing to because another replica owns them now.",
            value=self.released,
        )
        for key in ("entries", "keys", "pods", "bytes"):
            if key in stats:
                yield GaugeMetricFamily(
                    f"infergate_kvindex_{key}", f"KV block index: {key}.", value=stats[key]
                )
