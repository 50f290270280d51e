"""Give the client back the model name it asked for: the engine answers with the name it
serves (`"model":"<served>"` in JSON bodies and in every streamed event), which the picker
rewrote the request to. Chunks may split the pattern anywhere, so the tail of a chunk that
could start a match waits for the next chunk — and only such a tail, so streamed events are
never held back."""

from __future__ import annotations

import json


class ModelNameRewriter:
    def __init__(self, served: str, asked: str) -> None:
        s, a = json.dumps(served), json.dumps(asked)
        self._pairs = [(f'"model":{s}'.encode(), f'"model":{a}'.encode())]
        self._pairs.append((f'"model": {s}'.encode(), f'"model": {a}'.encode()))
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        for old, new in self._pairs:
            data = data.replace(old, new)
        keep = self._partial_tail(data)
        self._held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _partial_tail(self, data: bytes) -> int:
        """Length of the longest end of `data` that is a proper start of a pattern."""
        longest = 0
        for old, _ in self._pairs:
            for n in range(min(len(old) - 1, len(data)), longest, -1):
                if data.endswith(old[:n]):
                    longest = n
                    break
        return longest
