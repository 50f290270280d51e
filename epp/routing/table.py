"""The route table: ModelRoute and ModelServer objects → for one request, the rule that
matches, the ModelServer it goes to (weighted random), its candidate endpoints and the model
name the engine serves.

Semantics:
- A route answers its `modelName` and its `loraAdapters`; among routes for the same name the
  oldest wins (creationTimestamp, then name), as Gateway API breaks ties.
- Rules are tried in order; a rule's modelMatch (headers and uri, all must hold; string
  matches exact, prefix, or a regex that must match the whole value, as Envoy matches) picks
  the first rule that fits. A rule without modelMatch matches everything.
- Targets are chosen by weight (no weights: equally) among those with a ready pod, so a
  canary that is down does not fail its share of requests; none ready → 503.
- The request's model becomes the ModelServer's `model` (a LoRA adapter keeps its name: the
  engine serves the adapter under it).
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infergw.api import ApiError, from_dict, validate
from infergw.api.meta import duration_seconds
from infergw.api.networking import ModelRoute, ModelServer, StringMatch
from infergw.epp.errors import NoCapacity, PickerError

if TYPE_CHECKING:  # the datastore holds the table, so no import of it at run time
    from infergw.epp.datastore import Endpoint

log = logging.getLogger("epp.routing")


@dataclass(slots=True)
class Resolution:
    """Where one request goes, as the route table decided."""

    route: ModelRoute
    rule: str
    target_model: str
    candidates: list[Endpoint]
    server: ModelServer | None = None  # None: the target was the pool itself
    retries: int | None = None  # the ModelServer's retry attempts, if it sets them
    timeout_s: float | None = None
    # target_model is one of the route's LoRA adapters: only pods that have it loaded serve it
    adapter: bool = False

    @property
    def route_name(self) -> str:
        return self.route.metadata.name or ""

    @property
    def server_name(self) -> str:
        return (self.server.metadata.name or "") if self.server else "<pool>"


@dataclass(slots=True)
class RouteTable:
    routes: list[ModelRoute] = field(default_factory=list)
    servers: dict[str, ModelServer] = field(default_factory=dict)
    pool_name: str = ""
    _by_model: dict[str, ModelRoute] = field(default_factory=dict)

    @classmethod
    def build(
        cls, route_objects: list[dict[str, Any]], server_objects: list[dict[str, Any]], pool: str
    ) -> RouteTable:
        """From API dicts; an invalid object is logged with its problems and left out."""
        routes = [r for r in map(_typed, route_objects) if isinstance(r, ModelRoute)]
        servers = [s for s in map(_typed, server_objects) if isinstance(s, ModelServer)]
        table = cls(routes, {s.metadata.name or "": s for s in servers}, pool)
        oldest_first = sorted(
            routes, key=lambda r: (r.metadata.creation_timestamp or "", r.metadata.name or "")
        )
        for route in oldest_first:
            for name in cls.names_of(route):
                table._by_model.setdefault(name, route)
        return table

    @staticmethod
    def names_of(route: ModelRoute) -> list[str]:
        """The model names a route answers: its modelName and LoRA adapters."""
        names = [route.spec.model_name, *(route.spec.lora_adapters or [])]
        return [name for name in names if name is not None]

    def __len__(self) -> int:
        return len(self.routes)

    def route_for(self, model: str) -> ModelRoute | None:
        return self._by_model.get(model)

    def resolve(
        self,
        model: str,
        headers: dict[str, str],
        path: str,
        endpoints: list[Endpoint],
        rng: random.Random,
    ) -> Resolution | None:
        """None when no route answers `model` (the pool then serves it as it is)."""
        route = self._by_model.get(model)
        if route is None:
            return None
        rule = next((r for r in route.spec.rules if rule_matches(r, headers, path)), None)
        if rule is None:
            raise PickerError(
                404, f"no rule of ModelRoute {route.metadata.name} matches this request"
            )
        options = []
        for target in rule.target_models:
            weight = 1 if target.weight is None else target.weight
            if weight <= 0:
                continue
            candidates, server = self._target_endpoints(route, target, endpoints)
            if candidates:
                options.append((weight, candidates, server))
        if not options:
            names = [t.model_server_name or t.inference_pool_name for t in rule.target_models]
            raise NoCapacity(
                f"no ready pod for model {model!r}: ModelRoute {route.metadata.name} rule "
                f"{rule.name or '#'} targets {', '.join(map(str, names))}",
            )
        weights = [w for w, _, _ in options]
        _, candidates, server = rng.choices(options, weights=weights)[0]
        is_adapter = model in (route.spec.lora_adapters or []) and model != route.spec.model_name
        target_model = model if is_adapter or server is None else server.spec.model or model
        policy = server.spec.traffic_policy if server else None
        retry = policy.retry if policy else None
        timeout = policy.timeout if policy else None
        return Resolution(
            route=route,
            rule=rule.name or str(route.spec.rules.index(rule)),
            target_model=target_model,
            candidates=candidates,
            server=server,
            retries=retry.attempts if retry and retry.attempts is not None else None,
            timeout_s=duration_seconds(timeout) if timeout else None,
            adapter=is_adapter,
        )

    def _target_endpoints(
        self, route: ModelRoute, target, endpoints: list[Endpoint]
    ) -> tuple[list[Endpoint], ModelServer | None]:
        if target.inference_pool_name is not None:
            if target.inference_pool_name != self.pool_name:
                log.warning(
                    "ModelRoute %s targets InferencePool %s; this picker serves %s",
                    route.metadata.name, target.inference_pool_name, self.pool_name,
                )  # fmt: skip
                return [], None
            return endpoints, None
        server = self.servers.get(target.model_server_name or "")
        if server is None:
            log.warning(
                "ModelRoute %s targets ModelServer %s, which does not exist",
                route.metadata.name, target.model_server_name,
            )  # fmt: skip
            return [], None
        return [e for e in endpoints if selects(server, e)], server


def selects(server: ModelServer, endpoint: Endpoint) -> bool:
    """The server's pods: workloadSelector labels, and its port when it names one."""
    spec = server.spec
    labels = spec.workload_selector.match_labels or {}
    if any(endpoint.labels.get(k) != v for k, v in labels.items()):
        return False
    port = spec.workload_port.port if spec.workload_port else None
    return port is None or endpoint.target_port == port


