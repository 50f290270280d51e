"""Authentication stays in Envoy, configured as in a cluster: an Envoy Gateway `SecurityPolicy`
(gateway.envoyproxy.io/v1alpha1) and the `Secret`s holding its API keys become the local Envoy's
HTTP filters, in Envoy Gateway's order, all before the picker's ext_proc filter:

  header_mutation  removes any client-sent x-infergate-user and gateway header (always, with
                   auth or without; GATEWAY_HEADERS), the client's scheduling hints unless
                   clients are trusted (CLIENT_HINT_HEADERS), and any other header the auth
                   filters below set
  api_key_auth     spec.apiKeyAuth: the keys of the referenced Secrets (one data key per client
                   id, its value the API key), looked for in extractFrom's headers, params or
                   cookies; the client id is forwarded in forwardClientIDHeader
  jwt_authn        spec.jwt: providers with an inline localJWKS, their claimToHeaders (the
                   quickstart's `sub` → x-infergate-user)

A request that fails gets Envoy's 401 and never reaches the picker, which therefore only ever
sees a user id that Envoy verified.

apiKeyAuth and jwt in one policy: Envoy Gateway chains both filters and each rejects a request
without its own credential, so a request needs both (envoyproxy/gateway#8491; an
`authentication.mode: Any` is proposed, not released). We do the same: either credential alone
gets 401. With both, jwt_authn runs second and its claim header replaces the client id.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from infergw.api.names import (
    DESTINATION_HEADER,
    FAIRNESS_ID_HEADER,
    MODEL_REWRITE_HEADER,
    OBJECTIVE_HEADER,
    PREFILLER_HEADER,
    USER_HEADER,
)

# Headers only the gateway or the picker may set: the pod a request goes to, the prefill pod a
# decode sidecar sends the prompt to, and the engine model a request is rewritten to. A
# client's copy must reach neither the picker nor (with the picker down and a pool that fails
# open) a pod: the sidecar would post the prompt wherever the client said.
GATEWAY_HEADERS = (DESTINATION_HEADER, PREFILLER_HEADER, MODEL_REWRITE_HEADER)
# Scheduling hints a client asserts about itself (its priority, its fairness flow): removed too
# unless the operator trusts the clients (a closed network; `infergate up --trust-client-headers`).
CLIENT_HINT_HEADERS = (OBJECTIVE_HEADER, FAIRNESS_ID_HEADER)
API_VERSION = "gateway.envoyproxy.io/v1alpha1"
GATEWAY_KINDS = ("SecurityPolicy", "Secret")  # what an example directory holds for Envoy
_TARGET_KINDS = ("Gateway", "HTTPRoute", "GRPCRoute")
_TYPE = "type.googleapis.com/envoy.extensions.filters.http."
_UNSUPPORTED = ("basicAuth", "oidc", "extAuth", "authorization", "cors")


class AuthError(ValueError):
    """A SecurityPolicy or Secret the local stack cannot use; the message names the field."""


@dataclass(slots=True, frozen=True)
class ApiKeys:
    # (client id, API key), in the Secrets' order; kept out of reprs and logs
    credentials: tuple[tuple[str, str], ...] = field(repr=False)
    sources: tuple[tuple[str, str], ...] = ()  # ("header" | "query" | "cookie", name), in order
    client_id_header: str | None = None
    sanitize: bool = False  # remove the key from the request before it goes upstream


@dataclass(slots=True, frozen=True)
class JwtProvider:
    name: str
    jwks: str  # the JWKS document (JSON)
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    headers: tuple[tuple[str, str], ...] = ()  # (name, value prefix); none: Authorization Bearer
    params: tuple[str, ...] = ()
    cookies: tuple[str, ...] = ()
    recompute_route: bool = False


@dataclass(slots=True, frozen=True)
class AuthConfig:
    """What the local Envoy enforces; `name` is the SecurityPolicy's, for messages."""

    name: str = "auth"
    api_keys: ApiKeys | None = None
    jwt: tuple[JwtProvider, ...] = ()
    jwt_optional: bool = False
    set_headers: frozenset[str] = field(default_factory=frozenset)  # headers the filters set

    @classmethod
    def from_objects(cls, docs: Iterable[dict], where: str = "") -> AuthConfig | None:
        """The SecurityPolicy among `docs` with the Secrets it references (also among
        `docs`); None when there is no SecurityPolicy."""
        docs = [d for d in docs if isinstance(d, dict)]
        policies = [d for d in docs if d.get("kind") == "SecurityPolicy"]
        if not policies:
            return None
        at = f"{where}: " if where else ""
        if len(policies) > 1:
            names = [_name(p) for p in policies]
            raise AuthError(f"{at}one SecurityPolicy per local stack (its one route), not {names}")
        secrets = {
            (_namespace(d), _name(d)): d for d in docs if d.get("kind") == "Secret" and _name(d)
        }
        try:
            return _policy(policies[0], secrets)
        except AuthError as exc:
            raise AuthError(f"{at}SecurityPolicy {_name(policies[0])}: {exc}") from None

    def curl_args(self) -> str:
        """How a client authenticates, as curl arguments with the first development key
        (API keys), or a placeholder for a token (JWT only)."""
        if self.api_keys is not None and self.api_keys.credentials:
            key = self.api_keys.credentials[0][1]
            kind, name = self.api_keys.sources[0]
            if kind == "query":
                return f"--url-query '{name}={key}'"
            if kind == "cookie":
                return f"-b '{name}={key}'"
            value = f"Bearer {key}" if name.lower() == "authorization" else key
            return f"-H '{name}: {value}'"
        if self.jwt:
            name, prefix = (self.jwt[0].headers or (("authorization", "Bearer "),))[0]
            return f"-H '{name}: {prefix}<a JWT signed by a key of the JWKS>'"
        return ""

    def describe(self) -> str:
        parts = []
        if self.api_keys is not None:
            clients = ", ".join(c for c, _ in self.api_keys.credentials)
            parts.append(f"API keys (clients {clients})")
        if self.jwt:
            parts.append(f"JWT ({', '.join(p.name for p in self.jwt)})")
        return f"SecurityPolicy {self.name}: " + " and ".join(parts)


