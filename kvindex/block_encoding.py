"""The bytes vLLM hashes for a block, (parent digest, tuple of token ids, extra keys), written
without building the tuple: pickle protocol 5 or canonical CBOR, as vLLM's `sha256` /
`sha256_cbor` (and xxhash) algorithms serialize it.

Serializing one block at a time through pickle or cbor2 costs several µs (a tuple of ints
built, walked and written); here a prompt's token ids are written for all its blocks in a few
numpy steps, and each block's bytes are then joined around them. Only the common item is
written so: no extra keys (None), token ids below 2**31 (pickle) and blocks of at least 4
tokens (pickle writes shorter tuples with other opcodes); anything else goes through pickle or
cbor2 themselves (`serialize`). tests/kvindex/test_block_encoding.py checks both against them.
"""

from __future__ import annotations

import pickle
from array import array

import cbor2
import numpy as np

PICKLE, CBOR = "pickle", "cbor"
_PICKLE_PROTOCOL = 5  # vLLM's pickle.HIGHEST_PROTOCOL (Python 3.8 to 3.14)
_BININT = ord("J")  # pickle's 4-byte int opcode; BININT2 is "M" (+3), BININT1 "K" (+1)
_COLUMNS = np.arange(8)  # an id's bytes, at most 5 of its 8 columns used


def serialize(fmt: str, item: object) -> bytes:
    """Any item, by the serializer itself."""
    if fmt == PICKLE:
        return pickle.dumps(item, protocol=_PICKLE_PROTOCOL)
    return cbor2.dumps(item, canonical=True)


def _pickle_ids(t: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per id: its opcode then its little-endian bytes (8 columns), and how many it takes:
    BININT1 (1 byte), BININT2 (2) or BININT (4)."""
    if t.size and int(t.max()) >= 1 << 31:
        return None  # pickle writes those as LONG1: rare, left to pickle
    small, mid = (t < 256).astype(np.uint8), (t < 65536).astype(np.uint8)
    op = _BININT + 3 * mid - 2 * small  # J, M (+3), K (+1)
    enc = op.astype(np.uint64) | t.astype(np.uint64) << np.uint64(8)
    return enc.astype("<u8").view(np.uint8).reshape(-1, 8), 5 - 2 * mid - small


def _cbor_ids(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per id: CBOR's shortest unsigned int, big-endian from the first column (8 columns),
    and how many bytes it takes: the value in the head below 24, else a head (0x18, 0x19,
    0x1A) and 1, 2 or 4 bytes."""
    tiny, small, mid = (t < 24), (t < 256), (t < 65536)
    k = np.where(tiny, 0, np.where(small, 1, np.where(mid, 2, 4))).astype(np.uint64)
    head = np.where(tiny, t, np.where(small, 0x18, np.where(mid, 0x19, 0x1A))).astype(np.uint64)
    value = np.where(tiny, 0, t).astype(np.uint64)
    enc = (head << (k * np.uint64(8)) | value) << ((np.uint64(7) - k) * np.uint64(8))
    return enc.astype(">u8").view(np.uint8).reshape(-1, 8), (k + 1).astype(np.int64)


def _cbor_head(major: int, n: int) -> bytes:
    """A CBOR item head: major type and length, shortest form."""
    if n < 24:
        return bytes([major << 5 | n])
    for code, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | code]) + n.to_bytes(size, "big")
    raise ValueError("too long for CBOR")


class BlockWriter:
    """Writes (parent, block's ids, None) as `fmt` for every full block of a prompt."""

    def __init__(self, fmt: str, block_size: int, digest_size: int) -> None:
        self.fmt, self.block_size = fmt, block_size
        if fmt == PICKLE:
            self._parent = b"C" + bytes([digest_size])
            self._mid, self._end = b"\x94(", b"t\x94N\x87\x94."
        else:
            self._parent = b"\x83" + _cbor_head(2, digest_size)
            self._mid, self._end = _cbor_head(4, block_size), b"\xf6"

    def blocks(self, ids: array) -> list[bytes] | None:
        """Each full block's ids as they sit inside the item; None if the fast form does not
        apply (then `serialize` each item)."""
        bs = self.block_size
        n = len(ids) // bs
        if not n:
            return []
        if self.fmt == PICKLE and bs < 4:
            return None
        t = np.frombuffer(ids, np.uint32, n * bs)
        cols = _pickle_ids(t) if self.fmt == PICKLE else _cbor_ids(t)
        if cols is None:
            return None
        mat, lens = cols
        # Each id's first lens bytes, in order: one pass over a flat mask.
        keep = (_COLUMNS < lens[:, None]).reshape(-1)
        flat = np.compress(keep, mat.reshape(-1)).tobytes()
        ends = np.cumsum(lens.reshape(n, bs).sum(axis=1)).tolist()
        return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def item(self, parent: bytes, block: bytes) -> bytes:
        """The serialized (parent, ids, None), `block` being one of `blocks`' answers."""
        body = self._parent + parent + self._mid + block + self._end
        if self.fmt == PICKLE:  # protocol 5 frames the rest: its length first
            return b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body
        return body
