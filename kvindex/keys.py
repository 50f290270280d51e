"""Request keys: our own chained 64-bit keys for blocks of token ids.

vLLM's block hashes depend on its hash algorithm, seed and block size, so the picker cannot
compute them from a prompt. The index is therefore keyed by these request keys, which both
sides (events and prompts) compute from tokens alone (the llm-d "xxh64" scheme):

    root  = XXH64(0 as 8 bytes ‖ lp(model) [‖ "L" lp(LoRA name)] [‖ "S" lp(first-block extras)])
    key_i = XXH64(key_{i-1} as 8 bytes LE ‖ block i's tokens as uint32 LE [‖ block i's extras])

(lp: 8-byte LE length, then the bytes; extras are msgpack, see `encode_extras`.) Chaining makes a
key stand for the whole prefix up to its block, as in vLLM. What matters is not vLLM's hash
values but its sharing rule: two requests get equal keys exactly where vLLM would share their
blocks. vLLM's extra keys (`generate_block_hash_extra_keys`) and where they go here:

- the LoRA name is in every block's extra keys, so equal chains need equal adapters from the
  start: it goes into the root;
- `cache_salt` is in the first block's extra keys only (start token 0), and chaining carries it
  to every later block: it goes into the root too, so a salted prompt shares nothing with an
  unsalted one or one salted otherwise;
- multimodal hashes are in the blocks an item overlaps; the index puts an engine block's
  remaining extra keys into each of its blocks that start inside that engine block.

Putting the first two into the root makes keys independent of the engine's block size; only
multimodal items need it, and the picker never has those (see kvindex/cache.py).
"""

from __future__ import annotations

import array
import functools
import sys
from collections.abc import Mapping

import msgspec
import numpy as np
from xxhash import xxh64_intdigest

_U32 = np.dtype("<u4")
_ENCODER = msgspec.msgpack.Encoder()


def _lp(b: bytes) -> bytes:
    # Length-prefixed so ("ab", "c") and ("a", "bc") differ.
    return len(b).to_bytes(8, "little") + b


def encode_extras(extras: tuple) -> bytes:
    """vLLM's extra keys of a block (str, int, bytes, nested tuples) as canonical bytes: msgpack
    is self-delimiting and gives one encoding per value."""
    return _ENCODER.encode(extras)


_U32_CODE = next(c for c in "IL" if array.array(c).itemsize == 4)


def _token_bytes(token_ids) -> memoryview:
    """The token ids as uint32 LE bytes. A list or tuple of ints (events, prompts) converts in
    one C call, with its range check; anything else goes through numpy."""
    if token_ids.__class__ is array.array and token_ids.typecode == _U32_CODE:
        # A prompt's ids (epp/request.py keeps them so): already uint32, in this machine's
        # order; numpy's checks cost more than hashing the prompt's blocks.
        if sys.byteorder == "little":
            return memoryview(token_ids).cast("B")
        token_ids = token_ids.tolist()
    if token_ids.__class__ is tuple or token_ids.__class__ is list:
        try:
            arr = array.array(_U32_CODE, token_ids)
        except OverflowError:
            raise ValueError("token ids must fit in uint32") from None
        if sys.byteorder != "little":
            arr.byteswap()
        return memoryview(arr).cast("B")
    return memoryview(_as_u32(token_ids).tobytes())


def _as_u32(token_ids) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.dtype == _U32 or arr.size == 0:
        return arr.astype(_U32, copy=False)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"token ids must be a flat sequence of ints, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > 0xFFFFFFFF:
        raise ValueError("token ids must fit in uint32")
    return arr.astype(_U32)


# A picker asks for the same few roots request after request (its models, adapters, salts);
# bounded, as a salt is the client's to choose.
@functools.lru_cache(maxsize=4096)
def model_root(model: str, lora_name: str | None = None, first_extras: bytes = b"") -> int:
    """The parent of a prompt's first block: equal tokens under two models, two adapters or two
    cache salts never share keys. `first_extras`: `encode_extras` of the first block's extra
    keys without the LoRA name (for a text prompt: its cache salt)."""
    data = bytes(8) + _lp(model.encode("utf-8"))
    if lora_name:
        data += b"L" + _lp(lora_name.encode("utf-8"))
    if first_extras:
        data += b"S" + _lp(first_extras)
    return xxh64_intdigest(data)


def block_keys(
    token_ids, block_size: int, *, parent: int, extras: Mapping[int, bytes] | None = None
) -> list[int]:
    """One chained key per full block of `token_ids`; a trailing partial block is dropped
    (vLLM caches only full blocks). `extras`: block index → encoded extra keys of that block."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    data = _token_bytes(token_ids)  # slices below are views
    step = 4 * block_size
    end = len(data) // step * step
    keys: list[int] = []
    append, h = keys.append, parent
    if extras:
        for i in range(0, end, step):
            h = xxh64_intdigest(
                h.to_bytes(8, "little") + data[i : i + step] + extras.get(i // step, b"")
            )
            append(h)
        return keys
    for i in range(0, end, step):
        h = xxh64_intdigest(h.to_bytes(8, "little") + data[i : i + step])
        append(h)
    return keys


def salt_extras(cache_salt: str | None) -> bytes:
    """A text prompt's first-block extra keys: its cache salt, if any (vLLM ignores an empty
    one)."""
    return encode_extras((cache_salt,)) if cache_salt else b""


def prompt_keys(
    token_ids,
    block_size: int,
    model: str,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> list[int]:
    """The keys of a text prompt's full blocks, for `model` (the base model), a LoRA adapter
    and a cache salt as vLLM keys them."""
    root = model_root(model, lora_name, salt_extras(cache_salt))
    return block_keys(token_ids, block_size, parent=root)