# ---- SecurityPolicy → AuthConfig -------------------------------------------------------------


def _name(doc: dict) -> str:
    meta = doc.get("metadata")
    return str(meta.get("name", "")) if isinstance(meta, dict) else ""


def _namespace(doc: dict) -> str:
    meta = doc.get("metadata")
    return str(meta.get("namespace") or "default") if isinstance(meta, dict) else "default"


def _typed(value, kind: type, path: str):
    if not isinstance(value, kind):
        want = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false"}[kind]
        raise AuthError(f"{path}: must be {want}, not {value!r}")
    return value


def _text(value, path: str) -> str:
    if not _typed(value, str, path):
        raise AuthError(f"{path}: must not be empty")
    return value


def _texts(value, path: str) -> tuple[str, ...]:
    items = _typed(value, list, path)
    if not items:
        raise AuthError(f"{path}: must not be empty")
    return tuple(_text(v, f"{path}[{i}]") for i, v in enumerate(items))


def _fields(obj, path: str, known: tuple[str, ...]) -> dict:
    _typed(obj, dict, path)
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise AuthError(f"{path}.{unknown[0]}: unknown field (known: {', '.join(known)})")
    return obj


def _policy(doc: dict, secrets: dict[tuple[str, str], dict]) -> AuthConfig:
    if doc.get("apiVersion") != API_VERSION:
        raise AuthError(f"apiVersion: must be {API_VERSION}, not {doc.get('apiVersion')!r}")
    spec = _fields(
        doc.get("spec"),
        "spec",
        ("targetRef", "targetRefs", "targetSelectors", "apiKeyAuth", "jwt", *_UNSUPPORTED),
    )
    for key in _UNSUPPORTED:
        if key in spec:
            raise AuthError(f"spec.{key}: not supported by the local stack (apiKeyAuth, jwt are)")
    _targets(spec)
    if "apiKeyAuth" not in spec and "jwt" not in spec:
        raise AuthError("spec: needs apiKeyAuth or jwt (or both)")
    api_keys = None
    if "apiKeyAuth" in spec:
        api_keys = _api_keys(spec["apiKeyAuth"], "spec.apiKeyAuth", _namespace(doc), secrets)
    providers, optional = (), False
    if "jwt" in spec:
        jwt = _fields(spec["jwt"], "spec.jwt", ("providers", "optional"))
        optional = _typed(jwt.get("optional", False), bool, "spec.jwt.optional")
        items = _typed(jwt.get("providers"), list, "spec.jwt.providers")
        if not 1 <= len(items) <= 4:
            raise AuthError(f"spec.jwt.providers: 1 to 4 providers, not {len(items)}")
        providers = tuple(_provider(p, f"spec.jwt.providers[{i}]") for i, p in enumerate(items))
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise AuthError(f"spec.jwt.providers: names must be unique, not {names}")
    set_headers = {h for p in providers for h, _ in p.claim_to_headers}
    if api_keys is not None and api_keys.client_id_header:
        set_headers.add(api_keys.client_id_header)
    return AuthConfig(_name(doc), api_keys, providers, optional, frozenset(set_headers))


