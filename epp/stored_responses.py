"""Responses API affinity: a request that names a stored response goes to the pod that
stored it (its id says which: epp/response_ids.py), and the ids of the answers it gets are
made to say so.

- `POST /v1/responses` with `previous_response_id`: the id is read, checked, replaced in the
  body by the engine's own, and the request goes to that pod alone (no fallback: another pod
  would answer 404).
- `GET`/`DELETE /v1/responses/{id}`, `POST …/cancel`, `GET …/input_items`: the same, the id
  replaced in the path.
- Answers to these and to `POST /v1/responses` (unless `store` is false: the engine keeps
  nothing, so there is nothing to come back to) get their ids stamped with the serving pod.

Ids belong to the verified identity that made them (epp/response_ids.py): another identity's
id, or one made without an identity, is refused for a caller with one as a forged id is (404).
Such a caller's engine ids (without our prefix) are refused too: the engine's id is readable
in ours, and routed as any request it could reach the pod that holds it. Unless the proxy
keeps answers from the picker (`--response-headers-skipped`): then no id is ever stamped, and
engine ids are all there is (ownership is not enforced).

When that pod has left the pool the response is gone with it (engines keep them in memory):
404, as vLLM answers an unknown id, saying so. A pod of the pool that is not ready now: 503
with Retry-After, since it may come back with its responses.
"""

from __future__ import annotations

import logging
import re

import msgspec

from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.errors import PickerError, ResponseNotFound
from infergw.epp.request import InferenceRequest
from infergw.epp.request_body import decode_field, present
from infergw.epp.response.ids import ResponseIdStamper
from infergw.epp.response_ids import (
    NOT_OURS,
    REFUSED_NEXT,
    BadResponseId,
    Pinned,
    ResponseIds,
)

log = logging.getLogger("epp.stored_responses")

PREVIOUS = "previous_response_id"
RETRY_AFTER_S = 5
# `/v1/responses/{id}` and the routes under it (epp/bodyless.py says which methods).
_BY_ID = re.compile(r"(/v1/responses/)([^/?]+)((?:/cancel|/input_items)?(?:\?.*)?)", re.S)
_STRING = msgspec.json.Decoder(str)
_STORE = msgspec.json.Decoder(bool | None)


class StoredResponses:
    def __init__(self, datastore: Datastore, ids: ResponseIds, *, stamped: bool = True) -> None:
        self.datastore = datastore
        self.ids = ids
        # Answers pass through the picker and get our ids (False: --response-headers-skipped).
        self.stamped = stamped

    def _pool(self) -> str:
        pool = self.datastore.pool
        return f"{pool.namespace}/{pool.name}" if pool is not None else ""

    def _read(self, response_id: str, param: str | None, owner: str | None) -> Pinned | None:
        try:
            stored = self.ids.read(self._pool(), response_id, owner)
            if stored is None and owner is not None and self.stamped:
                raise BadResponseId(NOT_OURS)
        except BadResponseId as exc:
            # The identity stays out of the log: it may be anything, of any length.
            log.info("refused response id %.80r: %s", response_id, exc)
            raise ResponseNotFound(response_id, f"{exc}; {REFUSED_NEXT}", param) from None
        return Pinned(stored, response_id, param) if stored is not None else None

    # ---- requests ------------------------------------------------------------------------

    def pinned_by_body(self, req: InferenceRequest) -> Pinned | None:
        """The stored response a Responses API request continues, if it names one of ours."""
        raw = getattr(req.body, PREVIOUS, None)
        if req.api != "responses" or raw is None or not present(raw):
            return None
        return self._read(decode_field(raw, PREVIOUS, _STRING), PREVIOUS, req.user)

    def pinned_by_path(self, path: str, owner: str | None = None) -> tuple[Pinned, str] | None:
        """The stored response a body-less request of `owner` (the verified user, if any)
        names in its path, and the path with the engine's id in its place; None when the path
        names none of ours."""
        match = _BY_ID.fullmatch(path)
        if match is None:
            return None
        pinned = self._read(match[2], None, owner)
        if pinned is None:
            return None
        return pinned, f"{match[1]}{pinned.stored.engine_id}{match[3]}"

    def endpoint_for(self, pinned: Pinned, candidates: list[Endpoint] | None = None) -> Endpoint:
        """The endpoint that stored the response, if it can take the request (one of
        `candidates`, when given: those that serve the request's model). PickerError otherwise:
        404 for a pod gone from the pool, 503 for one not ready, 400 for one that does not
        serve the model asked for."""
        pod, port = pinned.stored.pod, pinned.stored.port
        found = next(
            (e for e in self.datastore.endpoints() if e.pod == pod and _port(e) == port), None
        )
        if found is None or not found.reachable:
            if found is None and not self.datastore.has_member(pod, port):
                raise ResponseNotFound(
                    pinned.client_id,
                    f"pod {pod} stored it and has left the pool, and its stored responses "
                    "with it; send the conversation again in full, without "
                    "previous_response_id",
                    pinned.param,
                )
            raise PickerError(
                503,
                f"pod {pod}, which stored response {pinned.client_id!r}, is not ready; "
                f"retry in {RETRY_AFTER_S} s",
                headers={"retry-after": str(RETRY_AFTER_S)},
            )
        if candidates is not None and found not in candidates:
            raise PickerError(
                400,
                f"response {pinned.client_id!r} was stored by a pod that does not serve the "
                "model asked for; ask for the model the response was made with",
                param="model",
            )
        return found

    # ---- answers -------------------------------------------------------------------------

    def stamper(
        self, endpoint: Endpoint | None, owner: str | None = None
    ) -> ResponseIdStamper | None:
        """The stage that stamps an answer's ids with `endpoint` (None: unknown, not stamped)
        and `owner` (the verified user who asked, if any)."""
        if endpoint is None:
            return None
        pool, pod, port = self._pool(), endpoint.pod, _port(endpoint)
        return ResponseIdStamper(
            lambda engine_id: self.ids.stamp(pool, pod, port, engine_id, owner)
        )


def _port(endpoint: Endpoint) -> int:
    return int(endpoint.address.rsplit(":", 1)[1])


def stores_answer(req: InferenceRequest) -> bool:
    """A Responses API creation the engine stores (`store` is not false)."""
    if req.api != "responses":  # (api_for_path: a path ending /responses, a creation)
        return False
    raw = getattr(req.body, "store", None)
    return raw is None or not present(raw) or decode_field(raw, "store", _STORE) is not False


def answers_with_response(method: str, path: str) -> bool:
    """A body-less request whose answer is a stored response (or names one)."""
    return response_id_in_path(method, path) is not None


def response_id_in_path(method: str, path: str) -> str | None:
    """The response id a body-less request's path names (`/v1/responses/{id}…`), if any."""
    match = _BY_ID.fullmatch(path) if method in ("GET", "POST", "DELETE") else None
    return match[2] if match is not None else None
