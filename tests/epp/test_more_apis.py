"""The APIs an OpenAI-compatible client uses besides chat and completions: audio uploads
(multipart/form-data, epp/multipart.py), rerank, score and Anthropic's Messages — each routed
by its model, and every hostile body a 4xx in the OpenAI shape, never a 500."""

from __future__ import annotations

import json
import time

import pytest

from infergw.epp.errors import PickerError
from infergw.epp.extproc import ExternalProcessor
from infergw.epp.multipart import MAX_FIELD_BYTES, MAX_PART_HEADERS
from infergw.epp.request import api_for_path, parse_request
from tests import extproc_client as ec
from tests.director_fixtures import make_director, set_models

LIMIT = 32 * 1024 * 1024
B = "xyzBOUNDARY"
FORM = {"content-type": f"multipart/form-data; boundary={B}"}
WAV = b"RIFF\x00\x01\x02--not-the-boundary\r\n\xff\xfe"


def part(name: str, value: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{B}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode()
    return head + value + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{B}--\r\n".encode()


UPLOAD = form(
    part("file", WAV, "a.wav", "Content-Type: audio/wav\r\n"),
    part("model", b"whisper"),
    part("language", b"en"),
)


def parse(path: str, body: bytes | dict, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(path, raw, headers or {}, max_body_bytes=LIMIT)


def error_of(path: str, body: bytes | dict, headers=None) -> PickerError:
    with pytest.raises(PickerError) as info:
        parse(path, body, headers)
    return info.value


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/audio/transcriptions", "transcriptions"),
        ("/v1/audio/translations", "translations"),
        ("/v1/rerank", "rerank"),
        ("/rerank", "rerank"),
        ("/v1/score", "score"),
        ("/v1/messages", "messages"),
        ("/v1/audio/speech", None),
    ],
)
def test_the_new_paths_are_apis(path, api):
    assert api_for_path(path) == api


# ---- multipart uploads --------------------------------------------------------------------


def test_an_uploads_model_is_its_form_field_and_is_rewritten_in_place():
    req = parse("/v1/audio/transcriptions", UPLOAD, FORM)
    assert req.model == "whisper" and req.api == "transcriptions" and not req.stream
    out = req.body_for_upstream("whisper-large-v3")
    assert out == UPLOAD.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-large-v3\r\n")
    assert req.body_for_upstream("whisper") is UPLOAD  # unchanged: the same bytes


def test_a_quoted_boundary_and_a_preamble_are_read():
    headers = {"content-type": f'Multipart/Form-Data; charset=x; boundary="{B}"'}
    body = b"a preamble\r\n" + UPLOAD + b"an epilogue"
    assert parse("/v1/audio/translations", body, headers).model == "whisper"


CD_MODEL = 'Content-Disposition: form-data; name="model"'


def raw_part(headers: str, value: str = "a") -> bytes:
    """A part written by hand: `headers` as they are."""
    return f"--{B}\r\n{headers}\r\n\r\n{value}\r\n".encode()


HOSTILE_FORMS = {
    "json body": (json.dumps({"model": "m"}).encode(), {"content-type": "application/json"}),
    "no content-type": (UPLOAD, {}),
    "no boundary": (UPLOAD, {"content-type": "multipart/form-data"}),
    "boundary over 70": (UPLOAD, {"content-type": "multipart/form-data; boundary=" + "b" * 71}),
    "other boundary": (UPLOAD, {"content-type": "multipart/form-data; boundary=other"}),
    "no model": (form(part("file", WAV, "a.wav")), FORM),
    "empty model": (form(part("model", b"")), FORM),
    "model twice": (form(part("model", b"a"), part("model", b"b")), FORM),
    "model as a file": (form(part("model", b"a", "m.txt")), FORM),
    "model too long": (form(part("model", b"m" * (MAX_FIELD_BYTES + 1))), FORM),
    "model not utf-8": (form(part("model", b"\xff\xfe")), FORM),
    "no closing delimiter": (raw_part(CD_MODEL), FORM),
    "headers too long": (form(raw_part(CD_MODEL + "\r\nX: " + "y" * MAX_PART_HEADERS)), FORM),
    "no disposition": (form(raw_part("X: y")), FORM),
    "folded header": (form(raw_part('Content-Disposition: form-data;\r\n name="model"')), FORM),
    "escaped name": (form(raw_part('Content-Disposition: form-data; name="mo\\"del"')), FORM),
    "encoded name": (form(raw_part("Content-Disposition: form-data; name*=utf-8''model")), FORM),
    "name twice": (form(raw_part('Content-Disposition: form-data; name="x"; name="model"')), FORM),
    "not form-data": (form(raw_part('Content-Disposition: attachment; name="model"')), FORM),
    "junk after boundary": (
        form(raw_part(CD_MODEL).replace(B.encode(), B.encode() + b"x", 1)),
        FORM,
    ),
    "empty body": (b"", FORM),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FORMS))
