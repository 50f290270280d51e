"""The KV block index shared through Redis or Valkey (`--kv-index-backend redis`): written by
the pickers that subscribe to KV events, read by every picker replica.

Who writes. Each writing picker translates the events it receives exactly as the in-memory
index does (kvindex.translate over a local kvindex.index, which keeps the copy counts and the
engine-hash maps) and mirrors every change of a (block key, pod) into Redis as an idempotent
bit operation: "pod holds the key in tier t" sets a bit, "pod no longer holds it in t" clears
it. Applying the same event twice changes nothing, so N pickers subscribing to the same pods
(per-pod mode) may all write: their writes converge once each has applied the same events (a
writer that lags re-sets a bit another already cleared, until it applies the removal too). No
lease: a lease's handover would lose the events between the old writer's last flush and the
new one's first. A picker started with `--no-kv-index-redis-write` subscribes to nothing and
holds no index: it only reads (that is the memory this backend saves: one writer, or two for
redundancy, holds the translation; every other replica holds nothing).

Key layout: kvindex.redis_layout (versioned: `infergate:kv:v2:...`). Per block key one small
string, the holders as a bitmap over stable pod ids, two tier bits a pod; a pod-id table maps
pods to ids. Every write sets the key's expiry to `ttl` (default 1 h): the bound on what a
writer that died leaves. Redis's own bound is `maxmemory` with `maxmemory-policy allkeys-lru`
(reads count as uses), which the operator sets; the README says how much each block costs.
`clear_pod` (AllBlocksCleared, an engine restart, the pod leaving) retires the pod's id: one
command, whatever the pod held, and needs no list of its keys. At most `max_pod_ids` pods have
an id at once; a pod that finds the table full is not written (its changes are dropped and
counted as errors{op="write",reason="pod_ids_full"}).

Reads. `fetch` runs one script (EVALSHA) over the prompt's keys: it takes the live holders of
the first key as candidates and walks the keys in order, narrowing the candidates, until none
is left. Its cost is about O(blocks matched + pods matched): a block whose bitmap equals the
one before costs a string comparison, the reply holds one bitmap slice per change along the
walk (a pod's run ending, a tier changing), not a digit per (block, pod). It has a deadline
(`timeout`); the reply is bounded by the client's parser (epp builds the client) and checked
in full (`parse_segments`). When Redis fails (refused, timed out, an error, a reply too large
or out of shape) the lookup answers "no hits", counted in
`infergate_kvindex_redis_errors_total{op,reason}` and logged at ERROR once, then at most every
`log_interval` seconds, with a WARNING when Redis answers again; for `retry_interval` seconds
after a failure Redis is not asked at all. Writes failing are kept (up to `max_pending`
(key, pod) changes, then dropped and counted) and retried.

Speculative entries (a routing decision's blocks before their BlockStored arrives) stay in the
replica that made the decision, for `speculative_ttl` seconds: they are not written to Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from infergw.kvindex.backend import BlockIndex
from infergw.kvindex.index import DEFAULT_TIER_WEIGHTS, Tier
from infergw.kvindex.redis_layout import (
    CLEAR_SCRIPT,
    LOOKUP_SCRIPT,
    MAX_MASK_BYTES,
    MAX_POD_IDS,
    WRITE_SCRIPT,
    KeyLayout,
)

log = logging.getLogger("kvindex.redis_index")

KEY_PREFIX = "infergate:kv"
DEFAULT_TTL = 3600.0  # seconds a block key lives after its last write
DEFAULT_TIMEOUT = 0.05  # a lookup's deadline, seconds: it is on the request path
WRITE_TIMEOUT = 2.0  # one flush's deadline
KEYS_PER_CALL = 512  # block keys per write script call
MAX_LOOKUP_KEYS = 8192  # a prompt's keys looked up (128k tokens at 16 a block)
_BITS: dict[str, int] = {"gpu": 1, "cpu": 2}
_ALL = 3
_FIELD_SHIFTS = (6, 4, 2, 0)  # a bitmap byte's four pods (ids 4j..4j+3), two bits each


class MalformedReply(redis_errors.RedisError):
    """The lookup script answered something it never returns."""


def _reason(error: BaseException) -> str:
    if isinstance(error, MalformedReply):
        return "malformed_reply"
    if isinstance(error, TimeoutError | redis_errors.TimeoutError):
        return "timeout"
    if isinstance(error, OSError | redis_errors.ConnectionError):
        return "connection"  # a reply over the parser's bound is one too (ReplyTooLarge)
    if isinstance(error, redis_errors.ResponseError):
        return "response"
    return "other"


@dataclass(frozen=True, slots=True)
class Segments:
    """A lookup's answer: the prompt's first `ends[-1]` keys cut into segments over which no
    pod's tiers change; per segment and pod (a column), its tier digit (1 gpu, 2 cpu, 3 both),
    0 from the segment where its run ended on."""

    columns: dict[str, int]  # pod → its column in digits
    ends: np.ndarray  # int64, each segment's end (exclusive), increasing
    digits: np.ndarray  # uint8, (segments, columns)

    def run(self, pod: str, n: int) -> bytes:
        """The pod's run over the first n keys, as tier digits b"1".."3"."""
        col = self.columns.get(pod)
        if col is None:
            return b""
        lens = np.diff(self.ends, prepend=0)
        held = int(lens[self.digits[:, col] != 0].sum())
        return (np.repeat(self.digits[:, col], lens)[: min(n, held)] + 48).tobytes()

    def scores(self, pods: list[str], n: int, weights: Sequence[float]) -> list:
        """Per pod (in order), the sum of weights[digit] over its run within the first n keys."""
        cols = [self.columns[p] for p in pods]
        s = min(int(np.searchsorted(self.ends, n, side="left")) + 1, len(self.ends))
        lens = np.diff(np.minimum(self.ends[:s], n), prepend=0)
        table = np.asarray(weights)
        return (table[self.digits[:s, cols]] * lens[:, None]).sum(axis=0).tolist()


