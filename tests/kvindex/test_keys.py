"""Tests for kvindex.keys: chained request keys over token ids."""

from __future__ import annotations

import array

import msgspec
import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from infergw.kvindex.keys import block_keys, encode_extras, model_root, prompt_keys

TOKENS = list(range(100, 164))  # 64 tokens


def test_keys_are_deterministic_64_bit_and_one_per_full_block():
    a = prompt_keys(TOKENS, 16, "m")
    assert a == prompt_keys(list(TOKENS), 16, "m")
    assert len(a) == 4 and len(set(a)) == 4
    assert all(0 <= k < 2**64 for k in a)


def lp(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b


def test_key_layout_is_xxh64_of_parent_tokens_and_length_prefixed_extras():
    # Pinned so that another implementation (or a future refactor) can reproduce the keys.
    root = xxhash.xxh64_intdigest(bytes(8) + lp(b"abc"))
    assert model_root("abc") == root
    toks = [1, 2, 70000, 4]
    tokens = np.array(toks, "<u4").tobytes()
    data = root.to_bytes(8, "little") + tokens
    assert block_keys(toks, 4, parent=root) == [xxhash.xxh64_intdigest(data)]
    # The LoRA name and the cache salt go into the root (vLLM: the adapter is in every block's
    # extra keys, the salt in the first block's; both then chain).
    salt = msgspec.msgpack.encode(["t-a"])
    lora_root = xxhash.xxh64_intdigest(bytes(8) + lp(b"abc") + b"L" + lp(b"sql1") + b"S" + lp(salt))
    want = xxhash.xxh64_intdigest(lora_root.to_bytes(8, "little") + tokens)
    assert prompt_keys(toks, 4, "abc", "sql1", "t-a") == [want]
    # Other extra keys (multimodal hashes) follow their block's tokens.
    mm = encode_extras((("img-hash", 3),))
    assert block_keys(toks, 4, parent=root, extras={0: mm}) == [xxhash.xxh64_intdigest(data + mm)]


def test_keys_are_chained_a_changed_block_changes_every_later_key():
    a = prompt_keys(TOKENS, 16, "m")
    changed = list(TOKENS)
    changed[20] += 1  # in block 1
    b = prompt_keys(changed, 16, "m")
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_trailing_partial_block_is_dropped():
    assert prompt_keys([*TOKENS, 1, 2, 3], 16, "m") == prompt_keys(TOKENS, 16, "m")
    assert prompt_keys(TOKENS[:15], 16, "m") == []
    assert prompt_keys([], 16, "m") == []


def test_model_and_lora_name_change_the_keys():
    base = prompt_keys(TOKENS, 16, "m")
    assert set(base).isdisjoint(prompt_keys(TOKENS, 16, "other"))
    lora = prompt_keys(TOKENS, 16, "m", "adapter")
    assert set(base).isdisjoint(lora)
    assert set(lora).isdisjoint(prompt_keys(TOKENS, 16, "m", "adapter2"))
    assert prompt_keys(TOKENS, 16, "m", None) == prompt_keys(TOKENS, 16, "m", "")
    assert model_root("m") != model_root("n")


def test_extras_are_length_prefixed():
    a = block_keys(TOKENS, 16, parent=1, extras={0: encode_extras(("ab", "c"))})
    b = block_keys(TOKENS, 16, parent=1, extras={0: encode_extras(("a", "bc"))})
    assert set(a).isdisjoint(b)
    assert model_root("m", "ab") != model_root("m", "a", encode_extras(("b",)))


def test_cache_salt_keys_every_block_apart():
    plain = prompt_keys(TOKENS, 16, "m")
    a = prompt_keys(TOKENS, 16, "m", cache_salt="tenant-a")
    b = prompt_keys(TOKENS, 16, "m", cache_salt="tenant-b")
    assert len(a) == 4 and a == prompt_keys(TOKENS, 16, "m", cache_salt="tenant-a")
    assert set(a).isdisjoint(plain) and set(a).isdisjoint(b)
    assert prompt_keys(TOKENS, 16, "m", cache_salt="") == plain  # vLLM ignores an empty salt
    assert set(prompt_keys(TOKENS, 16, "m", "tenant-a")).isdisjoint(a)  # a LoRA is not a salt


def test_block_size_changes_the_chunking():
    k16, k32 = prompt_keys(TOKENS, 16, "m"), prompt_keys(TOKENS, 32, "m")
    assert len(k16) == 4 and len(k32) == 2
    assert set(k16).isdisjoint(k32)


def test_numpy_tuple_and_array_inputs_give_the_same_keys():
    expected = prompt_keys(TOKENS, 16, "m")
    for toks in (
        tuple(TOKENS),
        np.array(TOKENS, np.int64),
        np.array(TOKENS, np.uint32),
        array.array("I", TOKENS),  # a prompt's ids, as epp/request.py keeps them
        array.array("q", TOKENS),  # not uint32: goes through the checked path
    ):
        assert prompt_keys(toks, 16, "m") == expected
    with pytest.raises(ValueError):
        prompt_keys(array.array("q", [2**32] * 16), 16, "m")


def test_a_root_asked_again_is_the_same_and_each_part_still_counts():
    assert model_root("m", "l", b"s") == model_root("m", "l", b"s")
    roots = {model_root("m"), model_root("m", "l"), model_root("m", None, b"s"), model_root("n")}
    assert len(roots) == 4


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        prompt_keys(TOKENS, 0, "m")
    with pytest.raises(ValueError):
        prompt_keys([-1] * 16, 16, "m")
    with pytest.raises(ValueError):
        prompt_keys([2**32] * 16, 16, "m")
    with pytest.raises(TypeError):
        prompt_keys([0.5] * 16, 16, "m")


@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=200),
    st.integers(0, 200),
    st.integers(1, 40),
    st.sampled_from([None, "lora-a"]),
)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(tokens, cut, block_size, lora):
    whole = prompt_keys(tokens, block_size, "model", lora)
    part = prompt_keys(tokens[:cut], block_size, "model", lora)
    assert len(part) == min(cut, len(tokens)) // block_size
    assert whole[: len(part)] == part