def _targets(spec: dict) -> None:
    refs = spec.get("targetRefs", [spec["targetRef"]] if "targetRef" in spec else None)
    if refs is None:
        if "targetSelectors" in spec:
            return
        raise AuthError("spec.targetRefs: required (the HTTPRoute or Gateway it protects)")
    path = "spec.targetRefs" if "targetRefs" in spec else "spec.targetRef"
    if not _typed(refs, list, path):
        raise AuthError(f"{path}: must not be empty")
    for i, ref in enumerate(refs):
        at = f"{path}[{i}]" if "targetRefs" in spec else path
        _fields(ref, at, ("group", "kind", "name", "sectionName"))
        if ref.get("group") != "gateway.networking.k8s.io":
            raise AuthError(f"{at}.group: must be gateway.networking.k8s.io")
        if ref.get("kind") not in _TARGET_KINDS:
            raise AuthError(f"{at}.kind: must be one of {', '.join(_TARGET_KINDS)}")
        _text(ref.get("name"), f"{at}.name")


def _api_keys(obj, path: str, namespace: str, secrets: dict) -> ApiKeys:
    spec = _fields(
        obj, path, ("credentialRefs", "extractFrom", "forwardClientIDHeader", "sanitize")
    )
    refs = _typed(spec.get("credentialRefs"), list, f"{path}.credentialRefs")
    if not refs:
        raise AuthError(f"{path}.credentialRefs: must name at least one Secret")
    credentials: dict[str, str] = {}
    for i, ref in enumerate(refs):
        at = f"{path}.credentialRefs[{i}]"
        _fields(ref, at, ("group", "kind", "name", "namespace"))
        if ref.get("group", "") != "" or ref.get("kind", "Secret") != "Secret":
            raise AuthError(f"{at}: must reference a core Secret (group '', kind Secret)")
        key = (ref.get("namespace") or namespace, _text(ref.get("name"), f"{at}.name"))
        if key not in secrets:
            raise AuthError(f"{at}: Secret {key[0]}/{key[1]} not found beside the policy")
        for client, api_key in _secret_keys(secrets[key]):
            credentials.setdefault(client, api_key)  # a duplicated client: the first one wins
    owners: dict[str, str] = {}
    for client, api_key in credentials.items():
        if api_key in owners:
            raise AuthError(
                f"{path}.credentialRefs: clients {owners[api_key]} and {client} share a key"
            )
        owners[api_key] = client
    extract = _typed(spec.get("extractFrom"), list, f"{path}.extractFrom")
    if not extract:
        raise AuthError(f"{path}.extractFrom: must say where the key is (headers, params, cookies)")
    sources = []
    for i, item in enumerate(extract):
        at = f"{path}.extractFrom[{i}]"
        _fields(item, at, ("headers", "params", "cookies"))
        if len(item) != 1:
            raise AuthError(f"{at}: exactly one of headers, params or cookies")
        ((kind, names),) = item.items()
        envoy_kind = {"headers": "header", "params": "query", "cookies": "cookie"}[kind]
        sources += [(envoy_kind, n) for n in _texts(names, f"{at}.{kind}")]
    header = spec.get("forwardClientIDHeader")
    if header is not None:
        _text(header, f"{path}.forwardClientIDHeader")
    sanitize = _typed(spec.get("sanitize", False), bool, f"{path}.sanitize")
    return ApiKeys(tuple(credentials.items()), tuple(sources), header, sanitize)