NO_SEGMENTS = Segments({}, np.zeros(0, np.int64), np.zeros((0, 0), np.uint8))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_segments(reply: Any, n_keys: int) -> Segments:
    """The lookup script's {} or {positions, names, segments} (kvindex.redis_layout) → Segments
    over at most n_keys keys; MalformedReply for anything else."""
    if reply == []:
        return NO_SEGMENTS
    if not isinstance(reply, list) or len(reply) != 3:
        raise MalformedReply(f"lookup: expected 3 parts, got {repr(reply)[:80]}")
    positions, names, segs = reply
    if not (isinstance(positions, list) and isinstance(names, list) and isinstance(segs, list)):
        raise MalformedReply(f"lookup: expected 3 lists, got {repr(reply)[:80]}")
    width = len(positions)
    if not 0 < width <= MAX_MASK_BYTES or not all(_is_int(p) for p in positions):
        raise MalformedReply(f"lookup: bad positions {repr(positions)[:80]}")
    if any(not a < b for a, b in zip([0, *positions], positions, strict=False)):
        raise MalformedReply(f"lookup: positions out of order {repr(positions)[:80]}")
    counts, masks = segs[0::2], segs[1::2]
    if not segs or len(segs) % 2 or not all(_is_int(c) and c > 0 for c in counts):
        raise MalformedReply(f"lookup: bad segments {repr(segs)[:80]}")
    if sum(counts) > n_keys or not all(isinstance(m, bytes) and len(m) == width for m in masks):
        raise MalformedReply(f"lookup: segments over {n_keys} keys or of another width")
    raw = np.frombuffer(b"".join(masks), np.uint8).reshape(len(masks), width)
    digits = np.stack([raw >> s & 3 for s in _FIELD_SHIFTS], axis=2).reshape(len(masks), -1)
    digits *= np.cumprod(digits != 0, axis=0, dtype=np.uint8)  # a run ends once
    byte_of = {p: i for i, p in enumerate(positions)}
    columns: dict[str, int] = {}
    if len(names) % 2:
        raise MalformedReply(f"lookup: odd names {repr(names)[:80]}")
    for pod_id, name in zip(names[0::2], names[1::2], strict=True):
        at = byte_of.get(pod_id // 4 + 1) if _is_int(pod_id) and pod_id >= 0 else None
        if at is None or not isinstance(name, bytes):
            raise MalformedReply(f"lookup: bad name {pod_id!r} {name!r}"[:120])
        col = 4 * at + pod_id % 4
        if digits[0, col]:
            columns[name.decode(errors="replace")] = col
    return Segments(columns, np.cumsum(counts, dtype=np.int64), digits)


class RedisIndexMetrics:
    """The shared index's counters (one set a process: pass it to the reader and writer)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.errors = Counter(
            "infergate_kvindex_redis_errors",
            "Redis calls of the shared KV index that failed, by op (lookup, write) and reason "
            "(timeout, connection, response, malformed_reply, other).",
            ["op", "reason"],
            registry=registry,
        )
        self.lookups = Counter(
            "infergate_kvindex_redis_lookups",
            "Prompt lookups in the shared KV index, by result (ok; failed or skipped: "
            "answered as no hits).",
            ["result"],
            registry=registry,
        )
        self.written = Counter(
            "infergate_kvindex_redis_written",
            "(block, pod) changes written to the shared KV index.",
            registry=registry,
        )
        self.dropped = Counter(
            "infergate_kvindex_redis_dropped_writes",
            "(block, pod) changes dropped because Redis failed for longer than the pending "
            "bound allows.",
            registry=registry,
        )
        self.pending = Gauge(
            "infergate_kvindex_redis_pending_writes",
            "(block, pod) changes waiting to be written to the shared KV index.",
            registry=registry,
        )


@dataclass(slots=True)
class _Health:
    """Failure bookkeeping of one side (reads or writes): skip window and rate-limited logs."""

    what: str
    retry_interval: float
    log_interval: float
    down_since: float | None = None
    skip_until: float = 0.0
    logged_at: float = field(default=-1e18)

    def skipping(self, now: float) -> bool:
        return now < self.skip_until

    def failed(self, error: BaseException, now: float, consequence: str) -> None:
        self.skip_until = now + self.retry_interval
        first = self.down_since is None
        if first:
            self.down_since = now
        if first or now - self.logged_at >= self.log_interval:
            self.logged_at = now
            log.error(
                "shared KV index: %s failed (%s: %s); %s, trying again in %.1fs",
                self.what,
                type(error).__name__,
                str(error)[:200],
                consequence,
                self.retry_interval,
            )

    def succeeded(self, now: float) -> None:
        if self.down_since is not None:
            log.warning(
                "shared KV index: %s works again after %.1fs", self.what, now - self.down_since
            )
            self.down_since = None


class SpeculativeEntries:
    """This replica's speculative GPU entries: pod → key → expiry, expiring in FIFO order,
    at most `max_entries` (pod, key) pairs (the oldest decision goes first)."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._by_pod: dict[str, dict[int, float]] = {}
        self._queue: deque[tuple[float, str, tuple[int, ...]]] = deque()
        self._n = 0

    def add(self, pod: str, keys: Sequence[int]) -> None:
        now = self._clock()
        self.expire(now)
        keys = tuple(keys[: self.max_entries])
        exp = now + self.ttl
        held = self._by_pod.setdefault(pod, {})
        for k in keys:
            if held.get(k) is None:
                self._n += 1
            held[k] = exp
        self._queue.append((exp, pod, keys))
        while self._n > self.max_entries:
            self._drop(*self._queue.popleft(), force=True)

    def _drop(self, exp: float, pod: str, keys: tuple[int, ...], force: bool = False) -> None:
        held = self._by_pod.get(pod)
        if held is None:
            return
        for k in keys:
            e = held.get(k)
            if e is not None and (force or e == exp):  # not renewed since (unless forced)
                del held[k]
                self._n -= 1
        if not held:
            del self._by_pod[pod]

    def expire(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        q = self._queue
        while q and q[0][0] <= now:
            self._drop(*q.popleft())

    def of(self, pod: str) -> dict[int, float]:
        """The pod's live speculative keys (call expire first)."""
        return self._by_pod.get(pod, {})

    def pods_holding(self, key: int) -> list[str]:
        return [p for p, held in self._by_pod.items() if key in held]

    def __len__(self) -> int:
        return self._n


class HeldRuns:
    """A prompt's lookup result: per pod its run of held keys from the first key, with their
    tiers (Segments, from Redis), merged with this replica's speculative entries (GPU) as the
    lookup is answered. A pod's run continues through speculative keys, and ends where
    neither holds the key."""

    def __init__(self, keys: list[int], segments: Segments, spec: SpeculativeEntries):
        self.keys = keys
        self.segments = segments
        self._spec = spec

    def _walk(self, keys, pods, weights) -> dict:
        self._spec.expire()
        if not keys:
            return dict.fromkeys(pods, weights[0]) if pods is not None else {}
        seg = self.segments
        if pods is None:
            cand = dict.fromkeys([*seg.columns, *self._spec.pods_holding(keys[0])])
        else:
            cand = dict.fromkeys(pods)
        # The common case, a pod without speculative keys: its run's score in array steps.
        plain = [p for p in cand if p in seg.columns and not self._spec.of(p)]
        scored = dict(zip(plain, seg.scores(plain, len(keys), weights), strict=True))
        out = {}
        for pod in cand:
            score = scored.get(pod)
            if score is None:
                score = self._walk_one(pod, keys, weights)
            else:
                score += weights[0]
            if pods is not None or score:
                out[pod] = score
        return out

    def _walk_one(self, pod: str, keys: list[int], weights) -> float:
        """A pod with speculative keys (or none held in Redis): key by key."""
        run, spec = self.segments.run(pod, len(keys)), self._spec.of(pod)
        score, n = weights[0], len(run)
        for i, k in enumerate(keys):
            bits = run[i] - 48 if i < n else 0
            if k in spec:
                bits |= 1
            if not bits:
                break
            score += weights[bits]
        return score

    def lookup(
        self,
        keys: list[int],
        pods: Iterable[str] | None = None,
        *,
        tier_weights: Mapping[str, float] = DEFAULT_TIER_WEIGHTS,
    ) -> dict[str, float]:
        """As KVBlockIndex.lookup, over the fetched keys (`keys` must be them, or a prefix)."""
        wg = tier_weights.get("gpu", DEFAULT_TIER_WEIGHTS["gpu"])
        wc = tier_weights.get("cpu", DEFAULT_TIER_WEIGHTS["cpu"])
        return self._walk(keys, pods, (0.0, wg, wc, max(wg, wc)))

    def match_lengths(self, keys: list[int], pods: Iterable[str] | None = None) -> dict[str, int]:
        return self._walk(keys, pods, (0, 1, 1, 1))


class RedisPrefixIndex:
    """The read side (kvindex.backend.RemotePrefixIndex): `fetch` a prompt's runs in one round
    trip with a deadline; without a fetch, `lookup` knows only this replica's speculative
    entries."""

    def __init__(
        self,
        client: Redis,
        *,
        block_size: int = 16,
        timeout: float = DEFAULT_TIMEOUT,
        retry_interval: float = 1.0,
        log_interval: float = 30.0,
        speculative_ttl: float = 2.0,
        max_speculative: int = 1_000_000,
        metrics: RedisIndexMetrics | None = None,
        key_prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.client = client
        self.block_size = block_size
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else RedisIndexMetrics()
        self.layout = KeyLayout(key_prefix)
        self._script = client.register_script(LOOKUP_SCRIPT)
        self._health = _Health("lookup", retry_interval, log_interval)
        self._spec = SpeculativeEntries(speculative_ttl, max_speculative, clock)

    @property
    def available(self) -> bool:
        """False from a failed lookup until one succeeds."""
        return self._health.down_since is None

    async def fetch(self, keys: list[int]) -> HeldRuns:
        keys = keys[:MAX_LOOKUP_KEYS]
        now = time.monotonic()
        if not keys:
            return HeldRuns(keys, NO_SEGMENTS, self._spec)
        if self._health.skipping(now):
            self.metrics.lookups.labels("skipped").inc()
            return HeldRuns(keys, NO_SEGMENTS, self._spec)
        layout = self.layout
        names = [layout.live, layout.names, *map(layout.block, keys)]
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._script(keys=names, args=[MAX_MASK_BYTES])
                segments = parse_segments(reply, len(keys))
        except Exception as error:  # whatever the client raises, Redis could not be asked
            self.metrics.errors.labels("lookup", _reason(error)).inc()
            self.metrics.lookups.labels("failed").inc()
            self._health.failed(error, time.monotonic(), "lookups answer no hits")
            return HeldRuns(keys, NO_SEGMENTS, self._spec)
        self.metrics.lookups.labels("ok").inc()
        self._health.succeeded(time.monotonic())
        return HeldRuns(keys, segments, self._spec)

    def lookup(
        self,
        keys: list[int],
        pods: Iterable[str] | None = None,
        *,
        tier_weights: Mapping[str, float] = DEFAULT_TIER_WEIGHTS,
    ) -> dict[str, float]:
        return HeldRuns(keys, NO_SEGMENTS, self._spec).lookup(keys, pods, tier_weights=tier_weights)

    def match_lengths(self, keys: list[int], pods: Iterable[str] | None = None) -> dict[str, int]:
        return HeldRuns(keys, NO_SEGMENTS, self._spec).match_lengths(keys, pods)

    def add_speculative(self, pod: str, keys: list[int]) -> None:
        self._spec.add(pod, keys)


def _compose(old: int, new: int) -> int:
    """Two ops (set bits + 4 * cleared bits) applied in turn, as one."""
    s1, c1, s2, c2 = old & 3, old >> 2, new & 3, new >> 2
    return ((s1 & ~c2) | s2) | (((c1 & ~s2) | c2) << 2)


class RedisIndexWriter:
    """The write side (kvindex.backend.BlockIndex) for kvindex.translate: `local` (the exact
    in-memory index) answers everything; every change of a (key, pod) is queued as a bit op
    and `flush` writes the queue to Redis (`run` flushes every `interval` seconds, or sooner
    when `batch` changes wait)."""

    def __init__(
        self,
        local: BlockIndex,
        client: Redis,
        *,
        ttl: float = DEFAULT_TTL,
        interval: float = 0.02,
        batch: int = 4096,
        max_pending: int = 1_000_000,
        timeout: float = WRITE_TIMEOUT,
        retry_interval: float = 1.0,
        log_interval: float = 30.0,
        metrics: RedisIndexMetrics | None = None,
        key_prefix: str = KEY_PREFIX,
        max_pod_ids: int = MAX_POD_IDS,
    ) -> None:
        if ttl <= 0 or interval <= 0 or batch < 1 or max_pending < 1:
            raise ValueError("ttl and interval must be > 0, batch and max_pending >= 1")
        if not 0 < max_pod_ids <= MAX_POD_IDS:
            raise ValueError(f"max_pod_ids must be in 1..{MAX_POD_IDS}")
        self.local = local
        self.client = client
        self.ttl_ms = str(max(1, int(ttl * 1000)))
        self.interval = interval
        self.batch = batch
        self.max_pending = max_pending
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else RedisIndexMetrics()
        self.layout = KeyLayout(key_prefix)
        self.max_pod_ids = str(max_pod_ids)
        self._write = client.register_script(WRITE_SCRIPT)
        self._clear = client.register_script(CLEAR_SCRIPT)
        self._health = _Health("write", retry_interval, log_interval)
        self._log_interval = log_interval
        self._full_logged_at = -1e18
        self._ops: dict[str, dict[int, int]] = {}  # pod -> key -> op, in arrival order
        self._clears: list[str] = []  # pods cleared before the ops queued for them
        self._n = 0
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()

    # --- BlockIndex, answered by the local index

    @property
    def block_size(self) -> int:
        return self.local.block_size

    @property
    def shard_count(self) -> int:
        return self.local.shard_count

    def holds_any(self, pod: str, keys: Iterable[int]) -> bool:
        return self.local.holds_any(pod, keys)

    def take_evictions(self) -> dict[str, int]:
        # Evicted here is forgotten here, not dropped by the pod: Redis keeps it (its expiry
        # and maxmemory bound it).
        return self.local.take_evictions()

    def stats(self) -> dict:
        return self.local.stats()

    def memory_bytes(self, seen: set[int] | None = None) -> int:
        return self.local.memory_bytes(seen)

    # --- changes, mirrored

    def _queue(self, pod: str, keys: Iterable[int], op: int) -> None:
        ops = self._ops.get(pod)
        if ops is None:
            ops = self._ops[pod] = {}
        before = len(ops)
        for k in keys:
            old = ops.get(k)
            ops[k] = op if old is None else _compose(old, op)
        self._n += len(ops) - before
        if self._n >= self.batch:
            self._wake.set()
        self._bound()

    def _bound(self) -> None:
        """Past `max_pending` changes (Redis failing for long), drop them: counted, logged."""
        if self._n > self.max_pending:
            self.metrics.dropped.inc(self._n)
            log.error(
                "shared KV index: %d pending writes dropped (Redis behind for too long); "
                "its entries may be stale until written again or expired",
                self._n,
            )
            self._ops, self._n = {}, 0
        self.metrics.pending.set(self._n)

    def add(self, pod: str, keys: Sequence[int], tier: Tier, copies: int = 1) -> None:
        self.local.add(pod, keys, tier, copies)
        self._queue(pod, keys, _BITS[tier])

    def remove(self, pod: str, keys: Sequence[int], tier: Tier) -> list[int]:
        gone = self.local.remove(pod, keys, tier)
        self._queue(pod, gone, _ALL << 2)
        gone_set = set(gone)
        left = [k for k in keys if k not in gone_set]
        if left:  # still held in some tier: in this one? (other copies may remain)
            only = {"gpu": 0.0, "cpu": 0.0, tier: 1.0}
            dropped = [
                k for k in left if not self.local.lookup([k], (pod,), tier_weights=only).get(pod)
            ]
            self._queue(pod, dropped, _BITS[tier] << 2)
        return gone

    def clear_pod(self, pod: str, keys: Iterable[int] = ()) -> None:
        self.local.clear_pod(pod, keys)
        self._n -= len(self._ops.pop(pod, {}))
        self._clears.append(pod)
        self._wake.set()

    def release_pod(self, pod: str, keys: Iterable[int] = ()) -> None:
        """Another writer follows `pod` now: forget it locally, leave Redis as it is. What is
        queued for it was true when its events came, so it is flushed at once (before the new
        writer's replay has caught up, in all but a very slow flush)."""
        self.local.clear_pod(pod, keys)
        if pod in self._ops:
            self._wake.set()

    # --- flushing

    @property
    def pending(self) -> int:
        return self._n + len(self._clears)

    async def flush(self) -> bool:
        """Write what is queued; False (kept for the next try) when Redis failed."""
        async with self._flushing:
            if not self._ops and not self._clears:
                return True
            ops, clears, n = self._ops, self._clears, self._n
            self._ops, self._clears, self._n = {}, [], 0
            try:
                async with asyncio.timeout(self.timeout):
                    refused = await self._send(ops, clears)
            except Exception as error:
                self.metrics.errors.labels("write", _reason(error)).inc()
                self._health.failed(error, time.monotonic(), "changes kept and retried")
                self._requeue(ops, clears, n)
                return False
            if refused:
                self._refused(refused)
            self.metrics.written.inc(n - sum(refused.values()))
            self.metrics.pending.set(self._n)
            self._health.succeeded(time.monotonic())
            return True

    async def _send(self, ops: dict[str, dict[int, int]], clears: list[str]) -> dict[str, int]:
        """Write; returns per pod the changes refused because the pod-id table was full."""
        pipe = self.client.pipeline(transaction=False)
        table, block = self.layout.table, self.layout.block
        for pod in dict.fromkeys(clears):
            await self._clear(keys=table, args=[pod, self.ttl_ms], client=pipe)
        calls: list[tuple[str, int]] = []
        for pod, by_key in ops.items():
            items = list(by_key.items())
            for i in range(0, len(items), KEYS_PER_CALL):
                chunk = items[i : i + KEYS_PER_CALL]
                keys = [*table, *(block(k) for k, _ in chunk)]
                args = [pod, self.ttl_ms, self.max_pod_ids, *(op for _, op in chunk)]
                await self._write(keys=keys, args=args, client=pipe)
                calls.append((pod, len(chunk)))
        results = await pipe.execute()
        refused: dict[str, int] = {}
        for (pod, n), result in zip(calls, results[len(results) - len(calls) :], strict=True):
            if result == -1:
                refused[pod] = refused.get(pod, 0) + n
        return refused

    def _refused(self, refused: dict[str, int]) -> None:
        """Pods that found the pod-id table full: their changes are dropped, counted, logged."""
        n = sum(refused.values())
        self.metrics.errors.labels("write", "pod_ids_full").inc(len(refused))
        self.metrics.dropped.inc(n)
        now = time.monotonic()
        if now - self._full_logged_at >= self._log_interval:
            self._full_logged_at = now
            log.error(
                "shared KV index: the pod-id table is full (%s ids); %d changes of %d pods "
                "dropped (e.g. %s): they get no precise routing from the shared index",
                self.max_pod_ids,
                n,
                len(refused),
                next(iter(refused)),
            )

    def _requeue(self, ops: dict[str, dict[int, int]], clears: list[str], n: int) -> None:
        """Put a failed flush back before what was queued since, as if it had never left."""
        newer, newer_clears = self._ops, self._clears
        for pod in newer_clears:
            ops.pop(pod, None)  # a newer clear supersedes the older ops of its pod
        for pod, by_key in newer.items():
            mine = ops.setdefault(pod, {})
            for k, op in by_key.items():
                old = mine.get(k)
                mine[k] = op if old is None else _compose(old, op)
        self._ops, self._clears = ops, clears + newer_clears
        self._n = sum(map(len, ops.values()))
        self._bound()

    async def run(self) -> None:
        """Flush every `interval` seconds, or when `batch` changes wait; until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._health.skipping(time.monotonic()):
                await self.flush()
