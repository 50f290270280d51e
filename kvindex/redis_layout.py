"""The shared KV index's keys in Redis and the scripts that write and read them (layout v2).

Every key lives under `<prefix>:v2` (the prefix is `infergate:kv` unless configured): a picker
of another layout reads and writes only its own keys, so an old-layout keyspace left in the same
Redis is never misread (its block keys expire by their own TTL; `<prefix>:cleared` of layout v1
can be deleted by hand).

- `b:<key as 16 hex digits>`: a string, the block's holders as a bitmap, two bits per pod id
  (bit 2·id: CPU, 2·id+1: GPU, Redis's SETBIT numbering). Every write that sets a bit sets the
  key's expiry to the writer's `ttl`; a key whose last bit is cleared is deleted.
- `pods` (pod → id) and `names` (id → pod): the pod-id table. A pod gets an id at its first
  write: a retired id whose wait is over, else the next unused one, up to `max_ids`.
- `live`: a bitmap like a block's, both bits set for every id in use. A lookup reads only the
  live ids' bits.
- `retired`: a sorted set, id → when it may be reused (µs, Redis time). `clear_pod` (engine
  reset, pod gone) retires the pod's id: one command whatever the pod held, and its old bits
  are dead at once (not live). Its next write takes a new id. An id is reused only after the
  longest TTL any writer has used (`meta` maxttl) has passed since it was retired; until then
  every block write first ANDs the block with `live`, so a retired id's bits survive only in
  keys not written since the retirement, and those have expired by the time it is reused.
- `seen`: a sorted set, id → its last write (µs). When every id is taken, the id written least
  recently, if idle for longer than maxttl, is retired (a writer that died without clearing
  its pods leaves them behind); the write that found the table full is refused (-1).
- `meta`: a hash, `next` (the next never-used id) and `maxttl` (ms).

Standalone Redis/Valkey only (a lookup's keys are spread over every cluster slot).
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUT_VERSION = "v2"
MAX_POD_IDS = 16384  # ids at once: a block's bitmap is at most 4 KiB
MAX_MASK_BYTES = MAX_POD_IDS // 4  # two bits a pod
REUSE_SLACK_US = 10_000  # on top of maxttl before a retired id is reused (expiry is in ms)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The Redis key names of one shared index (`prefix`, e.g. `infergate:kv`)."""

    prefix: str

    @property
    def root(self) -> str:
        return f"{self.prefix}:{LAYOUT_VERSION}"

    def block(self, key: int) -> str:
        return f"{self.root}:b:{key:016x}"

    @property
    def table(self) -> list[str]:
        """The pod-id table's keys, in the order the write and clear scripts take them."""
        r = self.root
        return [f"{r}:meta", f"{r}:pods", f"{r}:names", f"{r}:live", f"{r}:retired", f"{r}:seen"]

    @property
    def live(self) -> str:
        return f"{self.root}:live"

    @property
    def names(self) -> str:
        return f"{self.root}:names"


# The write and clear scripts' common start: KEYS[1..6] the table (KeyLayout.table), ARGV[1]
# the pod, ARGV[2] the writer's ttl (ms). `retire` frees an id as described above.
_TABLE = """
local META, PODS, NAMES, LIVE, RETIRED, SEEN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local pod, ttl = ARGV[1], tonumber(ARGV[2])
local maxttl = tonumber(redis.call('HGET', META, 'maxttl') or '0')
if ttl > maxttl then
  maxttl = ttl
  redis.call('HSET', META, 'maxttl', ttl)
end
local function retire(id)
  local name = redis.call('HGET', NAMES, id)
  if name then redis.call('HDEL', PODS, name) end
  redis.call('HDEL', NAMES, id)
  redis.call('SETBIT', LIVE, 2 * id, 0)
  redis.call('SETBIT', LIVE, 2 * id + 1, 0)
  redis.call('ZREM', SEEN, id)
  redis.call('ZADD', RETIRED, string.format('%.0f', now + maxttl * 1000 + %(slack)d), id)
end
""".replace("%(slack)d", str(REUSE_SLACK_US))

