"""epp/response_ids.py and epp/response/ids.py: ids that name the pod that stored a response,
read back only by the pool (and key) that made them; answers' engine ids stamped, whole or
split across parts."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.response import response_chain
from infergw.epp.response.ids import ResponseIdStamper
from infergw.epp.response_ids import (
    MAX_ID_CHARS,
    PREFIX,
    BadResponseId,
    ResponseIds,
    StoredAt,
    _b64,
    load_key,
    pool_named,
)
from tests.fuzzing import fuzz_settings

KEY = b"k" * 32
ENGINE = "resp_0123456789abcdef0123456789abcdef"


def test_an_id_reads_back_as_the_pod_port_and_engine_id():
    ids = ResponseIds(KEY)
    made = ids.stamp("ns/pool", "pod-a", 8001, ENGINE)
    assert made.startswith(PREFIX) and made.endswith(ENGINE)
    assert ids.read("ns/pool", made) == StoredAt("pod-a", 8001, ENGINE)
    assert ResponseIds(KEY).read("ns/pool", made) is not None  # another replica, same key


def test_an_engines_own_id_is_not_ours():
    assert ResponseIds(KEY).read("ns/pool", ENGINE) is None
    assert pool_named(ENGINE) is None


def test_the_id_names_its_pool_for_the_router_without_a_key():
    made = ResponseIds(KEY).stamp("ns/llama-3", "pod-a", 8001, ENGINE)
    assert pool_named(made) == "llama-3"


@pytest.mark.parametrize("place", [b"Pool!/pod-a:8000", b"/pod-a:8000", b"pool/pod-a", b"\xff"])
def test_the_router_refuses_an_id_naming_no_pool(place):
    with pytest.raises(BadResponseId):
        pool_named(f"{PREFIX}{_b64(place)}.{_b64(b'm' * 16)}.{ENGINE}")


def _placed(made: str, place: bytes) -> str:
    """`made` with its pool and pod replaced, its MAC kept."""
    return PREFIX + _b64(place) + made[len(PREFIX) + made[len(PREFIX) :].index(".") :]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda i: i[:-1] + ("0" if i[-1] != "0" else "1"),  # another engine id
        lambda i: _placed(i, b"pool/pod-b:8001"),  # another pod
        lambda i: _placed(i, b"other/pod-a:8000"),  # another pool
        lambda i: PREFIX + i[len(PREFIX) :].replace(".", "!", 1),
        lambda i: PREFIX + "x.y.z",
        lambda i: PREFIX + "only-one-part",
        lambda i: i + "x" * MAX_ID_CHARS,
    ],
)
def test_an_edited_or_made_up_id_is_refused(tamper):
    ids = ResponseIds(KEY)
    made = ids.stamp("ns/pool", "pod-a", 8000, ENGINE)
    with pytest.raises(BadResponseId):
        ids.read("ns/pool", tamper(made))


def test_another_pools_or_keys_id_is_refused():
    made = ResponseIds(KEY).stamp("ns/pool", "pod-a", 8000, ENGINE)
    with pytest.raises(BadResponseId):
        ResponseIds(KEY).read("ns/other", made)
    with pytest.raises(BadResponseId):
        ResponseIds(b"z" * 32).read("ns/pool", made)
    unkeyed = ResponseIds(None).stamp("ns/pool", "pod-a", 8000, ENGINE)
    assert ResponseIds(None).read("ns/pool", unkeyed) == StoredAt("pod-a", 8000, ENGINE)
    with pytest.raises(BadResponseId):
        ResponseIds(None).read("ns/other", unkeyed)


@pytest.mark.parametrize(
    "place",
    ["pool/pod-a:", "pool/pod-a:x1", "pool/:8000", "pool/pod-a:\u00b2", "pool/pod-a", "pod-a:8000"],
)
def test_an_id_made_with_the_pools_own_key_still_needs_a_pod_and_port(place):
    """Without a key file anyone can compute the MAC: what it covers is checked all the same."""
    ids = ResponseIds(None)
    mac = ids._mac("ns/pool", place.partition("/")[2], ENGINE)
    made = f"{PREFIX}{_b64(place.encode())}.{_b64(mac)}.{ENGINE}"
    with pytest.raises(BadResponseId):
        ids.read("ns/pool", made)


def test_a_key_file_needs_enough_bytes(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_key(short)
    good = tmp_path / "good"
    good.write_text(" " + "a" * 40 + "\n")
    assert load_key(good) == b"a" * 40


# ---- stamping answers -----------------------------------------------------------------------


def stamper() -> ResponseIdStamper:
    return ResponseIdStamper(lambda engine_id: f"{PREFIX}P.M.{engine_id}")


def test_a_json_answers_ids_are_stamped_and_item_ids_kept():
    body = {
        "id": ENGINE,
        "previous_response_id": "resp_prev",
        "output": [{"id": "msg_1", "content": [{"text": '"id": "resp_in_text"'}]}],
    }
    chain, _ = response_chain(False, extra=stamper())
    out = b"".join([*chain.feed(json.dumps(body).encode()), *chain.flush()])
    got = json.loads(out)
    assert got["id"] == f"{PREFIX}P.M.{ENGINE}"
    assert got["previous_response_id"] == f"{PREFIX}P.M.resp_prev"
    assert got["output"][0]["id"] == "msg_1"
    assert got["output"][0]["content"][0]["text"] == '"id": "resp_in_text"'  # escaped: kept


def test_streamed_events_are_stamped_across_chunk_boundaries():
    events = [
        {"type": "response.created", "response": {"id": ENGINE}},
        {"type": "response.output_text.delta", "delta": "hi"},
        {"type": "response.completed", "response": {"id": ENGINE}},
    ]
    stream = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    chain, _ = response_chain(True, extra=stamper())
    out = b"".join(b"".join(chain.feed(stream[i : i + 7])) for i in range(0, len(stream), 7))
    out += b"".join(chain.flush())
    datas = [json.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    assert [d.get("response", {}).get("id") for d in datas] == [
        f"{PREFIX}P.M.{ENGINE}",
        None,
        f"{PREFIX}P.M.{ENGINE}",
    ]


def test_ids_split_between_parts_too_long_to_hold_are_stamped_once():
    s = stamper()
    data = b'{"pad":"' + b"x" * 1000 + b'","id":"' + ENGINE.encode() + b'","n":1}'
    for cut in range(990, len(data) - 5, 3):
        out = s.part(data[:cut], True) + s.part(data[cut:], True) + s.flush()
        assert out.count(PREFIX.encode()) == 1, cut
        assert json.loads(out)["id"] == f"{PREFIX}P.M.{ENGINE}"


_MADE = ResponseIds(KEY).stamp("ns/pool", "pod-ab", 8000, ENGINE)  # 22 base64 characters
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@fuzz_settings(300)
@given(
    st.one_of(
        st.text(max_size=200),
        st.text(max_size=60).map(lambda t: PREFIX + t),
        st.tuples(st.integers(0, 80), st.text(max_size=3)).map(
            lambda cut: _MADE[: cut[0]] + cut[1] + _MADE[cut[0] :]
        ),
        st.tuples(st.integers(0, 80), st.sampled_from(_B64)).map(
            lambda cut: _MADE[: cut[0]] + cut[1] + _MADE[cut[0] + 1 :]
        ),
        st.integers(0, 80).map(lambda cut: _MADE[:cut] + _MADE[cut + 1 :]),
    )
)
def test_only_the_ids_stamp_makes_read_back(given_id):
    """Whatever a client sends: None (an engine's id), BadResponseId, or the place it was
    stamped for, when it is exactly the id stamped for that place (base64 that decodes the
    same with a stray character or other padding bits is another id, refused)."""
    ids = ResponseIds(KEY)
    try:
        stored = ids.read("ns/pool", given_id)
    except BadResponseId:
        return
    if stored is None:
        assert not given_id.startswith(PREFIX)
    else:
        assert ids.stamp("ns/pool", stored.pod, stored.port, stored.engine_id) == given_id


@pytest.mark.parametrize("which", [0, 1])  # the place, the MAC
@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p[:3] + "~~" + p[3:],  # characters base64 skips
        lambda p: p[:-1] + _B64[_B64.index(p[-1]) ^ 1],  # a bit past the last byte
    ],
)
def test_base64_written_another_way_is_refused(which, edit):
    ids = ResponseIds(KEY)
    parts = _MADE[len(PREFIX) :].split(".", 2)
    assert len(parts[which]) % 4 in (2, 3)  # the last character has bits no byte uses
    parts[which] = edit(parts[which])
    with pytest.raises(BadResponseId):
        ids.read("ns/pool", PREFIX + ".".join(parts))
