"""One framer for the answer and the chain of stages it feeds.

The framer cuts an SSE stream into events (the lines up to a blank line; `\\n` or `\\r\\n`
line ends) and takes a JSON answer whole. Each stage gets whole events, or the whole body, and
returns the bytes to pass on. What the framer holds is bounded: an unfinished event may grow
to `MAX_HELD` bytes; past that its complete lines are passed on at once, and a single line
longer than that is passed on as it comes (a *part*), so a hostile upstream sending 1 GiB
without a newline costs one held `MAX_HELD` and a chunk, not 1 GiB. A JSON answer over the
cap is passed on as parts (no stage reads it whole).

When no stage edits (reading usage only), each chunk is passed on as it came, at once; the
framer holds its copy for the readers only — and a stream whose stages all read lines
(`lines.LineReader`) is not framed at all: a `lines.LineScanner` hands them its whole lines.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from infergw.epp.response.lines import Bytes, LineReader, LineScanner

# An unfinished SSE event, or a JSON answer, is held up to this (a usage event is a few hundred
# bytes; the Responses API's response.completed repeats the answer, still far below it).
MAX_HELD = 4 * 1024 * 1024


class Stage(Protocol):
    # Whether the stage changes what passes (a reader returns its input as it is).
    edits: ClassVar[bool]

    def event(self, data: Bytes) -> Bytes:
        """A whole event (its lines and the blank line ending it; at the end of the stream,
        what came after the last blank line), or the whole JSON body."""
        ...

    def part(self, data: Bytes, line_open: bool) -> Bytes:
        """Part of an event, or of a JSON body, too long to hold. In a stream a part holds
        whole lines, except that with `line_open` its last line goes on in the next part."""
        ...

    def flush(self) -> Bytes:
        """The end of the answer: what the stage still holds."""
        ...


@dataclass(slots=True)
class Frame:
    data: Bytes
    whole: bool  # a whole event (or JSON body); else a part
    line_open: bool = False


class Framer:
    """SSE events or a JSON body, out of the chunks the proxy sends, at most `cap` bytes held."""

    def __init__(self, streaming: bool, cap: int = MAX_HELD) -> None:
        self.streaming = streaming
        self.cap = cap
        self._held = bytearray()  # the unfinished event (or body) not passed on yet
        self._line_start = 0  # where, in _held, its unfinished line starts
        self._cut = False  # part of this event (or body) was passed on as a part
        self._line_cut = False  # part of the unfinished line was: the rest passes as it comes

    @property
    def held_bytes(self) -> int:
        return len(self._held)

    def feed(self, chunk: bytes) -> Iterator[Frame]:
        if not chunk:
            return
        if not self.streaming:
            yield from self._feed_body(chunk)
            return
        start = 0
        if self._line_cut:
            nl = chunk.find(b"\n")
            if nl < 0:
                yield Frame(chunk, whole=False, line_open=True)
                return
            start = nl + 1
            self._line_cut = False
            yield Frame(chunk[:start], whole=False)
        if start < len(chunk):
            yield from self._feed_events(chunk, start)

    def _feed_events(self, chunk: bytes, start: int) -> Iterator[Frame]:
        held = self._held
        if held and len(held) + len(chunk) - start > self.cap and chunk.find(b"\n", start) < 0:
            # Past the cap and no line ends here: pass on without growing the buffer first.
            line = len(held) - self._line_start + len(chunk) - start
            yield from self._overflow(held, 0, self._line_start, keep_line=line <= self.cap)
            if self._line_cut:
                yield Frame(chunk[start:] if start else chunk, whole=False, line_open=True)
                return
        # Scan only the new bytes: an event arriving a byte at a time costs linear time.
        if self._held:
            scan = len(self._held)
            self._held += chunk[start:] if start else chunk
            buf: Bytes = self._held
            event_start, line_start = 0, self._line_start
        else:
            buf, scan, event_start, line_start = chunk, start, start, start
        while (nl := buf.find(b"\n", scan)) >= 0:
            if nl == line_start or (nl == line_start + 1 and buf[line_start] == 0x0D):
                yield Frame(buf[event_start : nl + 1], whole=not self._cut)
                self._cut = False
                event_start = nl + 1
            line_start = scan = nl + 1
        if len(buf) - event_start > self.cap:
            yield from self._overflow(buf, event_start, line_start, keep_line=True)
        elif buf is self._held:
            del self._held[:event_start]
            self._line_start = line_start - event_start
        else:
            self._held = bytearray(memoryview(buf)[event_start:])
            self._line_start = line_start - event_start

    def _overflow(
        self, buf: Bytes, start: int, line_start: int, keep_line: bool
    ) -> Iterator[Frame]:
        """buf[start:] is an unfinished event too long to hold: pass on its complete lines and
        its unfinished line too, unless that is short enough to hold (`keep_line`)."""
        if line_start > start:
            yield Frame(buf[start:line_start], whole=False)
            self._cut = True
        kept = len(buf) - line_start
        if kept and not (keep_line and kept <= self.cap):
            yield Frame(buf[line_start:] if line_start else buf, whole=False, line_open=True)
            self._cut = self._line_cut = True
            kept = 0
        if not kept:
            self._held = bytearray()
        elif buf is self._held:
            del self._held[:line_start]
        else:
            self._held = bytearray(memoryview(buf)[line_start:])
        self._line_start = 0

    def _feed_body(self, chunk: bytes) -> Iterator[Frame]:
        if self._cut:
            yield Frame(chunk, whole=False)
        elif len(self._held) + len(chunk) <= self.cap:
            self._held += chunk
        else:
            if self._held:
                yield Frame(self._held, whole=False)
                self._held = bytearray()
            yield Frame(chunk, whole=False)
            self._cut = True

    def release(self) -> Iterator[Frame]:
        """Hold nothing more of what came so far (no memory left for it): it passes as parts."""
        if not self.streaming:
            if self._held:
                yield Frame(self._held, whole=False)
                self._held = bytearray()
                self._cut = True
            return
        yield from self._overflow(self._held, 0, self._line_start, keep_line=False)

    def flush(self) -> Iterator[Frame]:
        """The end of the stream: what is held is the last event (or the body)."""
        held, whole = self._held, not self._cut
        self._held, self._line_start, self._cut, self._line_cut = bytearray(), 0, False, False
        if held:
            yield Frame(held, whole=whole)


class ResponseChain:
    """Stages over one framer: `feed` each chunk, `flush` at the end of the stream; both
    return the bytes to pass on, in order (pieces of any size)."""

    def __init__(self, stages: Sequence[Stage], streaming: bool, cap: int = MAX_HELD) -> None:
        self.stages = list(stages)
        self._edits = any(stage.edits for stage in self.stages)
        # Readers of a stream only need its lines: scanned, not framed into events.
        self._scanner: LineScanner | None = None
        self.framer: Framer | None = None
        if streaming and not self._edits and all(_reads_lines(type(s)) for s in stages):
            self._scanner = LineScanner(self.stages, cap)
        else:
            self.framer = Framer(streaming, cap)
        # What the framer or scanner holds now (kept current: read once a chunk).
        self.held_bytes = 0

    def feed(self, chunk: bytes) -> list[Bytes]:
        scanner = self._scanner
        if scanner is not None:
            if not chunk:
                return []
            scanner.feed(chunk)
            self.held_bytes = scanner.held_bytes
            return [chunk]
        out = self._run(self.framer.feed(chunk))
        self.held_bytes = self.framer.held_bytes
        return out if self._edits else [chunk] if chunk else []

    def release(self) -> list[Bytes]:
        """Pass on what is held (the readers do not read it)."""
        if self._scanner is not None:
            self._scanner.release()
            self.held_bytes = self._scanner.held_bytes
            return []
        out = self._run(self.framer.release())
        self.held_bytes = self.framer.held_bytes
        return out

    def flush(self) -> list[Bytes]:
        self.held_bytes = 0
        if self._scanner is not None:
            self._scanner.flush()
            for stage in self.stages:
                stage.flush()  # a reader passes nothing on
            return []
        out = self._run(self.framer.flush())
        for i, stage in enumerate(self.stages):
            rest = stage.flush()
            if rest:
                rest = _through(self.stages[i + 1 :], Frame(rest, whole=False))
            if rest and self._edits:
                out.append(rest)
        return out

    def _run(self, frames: Iterator[Frame]) -> list[Bytes]:
        out = []
        for frame in frames:
            data = _through(self.stages, frame)
            if data and self._edits:
                out.append(data)
        return out


@functools.cache
def _reads_lines(stage: type) -> bool:
    return issubclass(stage, LineReader)  # (a protocol's check is slow: once a class)


def _through(stages: Sequence[Stage], frame: Frame) -> Bytes:
    data = frame.data
    for stage in stages:
        data = stage.event(data) if frame.whole else stage.part(data, frame.line_open)
        if not data:
            break
    return data
