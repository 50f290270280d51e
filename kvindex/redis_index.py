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

Key layout (`infergate:kv` is the prefix):
- `infergate:kv:b:<key as 16 hex digits>`: a hash, pod address → one digit of tier bits
  (1 gpu, 2 cpu, 3 both) followed by the Redis time of the write in microseconds. Every write
  sets the key's expiry to `ttl` (default 1 h): the bound on what a writer that died leaves.
  Redis's own bound is `maxmemory` with `maxmemory-policy allkeys-lru` (reads count as uses),
  which the operator sets; the README says how much each (block, pod) costs.
- `infergate:kv:cleared`: a hash, pod → the Redis time of its last clear (AllBlocksCleared,
  an engine restart, the pod leaving). An entry written before it is dead: lookups skip it, the
  next write over it starts from nothing, the key's expiry removes it. So clear_pod is one
  command, whatever the pod held, and needs no list of its keys.
Standalone Redis/Valkey only (a lookup's keys are spread over every cluster slot).

Reads. `fetch` runs one script (EVALSHA) over the prompt's keys: it walks them in order and
returns, per pod holding the first key, the tier digits of its consecutive run, stopping at
the first key no pod still running holds. It has a deadline (`timeout`); the reply is bounded by
the client's parser (epp builds the client). When Redis fails (refused, timed out, an error,
a reply too large or out of shape) the lookup answers "no hits", counted in
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

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from infergw.kvindex.backend import BlockIndex
from infergw.kvindex.index import DEFAULT_TIER_WEIGHTS, Tier

log = logging.getLogger("kvindex.redis_index")

KEY_PREFIX = "infergate:kv"
DEFAULT_TTL = 3600.0  # seconds a block key lives after its last write
DEFAULT_TIMEOUT = 0.05  # a lookup's deadline, seconds: it is on the request path
WRITE_TIMEOUT = 2.0  # one flush's deadline
KEYS_PER_CALL = 512  # block keys per write script call
MAX_LOOKUP_KEYS = 8192  # a prompt's keys looked up (128k tokens at 16 a block)
_BITS: dict[str, int] = {"gpu": 1, "cpu": 2}
_ALL = 3

# KEYS[1] cleared hash; KEYS[2..] block keys. ARGV[1] pod, ARGV[2] ttl ms, ARGV[i+1] the op on
# KEYS[i]: set bits + 4 * cleared bits (applied as: bits = old & ~cleared | set).
WRITE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local pod, ttl = ARGV[1], tonumber(ARGV[2])
local cleared = tonumber(redis.call('HGET', KEYS[1], pod) or '-1')
if now <= cleared then now = cleared + 1 end
local stamp = string.format('%.0f', now)
for i = 2, #KEYS do
  local op = tonumber(ARGV[i + 1])
  local set, clr = op % 4, math.floor(op / 4)
  local old = 0
  local v = redis.call('HGET', KEYS[i], pod)
  if v then
    local t = tonumber(string.sub(v, 2))
    if t and t > cleared then old = tonumber(string.sub(v, 1, 1)) or 0 end
  end
  local bits = bit.bor(bit.band(old, 3 - clr), set)
  if bits == 0 then
    if v then redis.call('HDEL', KEYS[i], pod) end
  else
    redis.call('HSET', KEYS[i], pod, bits .. stamp)
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return #KEYS - 1
"""

# KEYS[1] cleared hash; ARGV[1] pod. Everything the pod wrote before now is dead.
CLEAR_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local cleared = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if now <= cleared then now = cleared + 1 end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now))
return 1
"""

# KEYS[1] cleared hash; KEYS[2..] a prompt's block keys in order.
# -> {pod, run, pod, run, ...}: per pod holding KEYS[2], the tier digits of its consecutive run.
LOOKUP_SCRIPT = """
local cleared, runs, alive = {}, {}, nil
for i = 2, #KEYS do
  local row = redis.call('HGETALL', KEYS[i])
  local next_alive, n = {}, 0
  for j = 1, #row, 2 do
    local pod, v = row[j], row[j + 1]
    if alive == nil or alive[pod] then
      local c = cleared[pod]
      if c == nil then
        c = tonumber(redis.call('HGET', KEYS[1], pod) or '-1')
        cleared[pod] = c
      end
      local t = tonumber(string.sub(v, 2))
      if t and t > c then
        local r = runs[pod]
        if r == nil then r = {}; runs[pod] = r end
        r[#r + 1] = string.sub(v, 1, 1)
        next_alive[pod] = true
        n = n + 1
      end
    end
  end
  if n == 0 then break end
  alive = next_alive
end
local out = {}
for pod, r in pairs(runs) do
  out[#out + 1] = pod
  out[#out + 1] = table.concat(r)
end
return out
"""


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


