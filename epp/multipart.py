"""One text field of a multipart/form-data body (RFC 7578): how the audio APIs' uploads
(`/v1/audio/transcriptions`, `/v1/audio/translations`) name their `model`.

Only the parts' delimiters and headers are read, never the files: one forward pass of
`bytes.find`, each part's header block bounded, so a hostile body costs time linear in its
size and no more memory than itself. Anything an engine's form parser could read otherwise
than this one — header folding, a `name*=` or escaped parameter, a field given twice, a body
without its closing delimiter — is refused (400), so the model the picker routes by is the
model the engine runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infergw.epp.errors import PickerError

FORM_DATA = "multipart/form-data"
MAX_BOUNDARY = 70  # RFC 2046
MAX_PART_HEADERS = 8 * 1024  # one part's header block
MAX_FIELD_BYTES = 4 * 1024  # a text field the picker reads: a model name
_CRLF = b"\r\n"
_BOUNDARY = re.compile(
    rf'(?:^|;)\s*boundary=(?:"([^"\\]{{1,{MAX_BOUNDARY}}})"'
    rf"|([0-9A-Za-z'()+_,./:=?-]{{1,{MAX_BOUNDARY}}}))\s*(?:;|$)",
    re.IGNORECASE,
)
# form-data; name="model"; filename="a.wav" — quoted values without escapes, or tokens.
_PARAM = re.compile(rb';\s*([A-Za-z0-9_.*-]+)\s*=\s*(?:"([^"\\\r\n]*)"|([^";\s]+))\s*')
_DISPOSITION = re.compile(rb"form-data\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FormField:
    """A text field's value and where its bytes are in the body (for a rewrite in place)."""

    value: str
    start: int
    end: int


def _bad(message: str, param: str | None = None) -> PickerError:
    return PickerError(400, f"malformed multipart/form-data body: {message}", param=param)


def boundary(content_type: str) -> bytes:
    """The delimiter's boundary from a Content-Type: 400 unless it is multipart/form-data
    with a boundary of 1..70 characters."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != FORM_DATA:
        raise PickerError(
            400,
            f"this API takes a {FORM_DATA} body, not {kind.strip() or 'none'!r}",
        )
    found = _BOUNDARY.search(params)
    if found is None:
        raise _bad("the content-type has no usable boundary")
    return (found.group(1) or found.group(2)).encode()


def form_field(body: bytes, content_type: str, name: str) -> FormField | None:
    """The text field `name` (None when the form has none); PickerError 400 for a body
    that is not a well-formed form, or names the field more than once."""
    delimiter = b"--" + boundary(content_type)
    at = body.find(delimiter)
    if at < 0 or (at > 0 and body[at - 2 : at] != _CRLF):
        raise _bad("no part starts with the content-type's boundary")
    found: FormField | None = None
    while True:
        after = at + len(delimiter)
        if body[after : after + 2] == b"--":
            return found  # the closing delimiter; an epilogue is ignored
        line_end = body.find(_CRLF, after, after + 2 + MAX_BOUNDARY)
        if line_end < 0 or body[after:line_end].strip(b" \t"):
            raise _bad("a delimiter line has more than the boundary")
        headers_at = line_end + 2
        headers_end = body.find(_CRLF + _CRLF, headers_at - 2, headers_at + MAX_PART_HEADERS)
        if headers_end < 0:
            raise _bad(f"a part's headers are missing or longer than {MAX_PART_HEADERS} bytes")
        content_at = headers_end + 4
        next_at = body.find(_CRLF + delimiter, content_at)
        if next_at < 0:
            raise _bad("the body ends before its closing delimiter")
        part_name, is_file = _disposition(body[headers_at:headers_end])
        if part_name == name.encode():
            if found is not None:
                raise PickerError(400, f"the field {name!r} appears more than once", param=name)
            if is_file:
                raise PickerError(400, f"the field {name!r} must be text, not a file", param=name)
            found = _text(body, content_at, next_at, name)
        at = next_at + 2


def _disposition(block: bytes) -> tuple[bytes | None, bool]:
    """A part's field name and whether it is a file, from its header block."""
    name: bytes | None = None
    is_file = False
    seen = False
    for line in block.split(_CRLF) if block else []:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise _bad("a part's header is folded over lines")
        key, colon, value = line.partition(b":")
        if not colon:
            raise _bad("a part's header line has no colon")
        if key.strip().lower() != b"content-disposition":
            continue
        if seen:
            raise _bad("a part has two Content-Disposition headers")
        seen = True
        name, is_file = _parameters(value.strip())
    if not seen:
        raise _bad("a part has no Content-Disposition header")
    return name, is_file


def _parameters(value: bytes) -> tuple[bytes | None, bool]:
    head = _DISPOSITION.match(value)
    if head is None:
        raise _bad("a part's Content-Disposition is not form-data")
    params: dict[bytes, bytes] = {}
    at = head.end()
    while at < len(value):
        found = _PARAM.match(value, at)
        if found is None:
            raise _bad("a part's Content-Disposition has a parameter that cannot be read plainly")
        key = found.group(1).lower()
        if key in params or key.endswith(b"*"):
            raise _bad("a part's Content-Disposition repeats or encodes a parameter")
        params[key] = found.group(2) if found.group(2) is not None else found.group(3)
        at = found.end()
    return params.get(b"name"), b"filename" in params


def _text(body: bytes, start: int, end: int, name: str) -> FormField:
    if end - start > MAX_FIELD_BYTES:
        raise PickerError(
            400, f"the field {name!r} is longer than {MAX_FIELD_BYTES} bytes", param=name
        )
    try:
        value = body[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise PickerError(400, f"the field {name!r} is not UTF-8 text", param=name) from None
    return FormField(value, start, end)
