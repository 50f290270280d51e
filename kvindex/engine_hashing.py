"""vLLM's own block hashes, computed by the picker (the index's "engine keys" mode).

When the picker hashes a prompt exactly as the engines do, the index can be keyed by the hashes
the KV events carry: no engine-hash → request-key map per pod (kvindex.translate), and events
go into the index as they come. This is what vLLM 0.32 does (vllm/v1/core/kv_cache_utils.py,
vllm/utils/hashing.py), checked against a recording of a real vLLM (tests/kvindex):

    root    = H(seed)              seed: PYTHONHASHSEED if set, else "vllm-none-hash" for
                                   sha256 / sha256_cbor (xxhash ones draw a random seed)
    block_i = H((block_{i-1} or root, tuple(block i's token ids), extra_i or None))
    event   = int.from_bytes(block_i, "big") & (2**64 - 1)
                                   (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the default;
                                   with 0 the events carry the digest, cut the same way on
                                   decoding: kvindex.events)

H serializes with pickle (protocol 5) or canonical CBOR (kvindex.block_encoding), then
SHA-256 or XXH3-128. A text
prompt's extra keys, tagged as vLLM 0.32 tags them: ("lora", name, path) in every block of a
LoRA request, then ("cache_salt", salt) in the first block only. The events publish them
untagged (the bare name, the bare salt), so a LoRA adapter's path must be configured: vLLM
hashes it and never publishes it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

from infergw.api.engine_keys import SEEDED_ONLY_ALGOS
from infergw.kvindex.block_encoding import CBOR, PICKLE, BlockWriter, serialize

MAX_ENGINE_BLOCK_SIZE = 1 << 16  # tokens; vLLM's largest (hybrid models) are a few thousand
CACHE_BLOCKS = 1 << 15  # block digests kept for shared prefixes: ~8 MB
DEFAULT_SEED = "vllm-none-hash"  # vLLM's seed for the root when PYTHONHASHSEED is unset


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# algorithm (api/engine_keys.py's HASH_ALGOS) → (how the item is serialized, its bytes' digest)
HASH_ALGOS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "sha256": (PICKLE, _sha256),
    "sha256_cbor": (CBOR, _sha256),
    "xxhash": (PICKLE, xxhash.xxh3_128_digest),
    "xxhash_cbor": (CBOR, xxhash.xxh3_128_digest),
}


_U32 = next(c for c in "IL" if array(c).itemsize == 4)


def _u32(token_ids) -> array:
    """The ids as a uint32 array (a prompt's already are: epp/request.py keeps them so)."""
    if token_ids.__class__ is array and token_ids.typecode == _U32:
        return token_ids
    try:
        return array(_U32, token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)
    except OverflowError:
        raise ValueError("token ids must fit in uint32") from None


def event_hash(digest: bytes) -> int:
    """A block digest as the KV events name it: its low 64 bits."""
    return int.from_bytes(digest[-8:], "big")


@dataclass(frozen=True, slots=True)
class EngineHashing:
    """How the engines hash blocks: their `--prefix-caching-hash-algo`, their PYTHONHASHSEED
    (None: unset), their `--block-size`, and the path each LoRA adapter was loaded from."""

    algo: str = "sha256"
    seed: str | None = None
    block_size: int = 16
    lora_paths: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in HASH_ALGOS:
            raise ValueError(
                f"unknown prefix-caching hash algorithm {self.algo!r} "
                f"(one of {', '.join(HASH_ALGOS)})"
            )
        if self.seed is None and self.algo in SEEDED_ONLY_ALGOS:
            raise ValueError(
                f"engines hashing with {self.algo} without PYTHONHASHSEED draw a random root "
                "per process: set PYTHONHASHSEED on them and give the picker the same seed"
            )
        if not 0 < self.block_size <= MAX_ENGINE_BLOCK_SIZE:
            raise ValueError(f"engine block size must be 1..{MAX_ENGINE_BLOCK_SIZE}")

    def describe(self) -> str:
        """The settings, as a log line names them."""
        seed = "unset" if self.seed is None else repr(self.seed)
        return (
            f"--prefix-caching-hash-algo {self.algo}, PYTHONHASHSEED {seed}, "
            f"--block-size {self.block_size}"
        )


class EngineKeys:
    """A prompt's block hashes as its engine computes them (64-bit, as the events carry them);
    blocks without extra keys are written by kvindex.block_encoding (and their digests kept,
    bounded, for the next prompt sharing the prefix), the rest by the serializer itself."""

    def __init__(self, hashing: EngineHashing) -> None:
        self.hashing = hashing
        self.block_size = hashing.block_size
        self._fmt, self._digest = HASH_ALGOS[hashing.algo]
        self.root = self._h(DEFAULT_SEED if hashing.seed is None else hashing.seed)
        self._writer = BlockWriter(self._fmt, self.block_size, len(self.root))
        # parent digest ‖ a block's written ids → its digest: prompts sharing a prefix (a
        # system prompt, a conversation's earlier turns) hash only their new blocks.
        self._cache: dict[bytes, bytes] = {}

    def _h(self, item: object) -> bytes:
        return self._digest(serialize(self._fmt, item))

    def _lora_key(self, lora_name: str | None) -> tuple[str, str, str] | None:
        if not lora_name:
            return None
        path = self.hashing.lora_paths.get(lora_name)
        return None if path is None else ("lora", lora_name, path)

    def extra_keys(self, index: int, lora_name: str | None, cache_salt: str | None) -> tuple | None:
        """Block `index`'s extra keys, tagged as vLLM hashes them; None if none."""
        keys = []
        lora = self._lora_key(lora_name)
        if lora is not None:
            keys.append(lora)
        if index == 0 and cache_salt:
            keys.append(("cache_salt", cache_salt))
        return tuple(keys) or None

    def knows(self, lora_name: str | None) -> bool:
        """Whether a prompt of this adapter can be hashed (its path is configured)."""
        return not lora_name or lora_name in self.hashing.lora_paths

    def digests(
        self, token_ids: Sequence[int], lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[bytes]:
        """The full digests of the prompt's full blocks (a trailing partial block has none)."""
        if not self.knows(lora_name):
            raise ValueError(f"no path configured for LoRA adapter {lora_name!r}")
        bs, digest, h = self.block_size, self._digest, self._h
        ids = _u32(token_ids)
        lora = self._lora_key(lora_name)
        rest = (lora,) if lora is not None else None  # every block after the first
        first = self.extra_keys(0, lora_name, cache_salt)
        written = self._writer.blocks(ids) if rest is None else None
        item, cache = self._writer.item, self._cache
        parent, out = self.root, []
        for i in range(len(ids) // bs):
            extra = rest if i else first
            if extra is None and written is not None:
                key = parent + written[i]
                d = cache.get(key)
                if d is None:
                    d = digest(item(parent, written[i]))
                    if len(cache) >= CACHE_BLOCKS:
                        cache.clear()  # cheaper than an LRU's bookkeeping on every block
                    cache[key] = d
                parent = d
            else:
                parent = h((parent, tuple(ids[i * bs : (i + 1) * bs]), extra))
            out.append(parent)
        return out

    def keys(
        self, token_ids: Sequence[int], lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[int]:
        """The prompt's block hashes as the KV events name them."""
        return [event_hash(d) for d in self.digests(token_ids, lora_name, cache_salt)]

    def first_block(self, token_ids: Sequence[int], extra: tuple | None) -> int:
        """The event hash of a request's first block with these (tagged) extra keys."""
        return event_hash(self._h((self.root, tuple(token_ids[: self.block_size]), extra)))
