"""Response ids that say which pod stored the response (Responses API affinity).

An engine stores a Responses API answer in its own memory, so `previous_response_id`, and
`GET` / `POST …/cancel` / `GET …/input_items` / `DELETE` on `/v1/responses/{id}`, only work on
the pod that made it. Picker replicas must agree on that pod without sharing a map
(docs/architecture.md, "State and several picker replicas"), so the pod travels in the id the
client gets back:

    resp_ig.<"pool/pod:port", base64url>.<MAC, base64url>.<the engine's id>

The pod is named with its port (a pool's target port: one engine each), not with its rank,
which moves when the pool's targetPorts change. The pool's name is there for the body-based
router, which sends a body-less `GET /v1/responses/{id}` to that pool's picker without a key
to check it (`pool_named`); the picker checks it. The MAC (HMAC-SHA256, cut to 16 bytes)
covers the pool (its namespace too), the pod, the port and the engine's id:
another pool's ids, edited ids and made-up ids are refused; every replica verifies any
replica's ids when they share the key (`--response-id-key-file`), and ids outlive picker
restarts. Without a key file, the key is derived from the pool's name: ids still cannot be
moved to another pool, but a client that knows the scheme could steer requests to a pod of
its choice (never outside the pool).

An id belongs to whoever made it, when the gateway knows who (the verified user Envoy's auth
sets, `x-infergate-user`): a hash of that identity goes into the MAC, so the id another
identity sends fails verification exactly as a forged id does. Without an identity the MAC
covers what it did before this, and any caller that has the id can use it. One key, no
verify-only previous one: engines keep responses in memory only, so a new key (or a user's
new name) costs each live conversation one resend in full (README, "Responses API affinity").

An id without the prefix is the engine's own (a response made before this, or one whose
answer did not pass through the picker): it is routed as any request, as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from infergw.api.meta import DNS_SUBDOMAIN

PREFIX = "resp_ig."
# An engine's id as vLLM makes it: `resp_` and a uuid's hex. Others are allowed in a bounded
# alphabet that needs no escaping in a path or JSON string.
ENGINE_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,128}")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_ID_CHARS = 1024  # far above any id made here (a 253-character pod name is ~420)
_MAC_BYTES = 16
_KEY_CONTEXT = b"infergate response ids v1\0"
# Marks the owner's part of the MAC's message; no other part can hold a NUL byte, so a message
# with an owner never equals one without.
_OWNER_CONTEXT = b"owner"
MIN_KEY_BYTES = 16


# Why an id is refused when its shape is not ours (and an engine's own id from a caller who
# must use ours: epp/stored_responses.py).
NOT_OURS = "the id is not one this gateway made"
# What a client can do about a refused id, said after why it was refused.
REFUSED_NEXT = "send the id as this gateway returned it, or the conversation in full without it"


class BadResponseId(ValueError):
    """An id with the prefix that this pool did not make (edited, forged, another pool's,
    another key's, or too long)."""


@dataclass(frozen=True, slots=True)
class StoredAt:
    """Where a response lives: the engine (pod and port) that made it, and its id there."""

    pod: str
    port: int
    engine_id: str

    @property
    def endpoint(self) -> str:
        return f"{self.pod}:{self.port}"


@dataclass(frozen=True, slots=True)
class Pinned:
    """A request bound to the pod that stored the response it names."""

    stored: StoredAt
    client_id: str  # as the client sent it, for messages
    param: str | None = None  # the request field that named it (None: the path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(path: str | Path) -> bytes:
    """The MAC key from a file (any bytes, at least MIN_KEY_BYTES; surrounding blanks are
    not part of it). ValueError says what is wrong with it."""
    data = Path(path).read_bytes().strip()
    if len(data) < MIN_KEY_BYTES:
        raise ValueError(
            f"{path}: a response id key needs at least {MIN_KEY_BYTES} bytes, it has "
            f"{len(data)}; write one with `head -c 32 /dev/urandom | base64 > {path}`"
        )
    return data


@dataclass(frozen=True, slots=True)
class _Parsed:
    pool_name: str
    endpoint: str  # "pod:port", as the MAC covers it
    mac: bytes
    engine_id: str


def _parse(response_id: str) -> _Parsed | None:
    """The parts of one of our ids, unverified; None for an engine's own id. BadResponseId
    for an id with the prefix that is not in our shape."""
    if len(response_id) > MAX_ID_CHARS:
        raise BadResponseId(f"a response id is at most {MAX_ID_CHARS} characters")
    if not response_id.startswith(PREFIX):
        return None
    parts = response_id[len(PREFIX) :].split(".", 2)
    if len(parts) != 3 or not ENGINE_ID.fullmatch(parts[2]):
        raise BadResponseId(NOT_OURS)
    try:
        place, mac = _unb64(parts[0]).decode("utf-8"), _unb64(parts[1])
    except (binascii.Error, ValueError):
        raise BadResponseId(NOT_OURS) from None
    # base64 decodes stray characters and other unused bits to the same bytes: one id a
    # response, the one stamp() writes.
    if _b64(place.encode()) != parts[0] or _b64(mac) != parts[1]:
        raise BadResponseId(NOT_OURS)
    # Checked even under a valid MAC: without a key file, a client can make one.
    pool_name, _, endpoint = place.partition("/")
    pod, _, port = endpoint.rpartition(":")
    if not DNS_SUBDOMAIN.match(pool_name) or not pod or not _PORT.fullmatch(port):
        raise BadResponseId(NOT_OURS)
    return _Parsed(pool_name, endpoint, mac, parts[2])


def pool_named(response_id: str) -> str | None:
    """The pool's name an id of ours says, unchecked (the body-based router has no pool's key;
    that pool's picker checks the id); None for an engine's own id. BadResponseId for an id
    with the prefix that is not in our shape."""
    parsed = _parse(response_id)
    return parsed.pool_name if parsed is not None else None


def _name_of(pool: str) -> str:
    return pool.rpartition("/")[2]  # "namespace/name"


class ResponseIds:
    """Makes and reads the ids of one pool's responses (`pool`: "namespace/name")."""

    def __init__(self, key: bytes | None) -> None:
        self.keyed = key is not None
        self._key = key

    def _mac(self, pool: str, endpoint: str, engine_id: str, owner: str | None = None) -> bytes:
        key = self._key if self._key is not None else pool.encode()
        parts = [_KEY_CONTEXT, pool.encode(), endpoint.encode(), engine_id.encode()]
        if owner is not None:
            parts += [_OWNER_CONTEXT, _owner_digest(owner)]
        msg = b"\0".join(parts)
        return hmac.new(key, msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def stamp(
        self, pool: str, pod: str, port: int, engine_id: str, owner: str | None = None
    ) -> str:
        """The id the client gets for `engine_id`, made by `pod`'s engine at `port` for
        `owner` (the verified identity that asked; None: no identity, anyone's)."""
        endpoint = f"{pod}:{port}"
        mac = self._mac(pool, endpoint, engine_id, owner)
        place = f"{_name_of(pool)}/{endpoint}"
        return f"{PREFIX}{_b64(place.encode())}.{_b64(mac)}.{engine_id}"

    def read(self, pool: str, response_id: str, owner: str | None = None) -> StoredAt | None:
        """Where `response_id` lives; None for an engine's own id (not ours to route).
        BadResponseId for an id with the prefix that this pool did not make for `owner` (one
        made for another identity, or for none, is refused as a forged one is)."""
        parsed = _parse(response_id)
        if parsed is None:
            return None
        if parsed.pool_name != _name_of(pool) or not hmac.compare_digest(
            parsed.mac, self._mac(pool, parsed.endpoint, parsed.engine_id, owner)
        ):
            raise BadResponseId("the id was not made by this gateway's pool")
        pod, _, port = parsed.endpoint.rpartition(":")
        return StoredAt(pod, int(port), parsed.engine_id)


def _owner_digest(owner: str) -> bytes:
    """A fixed-size stand-in for an identity of any length or content (a NUL byte, control
    characters, megabytes): the MAC's message stays bounded and unambiguous. Hex, so that
    it holds no NUL byte either."""
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest().encode("ascii")
