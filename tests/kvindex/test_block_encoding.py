"""kvindex.block_encoding writes exactly the bytes pickle and cbor2 write for vLLM's block item
(parent digest, tuple of token ids, None), for ids of every size class and its edges."""

from __future__ import annotations

import hashlib
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.kvindex.block_encoding import CBOR, PICKLE, BlockWriter, serialize

EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**31 - 1]
_IDS = st.lists(st.sampled_from(EDGES) | st.integers(0, 2**31 - 1), max_size=200)


@pytest.mark.parametrize("fmt", [PICKLE, CBOR])
@pytest.mark.parametrize("digest", [32, 16])  # sha256, xxh3-128
@given(ids=_IDS, block_size=st.integers(4, 40))
def test_blocks_are_written_as_the_serializer_writes_them(fmt, digest, ids, block_size):
    writer = BlockWriter(fmt, block_size, digest)
    parent = hashlib.sha256(repr(ids[:3]).encode()).digest()[:digest]
    blocks = writer.blocks(array("I", ids))
    assert blocks is not None and len(blocks) == len(ids) // block_size
    for i, block in enumerate(blocks):
        item = (parent, tuple(ids[i * block_size : (i + 1) * block_size]), None)
        assert writer.item(parent, block) == serialize(fmt, item)


def test_what_the_fast_form_leaves_to_the_serializer():
    assert BlockWriter(PICKLE, 3, 32).blocks(array("I", [1, 2, 3])) is None  # TUPLE3 opcode
    assert BlockWriter(PICKLE, 4, 32).blocks(array("I", [2**31, 1, 2, 3])) is None  # LONG1
    wide = BlockWriter(CBOR, 4, 32)
    ids = [2**32 - 1, 2**31, 7, 300]
    (block,) = wide.blocks(array("I", ids))
    assert wide.item(b"p" * 32, block) == serialize(CBOR, (b"p" * 32, tuple(ids), None))
    assert BlockWriter(CBOR, 4, 32).blocks(array("I", [1, 2, 3])) == []