def test_a_hostile_upload_is_400_in_the_openai_shape(name):
    body, headers = HOSTILE_FORMS[name]
    exc = error_of("/v1/audio/transcriptions", body, headers)
    assert exc.status == 400, exc.message
    error = exc.body()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400


def test_an_oversized_upload_is_413():
    with pytest.raises(PickerError) as info:
        parse_request("/v1/audio/transcriptions", UPLOAD, FORM, max_body_bytes=len(UPLOAD) - 1)
    assert info.value.status == 413


def test_many_parts_are_read_in_linear_time():
    body = form(*[part(f"f{i}", b"v") for i in range(50_000)], part("model", b"m"))
    started = time.perf_counter()
    assert parse("/v1/audio/transcriptions", body, FORM).model == "m"
    assert time.perf_counter() - started < 5
    # a megabyte of one delimiter-like pattern that never closes: refused, quickly
    hostile = f"--{B}\r\n".encode() + (b"\r\n-" * 1_000_000)
    started = time.perf_counter()
    assert error_of("/v1/audio/transcriptions", hostile, FORM).status == 400
    assert time.perf_counter() - started < 5


# ---- rerank, score, messages ----------------------------------------------------------------


def test_rerank_score_and_messages_are_routed_by_their_model():
    rerank = parse("/v1/rerank", {"model": "r", "query": "q", "documents": ["a", "b"]})
    assert rerank.model == "r" and "q" in rerank.prompt_text
    score = parse("/v1/score", {"model": "s", "text_1": "a", "text_2": ["b"]})
    assert score.model == "s" and score.prompt_text.startswith('"a"')
    messages = parse(
        "/v1/messages",
        {"model": "c", "system": "be brief", "max_tokens": 5, "stream": True,
         "messages": [{"role": "user", "content": "hi"}]},
    )  # fmt: skip
    assert messages.model == "c" and messages.stream and messages.max_tokens == 5
    assert messages.prompt_text.startswith('"be brief"')
    assert not messages.takes_stream_options  # Anthropic's stream always carries usage


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/rerank", {"model": "r", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"model": "r", "query": "q"}, "documents"),
        ("/v1/score", {"model": "s", "text_1": "a"}, "text_2"),
        ("/v1/messages", {"model": "c", "messages": []}, "messages"),
        ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/messages", {"model": "c", "max_tokens": 0, "messages": [1]}, "max_tokens"),
        ("/v1/rerank", b'{"model": "r", "query": ', None),
    ],
)
def test_missing_or_bad_members_are_400_naming_them(path, body, param):
    exc = error_of(path, body)
    assert exc.status == 400 and exc.param == param


@pytest.mark.parametrize(
    "path", ["/v1/audio/transcriptions", "/v1/messages", "/v1/rerank", "/v1/chat/completions"]
)
async def test_an_api_post_without_a_body_is_400_naming_the_model(path):
    out = await ec.process(ExternalProcessor(make_director()), [ec.headers(path, eos=True)])
    status, body = ec.immediate(out)
    assert status == 400 and body["error"]["param"] == "model"


async def test_an_upload_goes_to_a_pod_serving_its_model_through_the_stream():
    director = make_director(fallbacks=0)
    set_models(director, {a.address: {"whisper"} for a in director.datastore.endpoints()})
    servicer = ExternalProcessor(director)
    out = await ec.process(
        servicer,
        [ec.headers("/v1/audio/transcriptions", extra=FORM), ec.body(UPLOAD)],
    )
    assert ec.immediate(out) is None
    assert ec.set_headers(out[0])["x-gateway-destination-endpoint"]
    assert b"".join(c for c, _ in ec.streamed_bodies(out)) == UPLOAD
    out = await ec.process(
        servicer, [ec.headers("/v1/audio/transcriptions", extra=FORM), ec.body(b"junk")]
    )
    assert ec.immediate(out)[0] == 400
    unknown = UPLOAD.replace(b"whisper", b"nobody")
    out = await ec.process(
        servicer, [ec.headers("/v1/audio/transcriptions", extra=FORM), ec.body(unknown)]
    )
    assert ec.immediate(out)[0] == 404
