"""Give the client response ids that say which pod stored the response (epp/response_ids.py):
every engine id of a Responses API answer — the response's `id` and the `previous_response_id`
it repeats, in a JSON body or in any streamed event — becomes the id the picker made for it. An
editing stage of the response chain (`chain.py`); in the parts of a body too long to hold, the
tail that could hold the start of an id waits for the next part."""

from __future__ import annotations

import re
from collections.abc import Callable

from infergw.epp.response.chain import Bytes
from infergw.epp.response.rewrite import HeldTailEditor

_ENGINE_ID = re.compile(
    rb'("(?:id|previous_response_id)"[ \t]{0,8}:[ \t]{0,8}")(resp_[A-Za-z0-9_-]{1,128})"'
)
# Longer than any match: a part's last bytes this long wait for the next part.
_TAIL = 200


class ResponseIdStamper(HeldTailEditor):
    def __init__(self, stamp: Callable[[str], str]) -> None:
        super().__init__()
        self._stamp = stamp

    def _replace(self, data: Bytes) -> Bytes:
        def stamped(m: re.Match[bytes]) -> bytes:
            return m[1] + self._stamp(m[2].decode("ascii")).encode("ascii") + b'"'

        return _ENGINE_ID.sub(stamped, data) if b'"resp_' in data else data

    def _tail(self, data: Bytes) -> int:
        # Stamped ids hold a dot, so a held tail is never stamped twice.
        return min(_TAIL, len(data))
