"""Give the client back the model name it asked for: the engine answers with the name it
serves (`"model":"<served>"` in JSON bodies and in every streamed event), which the picker
rewrote the request to. An editing stage of the response chain (`chain.py`): whole events and
bodies are rewritten at once; in the parts of one too long to hold, a pattern may be split
anywhere, so the tail of a part that could start a match waits for the next part — and only
such a tail."""

from __future__ import annotations

import json
from typing import ClassVar

from infergw.epp.response.chain import Bytes


class HeldTailEditor:
    """An editing stage whose edits are found by pattern: whole events and bodies are edited
    at once; in parts, the tail that could hold the start of a match (`_tail`) waits for the
    next part. Subclasses say what to replace (`_replace`) and how long that tail is."""

    edits: ClassVar[bool] = True

    def __init__(self) -> None:
        self._held = b""

    def _replace(self, data: Bytes) -> Bytes:
        raise NotImplementedError

    def _tail(self, data: Bytes) -> int:
        raise NotImplementedError

    def event(self, data: Bytes) -> Bytes:
        return self._replace(self._with_held(data))  # nothing continues a whole event

    def part(self, data: Bytes, line_open: bool) -> Bytes:
        data = self._replace(self._with_held(data))
        keep = self._tail(data)
        self._held = bytes(data[len(data) - keep :]) if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _with_held(self, data: Bytes) -> Bytes:
        held = self.flush()
        return held + data if held else data


class ModelNameRewriter(HeldTailEditor):
    def __init__(self, served: str, asked: str) -> None:
        super().__init__()
        s, a = json.dumps(served), json.dumps(asked)
        self._pairs = [(f'"model":{s}'.encode(), f'"model":{a}'.encode())]
        self._pairs.append((f'"model": {s}'.encode(), f'"model": {a}'.encode()))

    def _replace(self, data: Bytes) -> Bytes:
        for old, new in self._pairs:
            if old in data:  # (a bytearray's replace copies even when nothing matches)
                data = data.replace(old, new)
        return data

    def _tail(self, data: Bytes) -> int:
        """Length of the longest end of `data` that is a proper start of a pattern."""
        longest = 0
        for old, _ in self._pairs:
            for n in range(min(len(old) - 1, len(data)), longest, -1):
                if data.endswith(old[:n]):
                    longest = n
                    break
        return longest
