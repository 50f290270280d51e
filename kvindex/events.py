"""Decoder for vLLM KV-cache events: live ZMQ PUB messages and ROUTER replay replies.

Wire format (vLLM ``vllm/distributed/kv_events.py``):

- live message: ``[topic utf-8, seq 8-byte big-endian, payload]``;
- replay reply: ``[b"", topic, seq, payload]`` (vLLM >= 0.26) or ``[b"", seq, payload]``;
  the end marker has seq 2**64-1 and an empty payload;
- payload: msgpack ``[ts, events, data_parallel_rank]`` (or, in one vLLM version, a map);
- event: a map with a ``"type"`` key (vLLM >= 0.26) or a legacy array ``[tag, fields...]``.

Every malformed input raises :class:`KVEventDecodeError`, never another exception type,
so a subscriber can drop one bad message and keep going.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

REPLAY_END_SEQ = 2**64 - 1
_U64_MAX = 2**64 - 1
_TOKEN_MAX = 2**32 - 1  # request keys hash token ids as uint32 (kvindex.keys)
# vLLM's extra keys are flat tuples (LoRA name, multimodal hashes, cache salt); deeper nesting
# is refused rather than walked, so a hostile payload cannot exhaust the stack.
MAX_EXTRA_KEYS_DEPTH = 8


class KVEventDecodeError(ValueError):
    """Malformed KV-event input; the message says what was wrong and where."""


@dataclass(slots=True, frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"
    lora_name: str | None = None
    extra_keys: tuple | None = None  # one tuple (or None) per block
    group_idx: int = 0
    kv_cache_spec_kind: str = "full_attention"
    # Decoded without token ids (decode_batch(tokens=False)): how many the event carried,
    # token_ids then holding a request's first store's first block only (else none).
    # None: token_ids has them all.
    token_count: int | None = None


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = "GPU"
    group_idx: int = 0


@dataclass(slots=True, frozen=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True, frozen=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None
    unknown_events: int = 0  # events of a type this decoder does not know; skipped


@dataclass(slots=True, frozen=True)
class KVMessage:
    topic: str
    seq: int
    batch: EventBatch


# --- field converters: return the converted value or raise _Invalid("must be ..., got ...")


class _Invalid(Exception):
    pass


def _kind(v: Any) -> str:
    return "nil" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return type(v) is int  # msgpack bools decode to bool, a subclass of int: reject them


def _hash(v: Any) -> int:
    if _is_int(v) and 0 <= v <= _U64_MAX:
        return v
    if isinstance(v, bytes) and v:
        # Raw digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): llm-d keys on the last 8 bytes.
        return int.from_bytes(v[-8:], "big")
    got = "an int outside uint64" if _is_int(v) else _kind(v)
    raise _Invalid(f"must be a uint64 int or digest bytes, got {got}")


def _hash_list(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise _Invalid(f"must be a list of hashes (uint64 ints or bytes), got {_kind(v)}")
    out = []
    for i, h in enumerate(v):
        try:
            out.append(_hash(h))
        except _Invalid as e:
            raise _Invalid(f"[{i}] {e}") from None
    return tuple(out)


def _token_list(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise _Invalid(f"must be a list of token ids, got {_kind(v)}")
    if all(type(t) is int for t in v) and (not v or (min(v) >= 0 and max(v) <= _TOKEN_MAX)):
        return tuple(v)  # the common case, without a Python loop per token
    for i, t in enumerate(v):
        if not (_is_int(t) and 0 <= t <= _TOKEN_MAX):
            got = _kind(t) if not _is_int(t) else t
            raise _Invalid(f"[{i}] must be a token id in 0..2**32-1, got {got}")
    return tuple(v)


def _non_neg_int(v: Any) -> int:
    if not (_is_int(v) and v >= 0):
        raise _Invalid(f"must be a non-negative int, got {_kind(v) if not _is_int(v) else v}")
    return v


def _int(v: Any) -> int:
    if not _is_int(v):
        raise _Invalid(f"must be an int, got {_kind(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"must be a string, got {_kind(v)}")
    return v


def _freeze(v: Any, depth: int) -> Any:
    # Lists -> tuples so events stay hashable and compare equal across encodings.
    if isinstance(v, list | dict) and depth >= MAX_EXTRA_KEYS_DEPTH:
        raise _Invalid(f"nests deeper than {MAX_EXTRA_KEYS_DEPTH} levels")
    if isinstance(v, list):
        return tuple(_freeze(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return tuple((_freeze(k, depth + 1), _freeze(x, depth + 1)) for k, x in v.items())
    return v


def _tuple(v: Any) -> tuple:
    if not isinstance(v, list):
        raise _Invalid(f"must be a list, got {_kind(v)}")
    if v.count(None) == len(v):  # a store's extra keys without LoRA, salt or images: C speed
        return tuple(v)
    return _freeze(v, 0)


_REQUIRED = object()

# Per event: (class, fields in legacy positional order as (name, converter, default)).
# Fields after the required ones are optional because older vLLM stops early (after
# lora_id or medium); extra trailing fields from newer vLLM are ignored. A nil value
# means the default: older vLLM types medium etc. as `str | None`.
_Fields = tuple[tuple[str, Callable[[Any], Any], Any], ...]
_EVENTS: dict[str, tuple[type, _Fields]] = {
    "BlockStored": (
        BlockStored,
        (
            ("block_hashes", _hash_list, _REQUIRED),
            ("parent_block_hash", _hash, None),
            ("token_ids", _token_list, _REQUIRED),
            ("block_size", _non_neg_int, _REQUIRED),
            ("lora_id", _int, None),
            ("medium", _str, "GPU"),
            ("lora_name", _str, None),
            ("extra_keys", _tuple, None),
            ("group_idx", _non_neg_int, 0),
            ("kv_cache_spec_kind", _str, "full_attention"),
        ),
    ),
    "BlockRemoved": (
        BlockRemoved,
        (
            ("block_hashes", _hash_list, _REQUIRED),
            ("medium", _str, "GPU"),
            ("group_idx", _non_neg_int, 0),
        ),
    ),
    "AllBlocksCleared": (AllBlocksCleared, ()),
}

_MISSING = object()


def _decode_event(raw: Any, where: str) -> KVEvent | None:
    """One event, or None if its type is unknown (newer vLLM may add event types)."""
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        raise KVEventDecodeError(
            f"{where}: event must be a map with 'type' or a [tag, ...] array, got {_kind(raw)}"
        )
    if not isinstance(tag, str):
        raise KVEventDecodeError(f"{where}: event type must be a string, got {_kind(tag)}")
    spec = _EVENTS.get(tag)
    if spec is None:
        return None
    cls, fields = spec
    kwargs = {}
    for pos, (name, conv, default) in enumerate(fields, start=1):
        if isinstance(raw, dict):
            v = raw.get(name, _MISSING)
        else:
            v = raw[pos] if pos < len(raw) else _MISSING
        if v is _MISSING and default is _REQUIRED:
            raise KVEventDecodeError(f"{where}: {tag}.{name} is missing")
        try:
            missing = v is _MISSING or (v is None and default is not _REQUIRED)
            kwargs[name] = default if missing else conv(v)
        except _Invalid as e:
            raise KVEventDecodeError(f"{where}: {tag}.{name} {e}") from None
    return cls(**kwargs)


# --- the fast path: a whole batch decoded and checked in C by msgspec typed Structs, in the
# two shapes vLLM sends (a [ts, events, rank] array of map events or of legacy array events).
# Anything it does not take (another shape, an unknown event type, a bad value) is decoded
# again by the generic path above, which skips unknown events and says what was wrong.

_Hash = Annotated[int, Meta(ge=0)] | bytes  # msgpack ints stop at 2**64 - 1
_Token = Annotated[int, Meta(ge=0, le=_TOKEN_MAX)]
_Count = Annotated[int, Meta(ge=0)]


def _typed_events(array_like: bool, tokens: bool = True):
    # Built by defstruct, not a class statement: its annotations would be strings, and
    # the token ids' type is chosen here (Raw: kept undecoded, see _tokens).
    Stored = msgspec.defstruct(
        "Stored",
        [
            ("block_hashes", list[_Hash]),
            ("parent_block_hash", _Hash | None, None),
            # Required, but after an optional field: UNSET (missing) is refused in _from_typed.
            ("token_ids", (list[_Token] if tokens else msgspec.Raw) | UnsetType, UNSET),
            ("block_size", _Count | UnsetType, UNSET),
            ("lora_id", int | None, None),
            ("medium", str | None, None),
            ("lora_name", str | None, None),
            ("extra_keys", list | None, None),
            ("group_idx", _Count | None, None),
            ("kv_cache_spec_kind", str | None, None),
        ],
        tag="BlockStored",
        tag_field="type",
        array_like=array_like,
    )

    class Removed(Struct, tag="BlockRemoved", tag_field="type", array_like=array_like):
        block_hashes: list[_Hash]
        medium: str | None = None
        group_idx: _Count | None = None

    class Cleared(Struct, tag="AllBlocksCleared", tag_field="type", array_like=array_like):
        pass

    batch = msgspec.defstruct(  # not a class statement: its annotations would be strings
        "Batch",
        [
            ("ts", float),
            ("events", list[Stored | Removed | Cleared]),
            ("data_parallel_rank", int | None, None),
        ],
        array_like=True,
    )
    return msgspec.msgpack.Decoder(batch), Stored, Removed


_MAP_DECODER, _MapStored, _MapRemoved = _typed_events(False)
_ARRAY_DECODER, _ArrayStored, _ArrayRemoved = _typed_events(True)
_MAP_DECODER_RAW, _MapStoredRaw, _MapRemovedRaw = _typed_events(False, tokens=False)
_ARRAY_DECODER_RAW, _ArrayStoredRaw, _ArrayRemovedRaw = _typed_events(True, tokens=False)
_STORED = (_MapStored, _ArrayStored, _MapStoredRaw, _ArrayStoredRaw)
_REMOVED = (_MapRemoved, _ArrayRemoved, _MapRemovedRaw, _ArrayRemovedRaw)


def _raw_count(raw: msgspec.Raw) -> int:
    """How many items a msgpack array holds, from its head alone."""
    b = bytes(memoryview(raw)[:5])
    if b and 0x90 <= b[0] <= 0x9F:
        return b[0] & 0x0F
    if b[:1] == b"\xdc" and len(b) >= 3:
        return int.from_bytes(b[1:3], "big")
    if b[:1] == b"\xdd" and len(b) == 5:
        return int.from_bytes(b[1:5], "big")
    raise _Invalid("token_ids must be a list of token ids")


def _first_ids(raw: msgspec.Raw, n: int) -> tuple[int, ...]:
    """The first n token ids of a msgpack array of them (the rest is not read)."""
    b = memoryview(raw)
    head = b[0] if len(b) else 0
    i = 1 if 0x90 <= head <= 0x9F else 3 if head == 0xDC else 5
    out = []
    try:
        for _ in range(n):
            t = b[i]
            if t <= 0x7F:
                out.append(t)
                i += 1
                continue
            size = _UINT_SIZES.get(t)
            if size is None:
                raise _Invalid(f"token_ids[{len(out)}] must be a token id in 0..2**32-1")
            out.append(int.from_bytes(b[i + 1 : i + 1 + size], "big"))
            i += 1 + size
    except IndexError:
        raise _Invalid("token_ids is cut short") from None
    return tuple(out)


_UINT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4}  # msgpack's uint 8/16/32 (64 is past a token id)


def _tokens(e) -> tuple[tuple[int, ...], int | None]:
    """(token ids, their count if not all decoded) of a typed store: of a Raw list only the
    first block's ids are read, and only for a request's first store (no parent)."""
    raw = e.token_ids
    if raw.__class__ is not msgspec.Raw:
        return tuple(raw), None
    count = _raw_count(raw)
    if e.parent_block_hash is None and count and e.block_size is not UNSET:
        return _first_ids(raw, min(count, e.block_size)), count
    return (), count


def _hashes(v: list) -> tuple[int, ...]:
    for h in v:
        if h.__class__ is not int:
            return _hash_list(v)  # digests (or a bad one: _Invalid)
    return tuple(v)


def _from_typed(raw) -> EventBatch:
    events: list[KVEvent] = []
    for e in raw.events:
        if e.__class__ in _STORED:
            if e.token_ids is UNSET or e.block_size is UNSET:
                raise _Invalid("a required field is missing")
            token_ids, token_count = _tokens(e)
            events.append(
                BlockStored(
                    _hashes(e.block_hashes),
                    None if e.parent_block_hash is None else _hash(e.parent_block_hash),
                    token_ids,
                    e.block_size,
                    e.lora_id,
                    "GPU" if e.medium is None else e.medium,
                    e.lora_name,
                    None if e.extra_keys is None else _tuple(e.extra_keys),
                    e.group_idx or 0,
                    "full_attention" if e.kv_cache_spec_kind is None else e.kv_cache_spec_kind,
                    token_count,
                )
            )
        elif e.__class__ in _REMOVED:
            events.append(
                BlockRemoved(
                    _hashes(e.block_hashes),
                    "GPU" if e.medium is None else e.medium,
                    e.group_idx or 0,
                )
            )
        else:
            events.append(AllBlocksCleared())
    return EventBatch(float(raw.ts), tuple(events), raw.data_parallel_rank, 0)


def _decode_typed(payload: bytes, tokens: bool = True) -> EventBatch | None:
    """The batch by the fast path, or None if it does not take it."""
    decoders = (_MAP_DECODER, _ARRAY_DECODER) if tokens else (_MAP_DECODER_RAW, _ARRAY_DECODER_RAW)
    for decoder in decoders:
        try:
            return _from_typed(decoder.decode(payload))
        except (ValueError, TypeError, RecursionError, _Invalid):
            continue
    return None


def decode_batch(payload: bytes, *, seq: int | None = None, tokens: bool = True) -> EventBatch:
    """Decode one msgpack batch payload. `seq` only makes error messages say where.
    `tokens=False`: a store's token ids are counted (BlockStored.token_count), and only the
    first block's decoded where a request starts (no parent): what an index keyed by the
    engines' hashes needs (kvindex.engine_translate), at a fraction of the cost."""
    fast = _decode_typed(payload, tokens)
    return _decode_generic(payload, seq) if fast is None else fast