def _secret_keys(secret: dict) -> list[tuple[str, str]]:
    """(client id, API key) from an Opaque Secret's data (base64) and stringData."""
    where = f"Secret {_namespace(secret)}/{_name(secret)}"
    if secret.get("type", "Opaque") != "Opaque":
        raise AuthError(f"{where}: type must be Opaque, not {secret.get('type')!r}")
    keys: dict[str, str] = {}
    for client, value in _typed(secret.get("data") or {}, dict, f"{where} data").items():
        try:
            keys[client] = base64.b64decode(
                _text(value, f"{where} data.{client}"), validate=True
            ).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"{where} data.{client}: not base64 of UTF-8 text") from None
    for client, value in _typed(
        secret.get("stringData") or {}, dict, f"{where} stringData"
    ).items():
        keys[client] = _text(value, f"{where} stringData.{client}")
    if not keys:
        raise AuthError(f"{where}: holds no API key (one data key per client id)")
    for client, value in keys.items():
        if not value:
            raise AuthError(f"{where} {client}: the API key is empty")
    return list(keys.items())


_PROVIDER_FIELDS = (
    "name",
    "issuer",
    "audiences",
    "remoteJWKS",
    "localJWKS",
    "claimToHeaders",
    "recomputeRoute",
    "extractFrom",
)


def _provider(obj, path: str) -> JwtProvider:
    spec = _fields(obj, path, _PROVIDER_FIELDS)
    name = _text(spec.get("name"), f"{path}.name")
    if "remoteJWKS" in spec:
        raise AuthError(f"{path}.remoteJWKS: not supported by the local stack; use localJWKS")
    local = _fields(spec.get("localJWKS"), f"{path}.localJWKS", ("type", "inline", "valueRef"))
    if local.get("type", "Inline") != "Inline" or "valueRef" in local:
        raise AuthError(f"{path}.localJWKS: only type Inline (inline JWKS) locally")
    jwks = _text(local.get("inline"), f"{path}.localJWKS.inline")
    try:
        keys = json.loads(jwks).get("keys")
    except (ValueError, AttributeError):
        keys = None
    if (
        not keys
        or not isinstance(keys, list)
        or not all(isinstance(k, dict) and "kty" in k for k in keys)
    ):
        raise AuthError(f"{path}.localJWKS.inline: not a JWKS (JSON with a non-empty 'keys' list)")
    claims = []
    for i, item in enumerate(
        _typed(spec.get("claimToHeaders", []), list, f"{path}.claimToHeaders")
    ):
        at = f"{path}.claimToHeaders[{i}]"
        _fields(item, at, ("header", "claim"))
        claims.append(
            (_text(item.get("header"), f"{at}.header"), _text(item.get("claim"), f"{at}.claim"))
        )
    extract = _fields(
        spec.get("extractFrom", {}), f"{path}.extractFrom", ("headers", "params", "cookies")
    )
    headers = []
    for i, h in enumerate(_typed(extract.get("headers", []), list, f"{path}.extractFrom.headers")):
        at = f"{path}.extractFrom.headers[{i}]"
        _fields(h, at, ("name", "valuePrefix"))
        prefix = h.get("valuePrefix", "")
        headers.append(
            (_text(h.get("name"), f"{at}.name"), _typed(prefix, str, f"{at}.valuePrefix"))
        )
    return JwtProvider(
        name=name,
        jwks=jwks,
        issuer=_typed(spec.get("issuer", ""), str, f"{path}.issuer"),
        audiences=tuple(
            _text(a, f"{path}.audiences[{i}]")
            for i, a in enumerate(_typed(spec.get("audiences", []), list, f"{path}.audiences"))
        ),
        claim_to_headers=tuple(claims),
        headers=tuple(headers),
        params=_texts(extract["params"], f"{path}.extractFrom.params")
        if "params" in extract
        else (),
        cookies=_texts(extract["cookies"], f"{path}.extractFrom.cookies")
        if "cookies" in extract
        else (),
        recompute_route=_typed(spec.get("recomputeRoute", False), bool, f"{path}.recomputeRoute"),
    )