def parse_runs(reply: Any, n_keys: int) -> dict[str, bytes]:
    """The lookup script's {pod, run, ...} → pod → run of tier digits (b"1".."3"), each run at
    most n_keys long; MalformedReply for anything else."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise MalformedReply(f"lookup: expected a flat list of pairs, got {repr(reply)[:80]}")
    runs: dict[str, bytes] = {}
    for i in range(0, len(reply), 2):
        pod, run = reply[i], reply[i + 1]
        if not isinstance(pod, bytes) or not isinstance(run, bytes) or len(run) > n_keys:
            raise MalformedReply(f"lookup: bad pair {repr(reply[i : i + 2])[:80]}")
        if run.strip(b"123"):
            raise MalformedReply(f"lookup: bad tier digits {run[:40]!r}")
        runs[pod.decode(errors="replace")] = run
    return runs


def block_key(prefix: str, key: int) -> str:
    return f"{prefix}:b:{key:016x}"


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
    """A prompt's lookup result: per pod the tier digits of its run from the first key (from
    Redis), merged with this replica's speculative entries (GPU) as the lookup is answered.
    A pod's run continues through speculative keys, and ends where neither holds the key."""

    def __init__(self, keys: list[int], runs: Mapping[str, bytes], spec: SpeculativeEntries):
        self.keys = keys
        self.runs = runs
        self._spec = spec

    def _walk(self, keys, pods, weights) -> dict:
        self._spec.expire()
        if not keys:
            return dict.fromkeys(pods, weights[0]) if pods is not None else {}
        if pods is None:
            cand = set(self.runs) | set(self._spec.pods_holding(keys[0]))
        else:
            cand = dict.fromkeys(pods)
        out = {}
        for pod in cand:
            run, spec = self.runs.get(pod, b""), self._spec.of(pod)
            score, n = weights[0], len(run)
            if not spec:  # the common case: count the run's digits, no walk in Python
                run = run[: len(keys)]
                score += sum(run.count(d) * weights[d - 48] for d in b"123")
                if pods is not None or score:
                    out[pod] = score
                continue
            for i, k in enumerate(keys):
                bits = run[i] - 48 if i < n else 0
                if k in spec:
                    bits |= 1
                if not bits:
                    break
                score += weights[bits]
            if pods is not None or score:
                out[pod] = score
        return out

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
        self.key_prefix = key_prefix
        self._cleared = f"{key_prefix}:cleared"
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
            return HeldRuns(keys, {}, self._spec)
        if self._health.skipping(now):
            self.metrics.lookups.labels("skipped").inc()
            return HeldRuns(keys, {}, self._spec)
        names = [self._cleared, *(block_key(self.key_prefix, k) for k in keys)]
        try:
            async with asyncio.timeout(self.timeout):
                runs = parse_runs(await self._script(keys=names), len(keys))
        except Exception as error:  # whatever the client raises, Redis could not be asked
            self.metrics.errors.labels("lookup", _reason(error)).inc()
            self.metrics.lookups.labels("failed").inc()
            self._health.failed(error, time.monotonic(), "lookups answer no hits")
            return HeldRuns(keys, {}, self._spec)
        self.metrics.lookups.labels("ok").inc()
        self._health.succeeded(time.monotonic())
        return HeldRuns(keys, runs, self._spec)

    def lookup(
        self,
        keys: list[int],
        pods: Iterable[str] | None = None,
        *,
        tier_weights: Mapping[str, float] = DEFAULT_TIER_WEIGHTS,
    ) -> dict[str, float]:
        return HeldRuns(keys, {}, self._spec).lookup(keys, pods, tier_weights=tier_weights)

    def match_lengths(self, keys: list[int], pods: Iterable[str] | None = None) -> dict[str, int]:
        return HeldRuns(keys, {}, self._spec).match_lengths(keys, pods)

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
    ) -> None:
        if ttl <= 0 or interval <= 0 or batch < 1 or max_pending < 1:
            raise ValueError("ttl and interval must be > 0, batch and max_pending >= 1")
        self.local = local
        self.client = client
        self.ttl_ms = str(max(1, int(ttl * 1000)))
        self.interval = interval
        self.batch = batch
        self.max_pending = max_pending
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else RedisIndexMetrics()
        self.key_prefix = key_prefix
        self._cleared = f"{key_prefix}:cleared"
        self._write = client.register_script(WRITE_SCRIPT)
        self._clear = client.register_script(CLEAR_SCRIPT)
        self._health = _Health("write", retry_interval, log_interval)
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
                    await self._send(ops, clears)
            except Exception as error:
                self.metrics.errors.labels("write", _reason(error)).inc()
                self._health.failed(error, time.monotonic(), "changes kept and retried")
                self._requeue(ops, clears, n)
                return False
            self.metrics.written.inc(n)
            self.metrics.pending.set(self._n)
            self._health.succeeded(time.monotonic())
            return True

    async def _send(self, ops: dict[str, dict[int, int]], clears: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for pod in dict.fromkeys(clears):
            await self._clear(keys=[self._cleared], args=[pod], client=pipe)
        for pod, by_key in ops.items():
            items = list(by_key.items())
            for i in range(0, len(items), KEYS_PER_CALL):
                chunk = items[i : i + KEYS_PER_CALL]
                keys = [self._cleared, *(block_key(self.key_prefix, k) for k, _ in chunk)]
                args = [pod, self.ttl_ms, *(op for _, op in chunk)]
                await self._write(keys=keys, args=args, client=pipe)
        await pipe.execute()

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
