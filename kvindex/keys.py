"""Request keys: our own chained 64-bit keys for blocks of token ids.

vLLM's block hashes depend on its hash algorithm, seed and block size, so the picker cannot
compute them from a prompt. The index is therefore keyed by these request keys, which both
sides (events and prompts) compute from tokens alone (the llm-d "xxh64" scheme):

    key_i = XXH64(key_{i-1} as 8 bytes LE ‖ block i's tokens as uint32 LE ‖ (len LE8 ‖ utf-8)*)

Chaining makes a key stand for the whole prefix up to its block, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from xxhash import xxh64_intdigest

_U32 = np.dtype("<u4")


def _extra_bytes(extra: Sequence[str] | None) -> bytes:
    # Length-prefixed so ("ab", "c") and ("a", "bc") differ.
    if not extra:
        return b""
    out = bytearray()
    for s in extra:
        b = s.encode("utf-8")
        out += len(b).to_bytes(8, "little")
        out += b
    return bytes(out)


def _as_u32(token_ids) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.dtype == _U32 or arr.size == 0:
        return arr.astype(_U32, copy=False)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"token ids must be a flat sequence of ints, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > 0xFFFFFFFF:
        raise ValueError("token ids must fit in uint32")
    return arr.astype(_U32)


def model_root(model: str) -> int:
    """The parent of a model's first block, so equal tokens under two models never share keys."""
    return xxh64_intdigest(bytes(8) + _extra_bytes((model,)))


def block_keys(
    token_ids, block_size: int, *, parent: int, extra: tuple[str, ...] | None = None
) -> list[int]:
    """One chained key per full block of `token_ids`; a trailing partial block is dropped
    (vLLM caches only full blocks). `extra` goes into every block's key."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    toks = _as_u32(token_ids)
    step = 4 * block_size
    end = (len(toks) // block_size) * step
    if end == 0:
        return []
    data = memoryview(toks.tobytes())  # one copy; slices below are views
    suffix = _extra_bytes(extra)
    keys = []
    h = parent
    for i in range(0, end, step):
        h = xxh64_intdigest(h.to_bytes(8, "little") + data[i : i + step] + suffix)
        keys.append(h)
    return keys


def prompt_keys(token_ids, block_size: int, model: str, lora_name: str | None = None) -> list[int]:
    """The keys of a prompt's full blocks. vLLM puts the LoRA name into every block's
    identity, so it is the extra key of every block here too."""
    extra = (lora_name,) if lora_name else None
    return block_keys(token_ids, block_size, parent=model_root(model), extra=extra)