def _decode_generic(payload: bytes, seq: int | None) -> EventBatch:
    """decode_batch over untyped msgpack, field by field: any shape vLLM has sent, unknown
    event types skipped, and the error that says what is wrong."""
    where = "batch" if seq is None else f"batch seq={seq}"
    try:
        raw = msgspec.msgpack.decode(payload)
    # ValueError covers msgspec.DecodeError and UnicodeDecodeError (a bad str inside the
    # payload); RecursionError comes from deep nesting; TypeError from a non-bytes payload.
    except (ValueError, RecursionError, TypeError) as e:
        raise KVEventDecodeError(f"{where}: payload is not valid msgpack: {e}") from None
    if isinstance(raw, list):
        if len(raw) < 2:
            raise KVEventDecodeError(
                f"{where}: batch array must be [ts, events, data_parallel_rank], "
                f"got {len(raw)} item(s)"
            )
        ts, events = raw[0], raw[1]
        dp_rank = raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict):
        if "ts" not in raw or "events" not in raw:
            raise KVEventDecodeError(f"{where}: batch map must have keys 'ts' and 'events'")
        ts, events, dp_rank = raw["ts"], raw["events"], raw.get("data_parallel_rank")
    else:
        raise KVEventDecodeError(f"{where}: batch must be a msgpack array or map, got {_kind(raw)}")
    if not (isinstance(ts, float) or _is_int(ts)):
        raise KVEventDecodeError(f"{where}: ts must be a number, got {_kind(ts)}")
    if not isinstance(events, list):
        raise KVEventDecodeError(f"{where}: events must be a list, got {_kind(events)}")
    if dp_rank is not None and not _is_int(dp_rank):
        raise KVEventDecodeError(
            f"{where}: data_parallel_rank must be an int or nil, got {_kind(dp_rank)}"
        )
    decoded = []
    for i, raw_event in enumerate(events):
        event = _decode_event(raw_event, f"event {i} of {where}")
        if event is not None:
            decoded.append(event)
    return EventBatch(float(ts), tuple(decoded), dp_rank, len(events) - len(decoded))