def _typed(obj: dict[str, Any]) -> ModelRoute | ModelServer | None:
    where = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
    try:
        typed = from_dict(obj)
    except ApiError as exc:
        log.error("ignoring %s: %s", where, exc)
        return None
    problems = validate(typed)
    if problems:
        log.error("ignoring %s: %s", where, "; ".join(problems))
        return None
    return typed  # type: ignore[return-value]


def rule_matches(rule, headers: dict[str, str], path: str) -> bool:
    """Whether a rule's modelMatch holds for these (lower-case) headers and path."""
    match = rule.model_match
    if match is None:
        return True
    for name, want in (match.headers or {}).items():
        value = headers.get(name.lower())
        if value is None or not _string_matches(want, value):
            return False
    return match.uri is None or _string_matches(match.uri, path.split("?", 1)[0])


def _string_matches(want: StringMatch, value: str) -> bool:
    if want.exact is not None:
        return value == want.exact
    if want.prefix is not None:
        return value.startswith(want.prefix)
    return want.regex is not None and _regex(want.regex).fullmatch(value) is not None


_compiled: dict[str, re.Pattern] = {}


def _regex(text: str) -> re.Pattern:
    pattern = _compiled.get(text)
    if pattern is None:
        try:
            pattern = re.compile(text)
        except re.error:
            pattern = re.compile(r"(?!)")  # never matches; logged once
            log.error("route regex %r does not compile; it matches nothing", text)
        _compiled[text] = pattern
    return pattern
