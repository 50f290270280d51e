"""api/log_format.py and api/log_context.py: every JSON line parses and has the fields; the
request's id and trace id reach the lines logged while handling it; hostile values (control
characters, huge values, forged traceparents) neither break a line nor forge one."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import pytest

from infergw.api import log_context, logs
from infergw.api.log_format import MAX_FIELD, MAX_MESSAGE, escape

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")


@pytest.fixture
def logged(request):
    """(logger, output) with configure() in the format the test is parametrized with."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure(logs.LogSettings(request.param, "DEBUG", "DEBUG"), out)
    # The test's records go to the handler configure() made and nowhere else: a logger
    # outside logging's registry, which pytest's capture (it joins every registered logger)
    # never sees; under xdist captured logs travel between processes as UTF-8, which a lone
    # surrogate (one of the hostile values here) cannot be written in.
    log = logging.Logger("infergw.test", logging.DEBUG)
    for handler in root.handlers:
        if getattr(handler, "stream", None) is out:
            log.addHandler(handler)
    yield log, out
    root.handlers[:] = handlers
    root.setLevel(level)
    log_context.unbind_request()


def json_lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]  # each line parses


@pytest.mark.parametrize("logged", ["json"], indirect=True)
def test_every_json_line_parses_with_its_fields(logged) -> None:
    log, out = logged
    log.info("plain %s", "line")
    log.warning("with fields", extra={"pod": "10.0.0.1:8000", "tokens": 12})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    plain, fields, failed = json_lines(out)
    assert set(plain) == {"time", "level", "logger", "message"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", plain["time"])
    assert (plain["level"], plain["logger"], plain["message"]) == (
        "info",
        "infergw.test",
        "plain line",
    )
    assert (fields["pod"], fields["tokens"]) == ("10.0.0.1:8000", 12)
    assert failed["level"] == "error" and "ValueError: boom" in failed["exception"]


@pytest.mark.parametrize("logged", ["json", "text"], indirect=True)
def test_lines_inside_a_request_name_it(logged) -> None:
    log, out = logged
    log_context.bind_request({"x-request-id": "req-7", "traceparent": TRACEPARENT})
    log.info("inside")
    log_context.unbind_request()
    log.info("outside")
    inside, outside = out.getvalue().splitlines()
    if out.getvalue().startswith("{"):
        got = json.loads(inside)
        assert (got["request_id"], got["trace_id"], got["span_id"]) == ("req-7", TRACE, SPAN)
        assert "request_id" not in json.loads(outside)
    else:
        assert inside.endswith(f"inside request_id=req-7 trace_id={TRACE} span_id={SPAN}")
        assert outside.endswith("outside")


@pytest.mark.parametrize("logged", ["json"], indirect=True)
async def test_concurrent_requests_keep_their_own_ids(logged) -> None:
    """Each task (each ext_proc stream) has its own context: ids never cross."""
    log, out = logged

    async def one(n: int) -> None:
        log_context.bind_request({"x-request-id": f"r{n}"})
        await asyncio.sleep(0.01 * (3 - n))
        log.info("done %d", n)

    await asyncio.gather(*(asyncio.create_task(one(n)) for n in range(3)))
    done = [d for d in json_lines(out) if d["logger"] == "infergw.test"]
    assert {(d["message"], d["request_id"]) for d in done} == {
        (f"done {n}", f"r{n}") for n in range(3)
    }


def test_a_generated_id_names_a_request_that_came_without_one() -> None:
    log_context.bind_request({})
    log_context.name_request("made-here")
    assert log_context.current().request_id == "made-here"
    log_context.bind_request({"x-request-id": "given"})
    log_context.name_request("made-here")
    assert log_context.current().request_id == "given"
    log_context.unbind_request()


@pytest.mark.parametrize(
    "value",
    [
        TRACEPARENT.upper(),  # the spec's hex is lower-case
        f"01-{TRACE}-{SPAN}-01",  # a version we do not know
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        TRACEPARENT + "-extra",
        TRACEPARENT[:-1],
        f"00-{TRACE[:-1]}g-{SPAN}-01",
        f"00_{TRACE}_{SPAN}_01",
        "",
        "x" * 10_000,
    ],
)
def test_a_traceparent_is_read_strictly(value) -> None:
    assert log_context.parse_traceparent(value) is None
    assert log_context.fields_from_headers({"traceparent": value}).trace_id is None


def test_a_valid_traceparent_is_read() -> None:
    assert log_context.parse_traceparent(TRACEPARENT) == (TRACE, SPAN)


@pytest.mark.parametrize("logged", ["json", "text"], indirect=True)
def test_hostile_values_neither_forge_a_line_nor_flood_one(logged) -> None:
    log, out = logged
    forged = "x\n2026-12-07 00:00:00,000 INFO epp: forged\r\x1b[31m\u2028"
    log_context.bind_request({"x-request-id": forged + "y" * 10_000})
    log.warning("model %r", forged + "z" * (3 * MAX_MESSAGE), extra={"header": forged})
    try:
        raise ValueError(forged)
    except ValueError:
        log.exception("failed on %s", forged)
    lines = out.getvalue().splitlines()
    if out.getvalue().startswith("{"):
        assert len(lines) == 2
        first = json.loads(lines[0])
        assert len(first["message"]) < MAX_MESSAGE + 100
        assert len(first["request_id"]) <= log_context.MAX_REQUEST_ID + 1
        assert json.loads(lines[1])["exception"].endswith(f"ValueError: {forged}")
    else:
        # A log line starts with a timestamp; a traceback's lines are indented; nothing forged
        # starts a line, and no control character survives.
        starts = [ln for ln in lines if not ln.startswith("  ")]
        assert len(starts) == 2 and all(TEXT_LINE.match(ln) for ln in starts)
        assert not any("forged" in ln and ln.startswith("2026-12-07 00:00") for ln in lines)
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u2028]", out.getvalue())
        assert len(starts[0]) < MAX_MESSAGE + 2 * 1024 + 500


