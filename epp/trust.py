"""Which request headers the picker believes.

A client may claim anything in a header; only what the gateway sets after authentication
(`x-infergate-user`, whose client copies Envoy removes) says who is asking. So by default the
picker takes a request's InferenceObjective (its priority) and fairness id from the verified
user, through the EndpointPickerConfig's `users` section, and ignores client copies of
`x-gateway-inference-objective`, `x-gateway-inference-fairness-id` and
`x-gateway-model-name-rewrite`. Envoy applies a route's header filters in its router, after
ext_proc, so a route cannot set them for the picker either. On a closed network
`--trust-client-headers` honours clients' objective and fairness id; a gateway that sets the
model-name rewrite itself (after removing client copies) turns on
`--trust-model-rewrite-header`.

    users:
      alice: {objective: interactive, fairnessId: team-a}
      batch-bot: {objective: batch}        # its fairness id: the user, batch-bot
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infergw.api.names import FAIRNESS_ID_HEADER, MODEL_REWRITE_HEADER, OBJECTIVE_HEADER

if TYPE_CHECKING:  # the context starts from this module's defaults
    from infergw.epp.context import RequestContext

log = logging.getLogger("epp.trust")

# GIE's flow for requests that name none.
DEFAULT_FAIRNESS_ID = "default-flow"
CLIENT_ASSERTED = (MODEL_REWRITE_HEADER, OBJECTIVE_HEADER, FAIRNESS_ID_HEADER)
USER_KEYS = ("objective", "fairnessId")


class UsersConfigError(ValueError):
    """A `users` section the picker refuses to start with; the message names the entry."""


@dataclass(frozen=True, slots=True)
class UserIdentity:
    """What one verified user is to flow control."""

    objective: str | None = None
    fairness_id: str | None = None


@dataclass(frozen=True, slots=True)
class Users:
    """The `users` section: verified user → objective and fairness id."""

    by_name: dict[str, UserIdentity] = field(default_factory=dict)

    @classmethod
    def from_config(cls, raw: Any) -> Users:
        """From the whole EndpointPickerConfig document (its `users` key may be absent)."""
        section = raw.get("users") if isinstance(raw, dict) else None
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise UsersConfigError(f"users must be a map, got {type(section).__name__}")
        return cls({_name(user): _identity(user, entry) for user, entry in section.items()})

    def get(self, user: str | None) -> UserIdentity | None:
        return self.by_name.get(user) if user else None


def _name(user: Any) -> str:
    if not isinstance(user, str) or not user:
        raise UsersConfigError(f"users: {user!r} is not a user name (a non-empty string)")
    return user


def _identity(user: str, entry: Any) -> UserIdentity:
    where = f"users.{user}"
    if not isinstance(entry, dict):
        raise UsersConfigError(f"{where} must be a map, got {type(entry).__name__}")
    unknown = sorted(str(k) for k in entry if k not in USER_KEYS)
    if unknown:
        raise UsersConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(USER_KEYS)}"
        )
    values = {}
    for key in USER_KEYS:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise UsersConfigError(f"{where}.{key} must be a non-empty string, got {value!r}")
        values[key] = value
    return UserIdentity(objective=values["objective"], fairness_id=values["fairnessId"])


@dataclass(frozen=True, slots=True)
class HeaderTrust:
    client_headers: bool = False  # --trust-client-headers
    model_rewrite_header: bool = False  # --trust-model-rewrite-header
    users: Users = field(default_factory=Users)

    def trusted_names(self) -> tuple[str, ...]:
        """The client-asserted headers this picker believes."""
        names = (OBJECTIVE_HEADER, FAIRNESS_ID_HEADER) if self.client_headers else ()
        return names + ((MODEL_REWRITE_HEADER,) if self.model_rewrite_header else ())

    def apply(self, ctx: RequestContext) -> None:
        """Set the request's objective, fairness id and engine model from what is trusted,
        and leave only trusted values of those headers for route rules to match."""
        req = ctx.request
        believed = self.trusted_names()
        claimed = {
            name: value
            for name in CLIENT_ASSERTED
            if (value := req.headers.get(name)) and name in believed
        }
        ignored = [n for n in CLIENT_ASSERTED if req.headers.get(n) and n not in believed]
        if ignored:
            log.debug("request %s: ignoring client-set %s", req.request_id, ", ".join(ignored))
        mapped = self.users.get(req.user) or UserIdentity()
        # The verified user wins over any claim; a claim counts only when trusted.
        ctx.objective = mapped.objective or claimed.get(OBJECTIVE_HEADER)
        ctx.fairness_id = (
            mapped.fairness_id or req.user or claimed.get(FAIRNESS_ID_HEADER) or DEFAULT_FAIRNESS_ID
        )
        ctx.target_model = claimed.get(MODEL_REWRITE_HEADER) or req.model
        headers = {k: v for k, v in req.headers.items() if k not in CLIENT_ASSERTED}
        if ctx.target_model != req.model:
            headers[MODEL_REWRITE_HEADER] = ctx.target_model
        if ctx.objective:
            headers[OBJECTIVE_HEADER] = ctx.objective
        headers[FAIRNESS_ID_HEADER] = ctx.fairness_id
        ctx.match_headers = headers
