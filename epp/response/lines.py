"""A streamed answer that only readers look at (no stage edits): each chunk passes on as it
came, and the readers get its complete lines in runs — no SSE events are framed.

What readers of a stream need is lines (`data:` lines counted, the one with the usage parsed),
and a run of whole lines can be read with a few scans in C (`LineReader.lines`) where framing
it into events costs Python work per event. Only the unfinished line is held, and like the
framer (`chain.Framer`) it is held up to `cap` bytes: a line that is still unfinished past the
cap at the end of a chunk is not read, its first bytes kept to tell what kind of line it was
(`LineReader.long_line`) — the same lines the framer passes on as parts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

Bytes = bytes | bytearray

# The first bytes of a line too long to read that its readers get (enough for `data:`).
LINE_HEAD = 16


@runtime_checkable
class LineReader(Protocol):
    def lines(self, data: Bytes, start: int, end: int) -> None:
        """Whole lines, data[start:end]: each ends with a newline, except at the end of the
        stream the last one may not."""
        ...

    def long_line(self, head: bytes) -> None:
        """A line longer than the cap, passed on unread; `head`: its first LINE_HEAD bytes
        (fewer if the line ended or the stream ended before)."""
        ...


class LineScanner:
    """The lines of a stream, out of the chunks the proxy sends, for `readers`; at most `cap`
    bytes held (the unfinished line)."""

    def __init__(self, readers: list[LineReader], cap: int) -> None:
        self.readers = readers
        self.cap = cap
        self._held: Bytes = b""  # the unfinished line, up to cap
        self._head: bytes | None = None  # while a line too long to hold goes on: its head
        # Once a chunk: straight to the one reader there usually is.
        self._read = readers[0].lines if len(readers) == 1 else self._read_all

    @property
    def held_bytes(self) -> int:
        return len(self._held)

    def feed(self, chunk: bytes) -> None:
        start = 0
        if self._head is not None:
            nl = chunk.find(b"\n")
            self._grow_head(chunk, nl if nl >= 0 else len(chunk))
            if nl < 0:
                return
            self._close_long_line()
            start = nl + 1
        elif self._held:
            nl = chunk.find(b"\n")
            if nl < 0:
                if len(self._held) + len(chunk) > self.cap:
                    self._head = bytes(self._held[:LINE_HEAD])
                    self._grow_head(chunk, len(chunk))
                    self._held = b""
                else:
                    self._grow(chunk, len(chunk))
                return
            self._grow(chunk, nl + 1)
            line, self._held = self._held, b""
            self._read(line, 0, len(line))
            start = nl + 1
        last = chunk.rfind(b"\n", start)
        if last >= 0:
            self._read(chunk, start, last + 1)
            start = last + 1
        rest = len(chunk) - start
        if rest > self.cap:
            self._head = chunk[start : start + LINE_HEAD]
        elif rest:
            self._held = chunk[start:] if start else chunk  # the proxy's bytes: not copied

    def _grow(self, chunk: bytes, end: int) -> None:
        # In place once it is ours: a line arriving a byte at a time costs linear time.
        if not isinstance(self._held, bytearray):
            self._held = bytearray(self._held)
        self._held += memoryview(chunk)[:end]

    def release(self) -> None:
        """Hold nothing more (no memory left for it): the unfinished line goes unread."""
        if self._held:
            self._head, self._held = bytes(self._held[:LINE_HEAD]), b""

    def flush(self) -> None:
        """The end of the stream: the unfinished line is the last one."""
        held, self._held = self._held, b""
        if self._head is not None:
            self._close_long_line()
        elif held:
            self._read(held, 0, len(held))

    def _grow_head(self, chunk: bytes, end: int) -> None:
        wanted = LINE_HEAD - len(self._head)
        if wanted > 0:
            self._head += chunk[: min(wanted, end)]

    def _close_long_line(self) -> None:
        head, self._head = self._head, None
        for reader in self.readers:
            reader.long_line(head)

    def _read_all(self, data: Bytes, start: int, end: int) -> None:
        for reader in self.readers:
            reader.lines(data, start, end)