# ---- AuthConfig → Envoy HTTP filters ---------------------------------------------------------


def removed_headers(auth: AuthConfig | None, trust_client_headers: bool = False) -> list[str]:
    """The client-sent headers Envoy removes before anything else sees the request: the
    user id, the gateway's own headers, those the auth filters set and, unless clients are
    trusted, their scheduling hints. The cluster's ClientTrafficPolicy removes the same."""
    hints = () if trust_client_headers else CLIENT_HINT_HEADERS
    return sorted({USER_HEADER, *GATEWAY_HEADERS, *hints, *(auth.set_headers if auth else ())})


def http_filters(auth: AuthConfig | None, trust_client_headers: bool = False) -> list[dict]:
    """The filters that go before ext_proc, in order (Envoy Gateway's: header mutation,
    API key auth, JWT authn). Without auth only the header removal."""
    removed = removed_headers(auth, trust_client_headers)
    filters = [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": _TYPE + "header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [{"remove": h} for h in removed]},
            },
        }
    ]
    if auth is not None and auth.api_keys is not None:
        filters.append(_api_key_filter(auth.api_keys))
    if auth is not None and auth.jwt:
        filters.append(_jwt_filter(auth.jwt, auth.jwt_optional))
    return filters


def _api_key_filter(keys: ApiKeys) -> dict:
    config: dict = {
        "@type": _TYPE + "api_key_auth.v3.ApiKeyAuth",
        "credentials": [{"key": key, "client": client} for client, key in keys.credentials],
        "key_sources": [{kind: name} for kind, name in keys.sources],
    }
    if keys.client_id_header or keys.sanitize:
        forwarding: dict = {"hide_credentials": keys.sanitize}
        if keys.client_id_header:
            forwarding["header"] = keys.client_id_header
        config["forwarding"] = forwarding
    return {"name": "envoy.filters.http.api_key_auth", "typed_config": config}


def _jwt_filter(providers: tuple[JwtProvider, ...], optional: bool) -> dict:
    configs = {}
    for p in providers:
        c: dict = {"local_jwks": {"inline_string": p.jwks}, "forward": True}
        if p.issuer:
            c["issuer"] = p.issuer
        if p.audiences:
            c["audiences"] = list(p.audiences)
        if p.claim_to_headers:
            c["claim_to_headers"] = [
                {"header_name": h, "claim_name": n} for h, n in p.claim_to_headers
            ]
        if p.headers:
            c["from_headers"] = [{"name": n, "value_prefix": v} for n, v in p.headers]
        if p.params:
            c["from_params"] = list(p.params)
        if p.cookies:
            c["from_cookies"] = list(p.cookies)
        if p.recompute_route:
            c["clear_route_cache"] = True
        configs[p.name] = c
    # Any provider will do (Envoy Gateway's requires_any); optional: a missing token too.
    reqs: list[dict] = [{"provider_name": p.name} for p in providers]
    if optional:
        reqs.append({"allow_missing": {}})
    requires = reqs[0] if len(reqs) == 1 else {"requires_any": {"requirements": reqs}}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _TYPE + "jwt_authn.v3.JwtAuthentication",
            "providers": configs,
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        },
    }
