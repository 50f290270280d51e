"""stack/auth.py: an Envoy Gateway SecurityPolicy and its Secrets → the local Envoy's auth
filters. The quickstart's and the cluster's policies translate, the filters come in Envoy
Gateway's order before the picker, the rendered config passes Envoy's own validation, and a
policy the local stack cannot use fails with the field named."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from infergw.api.names import USER_HEADER
from infergw.cluster.certs import serving_cert
from infergw.controllers.manifests import read_objects
from infergw.stack.auth import AuthConfig, AuthError, http_filters
from infergw.stack.envoy_config import EnvoySettings, render
from infergw.stack.example import Example, ExampleError
from infergw.stack.ports import PickerPorts
from tests.envoy_check import assert_envoy_accepts
from tests.paths import ROOT

QUICKSTART = ROOT / "examples" / "quickstart"
MANIFESTS = ROOT / "gateway-manifests"


def load(*paths: Path) -> list[dict]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def jwks() -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "1"}]})


def policy(**spec) -> dict:
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "SecurityPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "targetRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llm-route"}
            ],
            **spec,
        },
    }


def secret(name="keys", namespace="default", **data) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


API_KEYS = {
    "credentialRefs": [{"group": "", "kind": "Secret", "name": "keys"}],
    "extractFrom": [{"headers": ["x-api-key"]}],
    "forwardClientIDHeader": USER_HEADER,
}


def jwt_spec(**provider) -> dict:
    return {
        "providers": [
            {
                "name": "dev",
                "issuer": "https://issuer.test",
                "localJWKS": {"type": "Inline", "inline": provider.pop("jwks", None) or jwks()},
                "claimToHeaders": [{"header": USER_HEADER, "claim": "sub"}],
                **provider,
            }
        ]
    }


# ---- the policies in the repository -----------------------------------------------------------


def test_the_quickstart_turns_api_keys_on_and_keeps_them_from_the_controllers():
    example = Example.read(QUICKSTART)
    auth = example.auth
    assert auth is not None and auth.name == "quickstart-auth"
    assert [c for c, _ in auth.api_keys.credentials] == ["alice", "bob"]
    assert auth.api_keys.sources == (("header", "authorization"), ("header", "x-api-key"))
    assert auth.api_keys.client_id_header == USER_HEADER and auth.api_keys.sanitize
    assert auth.jwt == ()
    # The banner's curl sends the first dev key the way OpenAI clients do.
    assert auth.curl_args() == "-H 'authorization: Bearer sk-infergate-dev-alice'"
    # The controllers leave Envoy's objects alone (they would not know how to run them).
    objects, problems = read_objects(QUICKSTART)
    assert problems == [] and [o["kind"] for _, o in objects] == ["Model"]
    # No key in reprs (tracebacks, logs).
    assert "sk-infergate" not in repr(auth)


def test_the_cluster_policy_protects_the_route_and_matches_the_quickstart():
    docs = load(MANIFESTS / "security-policy.yaml", MANIFESTS / "security-policy-api-keys.yaml")
    auth = AuthConfig.from_objects(docs)
    assert auth is not None and [c for c, _ in auth.api_keys.credentials] == ["team-a", "team-b"]
    (sp,) = [d for d in docs if d["kind"] == "SecurityPolicy"]
    (route,) = load(MANIFESTS / "httproute.yaml")
    (target,) = sp["spec"]["targetRefs"]
    assert (target["kind"], target["name"]) == ("HTTPRoute", route["metadata"]["name"])
    assert sp["metadata"].get("namespace") == route["metadata"].get("namespace")
    (local,) = [d for d in load(*QUICKSTART.glob("*.yaml")) if d["kind"] == "SecurityPolicy"]
    for key in ("extractFrom", "forwardClientIDHeader", "sanitize"):
        assert sp["spec"]["apiKeyAuth"][key] == local["spec"]["apiKeyAuth"][key]


def test_examples_without_a_policy_run_without_auth():
    assert Example.read(ROOT / "examples" / "pd").auth is None
    assert AuthConfig.from_objects([secret(a="k")]) is None  # a Secret alone turns nothing on


# ---- the Envoy filters ------------------------------------------------------------------------


GATEWAY_SET = [
    USER_HEADER,
    "x-gateway-destination-endpoint",
    "x-prefiller-host-port",
    "x-gateway-model-name-rewrite",
]
CLIENT_HINTS = ["x-gateway-inference-objective", "x-gateway-inference-fairness-id"]


def _removed(filters: list[dict]) -> list[str]:
    first = filters[0]
    assert first["name"] == "envoy.filters.http.header_mutation"
    return [m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]]


def test_client_copies_of_gateway_headers_are_removed_first_even_without_auth():
    (only,) = http_filters(None)
    assert sorted(_removed([only])) == sorted(GATEWAY_SET + CLIENT_HINTS)


def test_trusted_clients_keep_their_hints_but_never_the_gateways_headers():
    assert sorted(_removed(http_filters(None, trust_client_headers=True))) == sorted(GATEWAY_SET)
    auth = Example.read(QUICKSTART).auth
    assert sorted(_removed(http_filters(auth, trust_client_headers=True))) == sorted(GATEWAY_SET)


def test_filters_follow_envoy_gateways_order_and_carry_the_policy():
    auth = AuthConfig.from_objects(
        [
            policy(apiKeyAuth={**API_KEYS, "sanitize": True}, jwt=jwt_spec()),
            secret(alice="ka", bob="kb"),
        ]
    )
    names = [f["name"].rsplit(".", 1)[1] for f in http_filters(auth)]
    assert names == ["header_mutation", "api_key_auth", "jwt_authn"]
    _, keys, jwt = (f["typed_config"] for f in http_filters(auth))
    assert keys["credentials"] == [
        {"key": "ka", "client": "alice"},
        {"key": "kb", "client": "bob"},
    ]
    assert keys["key_sources"] == [{"header": "x-api-key"}]
    assert keys["forwarding"] == {"hide_credentials": True, "header": USER_HEADER}
    provider = jwt["providers"]["dev"]
    assert provider["claim_to_headers"] == [{"header_name": USER_HEADER, "claim_name": "sub"}]
    assert provider["issuer"] == "https://issuer.test" and provider["forward"] is True
    assert jwt["rules"] == [{"match": {"prefix": "/"}, "requires": {"provider_name": "dev"}}]


def test_an_optional_jwt_allows_a_missing_token_and_any_provider_will_do():
    spec = jwt_spec()
    spec["providers"].append({**spec["providers"][0], "name": "other"})
    auth = AuthConfig.from_objects([policy(jwt={**spec, "optional": True})])
    requires = http_filters(auth)[-1]["typed_config"]["rules"][0]["requires"]
    assert requires == {
        "requires_any": {
            "requirements": [
                {"provider_name": "dev"},
                {"provider_name": "other"},
                {"allow_missing": {}},
            ]
        }
    }
    assert auth.curl_args().startswith("-H 'authorization: Bearer <a JWT")


def test_the_rendered_config_passes_envoys_validation(tmp_path):
    auth = AuthConfig.from_objects(
        [policy(apiKeyAuth=API_KEYS, jwt=jwt_spec()), secret(alice="ka")]
    )
    text = render(
        EnvoySettings(
            listen_port=18080,
            admin_port=19901,
            picker_host="127.0.0.1",
            pickers=[PickerPorts(19002, 19003, 19090, 19004)],
            picker_tls=True,
            picker_ca=str(tmp_path / "ca.crt"),
            failure_mode="FailClose",
            endpoints=[("127.0.0.1", 18000)],
            auth=auth,
        )
    )
    serving_cert(hosts=("127.0.0.1",)).write(tmp_path)  # Envoy reads the CA file to validate
    config = yaml.safe_load(text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.api_key_auth",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    assert_envoy_accepts(path)


# ---- what the translation accepts -------------------------------------------------------------


def test_secret_data_string_data_namespaces_and_duplicate_clients():
    first = secret("a", alice="from-a")
    other = {**secret("b", namespace="keys-ns", alice="from-b"), "stringData": {"carol": "kc"}}
    refs = [{"name": "a"}, {"name": "b", "namespace": "keys-ns"}]
    auth = AuthConfig.from_objects(
        [policy(apiKeyAuth={**API_KEYS, "credentialRefs": refs}), first, other]
    )
    # A client in two Secrets: the first one wins (Envoy Gateway's rule).
    assert auth.api_keys.credentials == (("alice", "from-a"), ("carol", "kc"))


def test_params_and_cookies_become_envoy_key_sources():
    spec = {**API_KEYS, "extractFrom": [{"params": ["key"]}, {"cookies": ["k"]}]}
    auth = AuthConfig.from_objects([policy(apiKeyAuth=spec), secret(alice="ka")])
    assert http_filters(auth)[1]["typed_config"]["key_sources"] == [
        {"query": "key"},
        {"cookie": "k"},
    ]
    assert auth.curl_args() == "--url-query 'key=ka'"


def _break(doc_path: str, value) -> list[dict]:
    """The API-key-and-JWT policy with one field set (value None: deleted)."""
    doc = policy(apiKeyAuth=copy.deepcopy(API_KEYS), jwt=jwt_spec())
    *parents, last = doc_path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is None:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return [doc, secret(alice="ka", bob="kb")]


BROKEN = [
    ("apiVersion", "gateway.envoyproxy.io/v1", "apiVersion: must be gateway.envoyproxy.io"),
    ("spec.targetRefs", None, "spec.targetRefs: required"),
    ("spec.targetRefs.0.kind", "Service", "spec.targetRefs[0].kind: must be one of"),
    ("spec.targetRefs.0.group", "", "spec.targetRefs[0].group"),
    ("spec.basicAuth", {"users": {"name": "u"}}, "spec.basicAuth: not supported"),
    (
        "spec.apiKeyAuth.forwardClientIdHeader",
        "x",
        "spec.apiKeyAuth.forwardClientIdHeader: unknown",
    ),
    ("spec.apiKeyAuth.credentialRefs", [], "spec.apiKeyAuth.credentialRefs: must name"),
    ("spec.apiKeyAuth.credentialRefs.0.name", "nope", "credentialRefs[0]: Secret default/nope"),
    ("spec.apiKeyAuth.credentialRefs.0.kind", "ConfigMap", "credentialRefs[0]: must reference"),
    ("spec.apiKeyAuth.extractFrom", None, "spec.apiKeyAuth.extractFrom: must be a list"),
    (
        "spec.apiKeyAuth.extractFrom.0",
        {"headers": ["a"], "params": ["b"]},
        "spec.apiKeyAuth.extractFrom[0]: exactly one of",
    ),
    ("spec.apiKeyAuth.extractFrom.0.headers", [], "spec.apiKeyAuth.extractFrom[0].headers: must"),
    ("spec.apiKeyAuth.sanitize", "yes", "spec.apiKeyAuth.sanitize: must be true or false"),
    ("spec.jwt.providers", [], "spec.jwt.providers: 1 to 4"),
    ("spec.jwt.providers.0.name", "", "spec.jwt.providers[0].name: must not be empty"),
    (
        "spec.jwt.providers.0.remoteJWKS",
        {"uri": "https://idp/jwks"},
        "spec.jwt.providers[0].remoteJWKS: not supported",
    ),
    ("spec.jwt.providers.0.localJWKS", None, "spec.jwt.providers[0].localJWKS: must be a mapping"),
    ("spec.jwt.providers.0.localJWKS.inline", "{}", "providers[0].localJWKS.inline: not a JWKS"),
    ("spec.jwt.providers.0.localJWKS.type", "ValueRef", "providers[0].localJWKS: only type Inline"),
    ("spec.jwt.providers.0.claimToHeaders.0.claim", None, "claimToHeaders[0].claim: must be a"),
    ("spec.jwt.optional", "true", "spec.jwt.optional: must be true or false"),
]


@pytest.mark.parametrize(("field", "value", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_policy_fails_with_the_field_named(field, value, message):
    with pytest.raises(AuthError, match="SecurityPolicy p: .*" + _literal(message)):
        AuthConfig.from_objects(_break(field, value))


def _literal(text: str) -> str:
    return re.escape(text)


def test_neither_api_keys_nor_jwt_is_an_error():
    with pytest.raises(AuthError, match=r"spec: needs apiKeyAuth or jwt"):
        AuthConfig.from_objects([policy()])


def test_bad_secrets_are_named():
    cases = [
        ({**secret(), "data": {"alice": "not base64!"}}, "Secret default/keys data.alice: not"),
        (secret(), "Secret default/keys: holds no API key"),
        (secret(alice="same", bob="same"), "clients alice and bob share a key"),
        ({**secret(alice="k"), "type": "kubernetes.io/tls"}, "Secret default/keys: type must"),
    ]
    for bad, message in cases:
        with pytest.raises(AuthError, match=_literal(message)):
            AuthConfig.from_objects([policy(apiKeyAuth=API_KEYS), bad])


def test_two_policies_and_duplicate_provider_names_are_errors():
    with pytest.raises(AuthError, match="one SecurityPolicy per local stack"):
        AuthConfig.from_objects([policy(jwt=jwt_spec()), policy(jwt=jwt_spec())], "dir")
    spec = jwt_spec()
    spec["providers"].append(spec["providers"][0])
    with pytest.raises(AuthError, match=r"spec.jwt.providers: names must be unique"):
        AuthConfig.from_objects([policy(jwt=spec)])


def test_an_example_with_a_broken_policy_is_refused_with_the_field_named(tmp_path):
    for name in ("model.yaml", "epp-config.yaml"):
        (tmp_path / name).write_text((QUICKSTART / name).read_text())
    bad = policy(apiKeyAuth={**API_KEYS, "credentialRefs": [{"name": "missing"}]})
    (tmp_path / "auth.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ExampleError, match=r"credentialRefs\[0\]: Secret default/missing"):
        Example.read(tmp_path)


def test_picker_tls_is_always_verified():
    settings = dict(
        listen_port=18080,
        admin_port=19901,
        picker_host="127.0.0.1",
        pickers=[PickerPorts(19002, 19003, 19090, 19004)],
        picker_tls=True,
        failure_mode="FailClose",
        endpoints=[("127.0.0.1", 18000)],
    )
    with pytest.raises(ValueError, match="needs picker_ca"):
        render(EnvoySettings(**settings))
    for host, san_type in (("127.0.0.1", "IP_ADDRESS"), ("epp.default.svc", "DNS")):
        text = render(EnvoySettings(**{**settings, "picker_host": host, "picker_ca": "/ca.crt"}))
        (picker,) = [
            c
            for c in yaml.safe_load(text)["static_resources"]["clusters"]
            if c["name"] == "endpoint-picker"
        ]
        tls = picker["transport_socket"]["typed_config"]["common_tls_context"]
        assert tls["validation_context"] == {
            "trusted_ca": {"filename": "/ca.crt"},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": host}}],
        }


def test_up_trusts_client_headers_only_when_asked(tmp_path):
    from infergw.up import build_parser, stack_config

    quickstart = Example.read(QUICKSTART)
    for argv, trusted in (([], False), (["--trust-client-headers"], True)):
        cfg = stack_config(build_parser().parse_args(argv), quickstart, tmp_path)
        assert cfg.trust_client_headers is trusted
        assert cfg.auth is quickstart.auth
    assert stack_config(build_parser().parse_args(["--no-auth"]), quickstart, tmp_path).auth is None


def test_up_turns_the_examples_auth_off_with_no_auth():
    from infergw.up import _auth_line, build_parser

    assert build_parser().parse_args(["--no-auth"]).no_auth
    assert not build_parser().parse_args([]).no_auth
    quickstart = Example.read(QUICKSTART)
    assert _auth_line(quickstart, no_auth=False).startswith("SecurityPolicy quickstart-auth: API")
    assert _auth_line(quickstart, no_auth=True).startswith("off (--no-auth")
    assert _auth_line(Example.read(ROOT / "examples" / "pd"), no_auth=False).startswith("none")
