"""The fields of an OpenAI-style request body the picker reads, decoded straight from its bytes.

Only these fields become Python objects, and bulky ones (messages, prompt, input, tools) stay
`msgspec.Raw`: zero-copy slices of the body, so a body of a million empty objects costs the
picker its bytes and no object tree. Every other field is skipped, yet the whole body is still
checked — syntax, lone surrogates and nesting depth by the decoder, UTF-8 and integers too long
for Python here — so that what the picker passes on is what a model server can parse.
"""

from __future__ import annotations

import codecs
import functools
import re
import sys
from typing import Annotated

import msgspec

from infergw.epp.errors import PickerError
from infergw.epp.json_splice import JSON_STRING, find_member

# An upper bound on max_tokens and its kin. vLLM bounds them by the model's context window,
# which the picker does not know; 2**24 is above every context window served today, and keeps
# in-flight token counts and fair-share charges finite.
MAX_TOKENS_CEILING = 1 << 24

# Python's own limit on converting digits to an int (engines parse bodies with Python).
MAX_INTEGER_DIGITS = sys.get_int_max_str_digits() or 4300
_LONG_INTEGER = re.compile(rb"(?<![\d.])\d{%d,}(?![\d.eE])" % (MAX_INTEGER_DIGITS + 1))

_UTF8_SLICE = 1 << 16

TokenCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_CEILING)]


class StreamOptions(msgspec.Struct, omit_defaults=True):
    """vLLM's stream_options: other keys are dropped, as vLLM ignores them."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class RequestBody(msgspec.Struct):
    stream: bool | None = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    max_output_tokens: TokenCount | None = None  # the Responses API's
    cache_salt: str | None = None
    add_generation_prompt: bool | None = None
    # Kept as the client's bytes: model and stream_options are decoded by parse_request and
    # may be rewritten in place (epp/json_splice.py); the rest is decoded only for a tokenizer.
    model: msgspec.Raw = msgspec.Raw()
    stream_options: msgspec.Raw = msgspec.Raw()
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    instructions: msgspec.Raw = msgspec.Raw()
    tools: msgspec.Raw = msgspec.Raw()
    chat_template_kwargs: msgspec.Raw = msgspec.Raw()
    system: msgspec.Raw = msgspec.Raw()  # Anthropic's Messages API
    query: msgspec.Raw = msgspec.Raw()  # rerank
    documents: msgspec.Raw = msgspec.Raw()
    text_1: msgspec.Raw = msgspec.Raw()  # score
    text_2: msgspec.Raw = msgspec.Raw()
    # The Responses API's: which pod stored the response it continues (epp/stored_responses.py).
    previous_response_id: msgspec.Raw = msgspec.Raw()
    store: msgspec.Raw = msgspec.Raw()

    @property
    def max_output(self) -> int | None:
        """The request's output token limit, under whichever name its API uses."""
        for value in (self.max_completion_tokens, self.max_tokens, self.max_output_tokens):
            if value is not None:
                return value
        return None


_DECODER = msgspec.json.Decoder(RequestBody)


def present(raw: msgspec.Raw) -> bool:
    """A Raw field the client set to something other than null."""
    return len(raw) > 0 and (len(raw) != 4 or bytes(raw) != b"null")


def decode_body(raw_body: bytes) -> RequestBody:
    """The body's picker fields; PickerError 400 naming the field when the body is not
    well-formed JSON or a field has the wrong type or an out-of-range value."""
    body = _decode(_DECODER, raw_body, "")
    _check_utf8(raw_body)
    # Skipped fields may hold integers Python cannot convert (the engine's JSON parser
    # raises on them): refuse them here, looking past strings only when a long run of
    # digits is there at all.
    if _LONG_INTEGER.search(raw_body) and _LONG_INTEGER.search(JSON_STRING.sub(b'""', raw_body)):
        raise PickerError(
            400, f"request body has an integer of more than {MAX_INTEGER_DIGITS} digits"
        )
    return body


def decode_field(raw: msgspec.Raw, name: str, decoder: msgspec.json.Decoder):
    """One Raw field, typed by `decoder`: PickerError 400 naming the field if it does not fit."""
    return _decode(decoder, raw, name)


def _decode(decoder: msgspec.json.Decoder, data, field: str):
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        # msgspec says where: "Expected `int` >= 1 - at `$.max_tokens`".
        message, _, where = str(exc).partition(" - at `$")
        param = ".".join(p for p in (field, where.rstrip("`").lstrip(".")) if p) or None
        what = f"request field {param!r}" if param else "request body"
        raise PickerError(400, f"invalid {what}: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise PickerError(400, f"request body is not valid JSON: {_explain(str(exc))}") from None
    except RecursionError:
        raise PickerError(400, "request body is not valid JSON: nested too deeply") from None


TEXT = msgspec.json.Decoder(str)
STREAM_OPTIONS = msgspec.json.Decoder(StreamOptions)


def requested_model(body: RequestBody) -> str:
    """The body's `model`: PickerError 400 unless it is a non-empty string."""
    model = decode_field(body.model, "model", TEXT) if present(body.model) else None
    if not model:
        raise PickerError(400, "'model' is required and must be a non-empty string", param="model")
    return model


def check_routed_member(raw_body: bytes, name: str, raw: msgspec.Raw) -> None:
    """A member a router reads (and may rewrite) must be where every reader finds it: once,
    named without escapes. Else an engine could read another copy than the router did
    (`{"model":"a","mod\\u0065l":"b"}`) or a rewrite would find no copy to change."""
    if not len(raw):
        return
    if _named_once_plainly(raw_body, name):
        return
    member = find_member(raw_body, name)  # one pass over the body
    if member.count > 1:
        raise PickerError(400, f"the member {name!r} appears more than once", param=name)
    if member.offset is None:
        raise PickerError(
            400, f"the member name {name!r} must be written without escapes", param=name
        )


def _named_once_plainly(raw_body: bytes, name: str) -> bool:
    """The usual body, told by two scans in C instead of find_member's pass in Python: the
    member is there (the decoder read it), a name can be escaped only by a \\u sequence and
    the body has none, and its quoted name occurs once in all the bytes — so that once is
    the member, and no other top-level copy exists."""
    return b"\\u" not in raw_body and raw_body.count(_quoted(name)) == 1


@functools.lru_cache(maxsize=16)  # the picker's few routed member names
def _quoted(name: str) -> bytes:
    return b'"' + name.encode() + b'"'


def _check_utf8(raw_body: bytes) -> None:
    """Skipped fields are not checked for UTF-8 by the decoder: check the body, a slice at a
    time (decoding it whole could take four times its size as a str)."""
    if raw_body.isascii():
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw_body)
    try:
        for at in range(0, len(view), _UTF8_SLICE):
            decoder.decode(view[at : at + _UTF8_SLICE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise PickerError(400, f"request body is not valid UTF-8: {exc.reason}") from None


def _explain(message: str) -> str:
    # msgspec reports a lone UTF-16 surrogate escape ("\ud800") as truncated input.
    if message == "Input data was truncated":
        return "truncated input or a lone UTF-16 surrogate escape"
    return message


def decode_raw(raw: msgspec.Raw) -> object:
    """A Raw field as plain Python values (already checked well-formed when the body was)."""
    return msgspec.json.decode(raw) if present(raw) else None