@pytest.mark.parametrize("logged", ["json", "text"], indirect=True)
def test_a_field_of_any_size_or_kind_stays_bounded_and_encodable(logged) -> None:
    """A call's field may hold the client's text (a model name): clipped in both shapes; a
    lone surrogate (what a JSON body's "\\ud800" decodes to), a C1 control that a terminal
    obeys, and NaN (no JSON number) each still make one line any UTF-8 stream can write."""
    log, out = logged
    hostile = "\ud800m\x9b31m" + "w" * 10 * MAX_FIELD
    log.warning("model %s", hostile, extra={"model": hostile, "ratio": float("nan"), "n": 3})
    line = out.getvalue()
    line.encode("utf-8")  # raises on a raw surrogate
    assert line.count("\n") == 1 and not re.search(r"[\x7f-\x9f]", line)
    if line.startswith("{"):
        got = json.loads(line)
        assert len(got["model"]) < MAX_FIELD + 50 and got["model"].startswith("\ud800m\x9b")
        assert (got["ratio"], got["n"]) == ("nan", 3)
    else:
        assert " model=\\xd800m\\x9b31mwww" in line and " ratio=nan n=3" in line
        assert len(line) < MAX_MESSAGE + 2 * MAX_FIELD + 500


def test_escape_keeps_text_on_one_line() -> None:
    assert escape("a\nb\tc\x00\u2029") == "a\\nb\\tc\\x00\\x2029"


@pytest.mark.parametrize("logged", ["json", "text"], indirect=True)
def test_a_live_opentelemetry_span_wins_over_the_header(logged) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    log, out = logged
    log_context.bind_request({"traceparent": TRACEPARENT})
    live = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(1),
    )
    with trace.use_span(trace.NonRecordingSpan(live)):
        log.info("in a span")
    text = out.getvalue()
    assert "0af7651916cd43dd8448eb211c80319c" in text and "b7ad6b7169203331" in text
    assert TRACE not in text
