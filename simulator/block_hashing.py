"""vLLM's prefix-cache block identity: hash(parent, block tokens, extra keys), full blocks only.

The extra keys are vLLM's `generate_block_hash_extra_keys` for a text request: the LoRA adapter
in every block, the cache salt in the first block only (start token 0; chaining carries it on).
vLLM 0.32 hashes them tagged — ("lora", name, path), ("cache_salt", salt) — and publishes them
in its KV events untagged (the bare name, the bare salt): `hashed_extra_keys` and
`block_extra_keys` are the two forms.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence

import cbor2

HashFn = Callable[[object], bytes]


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


HASH_FUNCTIONS: dict[str, HashFn] = {"sha256": _sha256_pickle, "sha256_cbor": _sha256_cbor}


def none_hash(hash_fn: HashFn, seed: int) -> bytes:
    """The parent of a prompt's first block. vLLM seeds it from PYTHONHASHSEED; we use --seed so
    that two simulators started alike produce the same block hashes."""
    return hash_fn(str(seed))


def event_hash(digest: bytes) -> int:
    """vLLM publishes the low 64 bits of the digest (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1)."""
    return int.from_bytes(digest[-8:], "big")


class BlockHasher:
    """Extends a request's chain of block hashes as its token list grows."""

    __slots__ = ("block_size", "hash_fn", "root")

    def __init__(self, block_size: int, algo: str, seed: int) -> None:
        if algo not in HASH_FUNCTIONS:
            raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}")
        self.block_size = block_size
        self.hash_fn = HASH_FUNCTIONS[algo]
        self.root = none_hash(self.hash_fn, seed)

    def extend(
        self,
        hashes: list[bytes],
        tokens: Sequence[int],
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_path: str | None = None,
    ) -> None:
        """Append hashes for every full block of `tokens` not hashed yet."""
        bs = self.block_size
        full = len(tokens) // bs
        parent = hashes[-1] if hashes else self.root
        for i in range(len(hashes), full):
            block = tuple(tokens[i * bs : (i + 1) * bs])
            extra = hashed_extra_keys(i, lora_name, lora_path, cache_salt)
            parent = self.hash_fn((parent, block, extra))
            hashes.append(parent)


def block_extra_keys(index: int, lora_name: str | None, cache_salt: str | None) -> tuple | None:
    """Block `index`'s extra keys as vLLM orders them (LoRA, multimodal, salt); None if none."""
    keys = ([lora_name] if lora_name else []) + ([cache_salt] if index == 0 and cache_salt else [])
    return tuple(keys) or None


def hashed_extra_keys(
    index: int, lora_name: str | None, lora_path: str | None, cache_salt: str | None
) -> tuple | None:
    """Block `index`'s extra keys as vLLM 0.32 hashes them (tagged); None if none."""
    lora = [("lora", lora_name, lora_path or "")] if lora_name else []
    salt = [("cache_salt", cache_salt)] if index == 0 and cache_salt else []
    return tuple(lora + salt) or None