# --- frames


def _frames(frames: Any, counts: tuple[int, ...], what: str) -> list[bytes]:
    if not isinstance(frames, list | tuple):
        raise KVEventDecodeError(f"{what}: frames must be a list, got {_kind(frames)}")
    if len(frames) not in counts:
        want = " or ".join(map(str, counts))
        raise KVEventDecodeError(f"{what}: expected {want} frames, got {len(frames)}")
    out = []
    for i, f in enumerate(frames):
        try:
            out.append(f if isinstance(f, bytes) else bytes(memoryview(f)))  # zmq.Frame too
        except TypeError:
            raise KVEventDecodeError(f"{what}: frame {i} must be bytes, got {_kind(f)}") from None
    return out


def _seq(frame: bytes, what: str) -> int:
    if len(frame) != 8:
        raise KVEventDecodeError(f"{what}: seq frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def _topic(frame: bytes, what: str) -> str:
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KVEventDecodeError(f"{what}: topic frame is not valid UTF-8: {e}") from None


def decode_message(frames: list[bytes], *, tokens: bool = True) -> KVMessage:
    """Decode a live PUB message `[topic, seq, payload]` (`tokens`: as decode_batch's)."""
    frames = _frames(frames, (3,), "live message")
    topic = _topic(frames[0], "live message")
    seq = _seq(frames[1], f"live message topic={topic!r}")
    return KVMessage(topic, seq, decode_batch(frames[2], seq=seq, tokens=tokens))


def decode_replay_frames(frames: list[bytes], *, tokens: bool = True) -> KVMessage | None:
    """Decode one replay reply as a DEALER receives it; None for the end marker (`tokens`:
    as decode_batch's)."""
    frames = _frames(frames, (3, 4), "replay reply")
    if frames[0]:
        raise KVEventDecodeError(
            f"replay reply: first frame must be the empty delimiter, got {len(frames[0])} bytes"
        )
    topic = _topic(frames[1], "replay reply") if len(frames) == 4 else ""
    seq = _seq(frames[-2], "replay reply")
    if seq == REPLAY_END_SEQ:
        return None
    return KVMessage(topic, seq, decode_batch(frames[-1], seq=seq, tokens=tokens))


def parse_topic(topic: str | bytes) -> tuple[str, str]:
    """Split `kv@<ip:port>@<model>` into (pod "ip:port", model), as llm-d does."""
    if isinstance(topic, bytes):
        topic = _topic(topic, "parse_topic")
    if not isinstance(topic, str):
        raise KVEventDecodeError(f"topic must be a string, got {_kind(topic)}")
    parts = topic.split("@")
    if len(parts) != 3 or parts[0] != "kv" or not parts[2]:
        raise KVEventDecodeError(f"topic {topic!r} is not of the form kv@<ip:port>@<model>")
    host, _, port = parts[1].rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise KVEventDecodeError(f"topic {topic!r}: pod {parts[1]!r} is not <ip>:<port>")
    return parts[1], parts[2]