# ARGV[3] max ids; KEYS[7..] block keys, ARGV[i - 3] the op on KEYS[i]: set bits + 4 * cleared
# bits (tier bits 1 gpu, 2 cpu; applied as bits = old & ~cleared | set).
# -> keys written, or -1 when no id is free for the pod (nothing written).
WRITE_SCRIPT = (
    _TABLE
    + """
local id = redis.call('HGET', PODS, pod)
if id then
  id = tonumber(id)
else
  local stamp = string.format('%.0f', now)
  local free = redis.call('ZRANGEBYSCORE', RETIRED, '-inf', stamp, 'LIMIT', 0, 1)
  if free[1] then
    id = tonumber(free[1])
    redis.call('ZREM', RETIRED, free[1])
  else
    local nxt = tonumber(redis.call('HGET', META, 'next') or '0')
    if nxt >= tonumber(ARGV[3]) then
      local idle = redis.call('ZRANGE', SEEN, 0, 0, 'WITHSCORES')
      if idle[1] and tonumber(idle[2]) + maxttl * 1000 < now then retire(tonumber(idle[1])) end
      return -1
    end
    id = nxt
    redis.call('HSET', META, 'next', nxt + 1)
  end
  redis.call('HSET', PODS, pod, id)
  redis.call('HSET', NAMES, id, pod)
  redis.call('SETBIT', LIVE, 2 * id, 1)
  redis.call('SETBIT', LIVE, 2 * id + 1, 1)
end
redis.call('ZADD', SEEN, string.format('%.0f', now), id)
local last = redis.call('ZRANGE', RETIRED, -1, -1, 'WITHSCORES')
local mask = last[2] ~= nil and tonumber(last[2]) > now
local gpu, cpu = 2 * id + 1, 2 * id
for i = 7, #KEYS do
  local k, op = KEYS[i], tonumber(ARGV[i - 3])
  local set, clr = op % 4, math.floor(op / 4)
  if set ~= 0 or redis.call('EXISTS', k) == 1 then
    if mask then redis.call('BITOP', 'AND', k, k, LIVE) end
    if bit.band(set, 1) ~= 0 then redis.call('SETBIT', k, gpu, 1)
    elseif bit.band(clr, 1) ~= 0 then redis.call('SETBIT', k, gpu, 0) end
    if bit.band(set, 2) ~= 0 then redis.call('SETBIT', k, cpu, 1)
    elseif bit.band(clr, 2) ~= 0 then redis.call('SETBIT', k, cpu, 0) end
    if set ~= 0 then
      redis.call('PEXPIRE', k, ttl)
    elseif redis.call('BITCOUNT', k) == 0 then
      redis.call('DEL', k)
    elseif mask then
      redis.call('PEXPIRE', k, ttl)  -- BITOP dropped the key's expiry
    end
  end
end
return #KEYS - 6
"""
)

# Everything the pod wrote is dead now; its next write takes a new id. -> 1, or 0 (no id).
CLEAR_SCRIPT = (
    _TABLE
    + """
local id = redis.call('HGET', PODS, pod)
if not id then return 0 end
retire(tonumber(id))
return 1
"""
)

# KEYS[1] live, KEYS[2] names, KEYS[3..] a prompt's block keys in order; ARGV[1] the most
# bytes of a bitmap read. The holders of KEYS[3] (live ids) are the candidates; the walk
# narrows them block by block and stops when none is left. A block whose bitmap is the same
# string as the one before (the common case along a shared prefix) costs one comparison; one
# that differs, a pass over the candidates' bytes.
# -> {} (no live holder of KEYS[3]), or {positions, names, segments}:
#   positions: the bitmap bytes (1-based) holding a candidate at KEYS[3], increasing;
#   names: {id, pod, ...} for the candidates with a name;
#   segments: {count, bytes, ...}: `count` consecutive blocks over which every candidate's bits
#   stay the same: the bitmap's bytes at `positions`, with the ended candidates' bits zeroed.
LOOKUP_SCRIPT = """
local band, bor, rshift, lshift, byte = bit.band, bit.bor, bit.rshift, bit.lshift, string.byte
local live = redis.call('GET', KEYS[1])
local first = #KEYS >= 3 and redis.call('GET', KEYS[3])
if not live or not first then return {} end
local n = math.min(#first, #live, tonumber(ARGV[1]))
local pos, cand, cur, ids = {}, {}, {}, {}
for j = 1, n do
  local b = band(byte(first, j), byte(live, j))
  if b ~= 0 then
    local c = #pos + 1
    pos[c], cur[c] = j, b
    cand[c] = band(bor(b, rshift(b, 1)), 0x55) * 3
    for k = 0, 3 do
      if band(b, lshift(3, 6 - 2 * k)) ~= 0 then ids[#ids + 1] = 4 * (j - 1) + k end
    end
  end
end
if #pos == 0 then return {} end
local names = {}
for s = 1, #ids, 1024 do  -- unpack's bound on values
  local chunk = {}
  for i = s, math.min(s + 1023, #ids) do chunk[#chunk + 1] = ids[i] end
  local got = redis.call('HMGET', KEYS[2], unpack(chunk))
  for i = 1, #chunk do
    if got[i] then
      names[#names + 1] = chunk[i]
      names[#names + 1] = got[i]
    end
  end
end
local segs, count, masked, prev = {}, 1, string.char(unpack(cur)), first
local batch, at, want = {}, 0, 8
for i = 4, #KEYS do
  if at == #batch then  -- read ahead in growing batches: fewer calls, little read past the end
    local names = {}
    for j = i, math.min(i + want - 1, #KEYS) do names[#names + 1] = KEYS[j] end
    batch, at, want = redis.call('MGET', unpack(names)), 0, math.min(want * 2, 256)
  end
  at = at + 1
  local v = batch[at]
  if not v then break end
  if v ~= prev then
    local any = false
    for c = 1, #pos do
      local m = cand[c]
      if m ~= 0 then
        local b = band(byte(v, pos[c]) or 0, m)
        m = band(bor(b, rshift(b, 1)), 0x55) * 3
        cand[c], cur[c] = m, b
        if m ~= 0 then any = true end
      end
    end
    if not any then break end
    prev = v
    local s = string.char(unpack(cur))
    if s ~= masked then
      segs[#segs + 1] = count
      segs[#segs + 1] = masked
      count, masked = 0, s
    end
  end
  count = count + 1
end
segs[#segs + 1] = count
segs[#segs + 1] = masked
return {pos, names, segs}
"""
