"""Authentication in a real Envoy, before the picker: the quickstart's API keys, JWTs signed
here (RS256 and ES256) against an inline JWKS, both together, and none.

What the checks observe is real: Envoy's status codes; the picker's own count of the ext_proc
streams it was sent (`infergate_epp_extproc_messages_total{kind="request_headers"}`), which
shows a rejected request never reached it; and the headers the model-server pod received
(tests/e2e/recording_backend.py records them), which come after the picker's ext_proc filter
in the chain and show the one x-infergate-user the picker was given.
"""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from infergw.api.names import USER_HEADER
from infergw.stack.auth import AuthConfig
from infergw.stack.example import Example
from infergw.stack.local import QUICKSTART, LocalStack
from tests.e2e.stack_fixtures import ask, picker_requests, recorded, recording_stack

pytestmark = pytest.mark.slow

ISSUER = "https://issuer.infergate.test"
ALICE_KEY = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml
BOB_KEY = "sk-infergate-dev-bob"


class Keys:
    """A signing key of each kind the JWKS publishes, and one it does not."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = [
            {
                **json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key())),
                "kid": "rsa",
                "alg": "RS256",
            },
            {**json.loads(ECAlgorithm.to_jwk(self.ec.public_key())), "kid": "ec", "alg": "ES256"},
        ]
        self.jwks = json.dumps({"keys": public})

    def token(self, sub: str, *, key=None, alg="RS256", kid="rsa", expires_in=3600, iss=ISSUER):
        now = int(time.time())
        claims = {"sub": sub, "iss": iss, "iat": now, "exp": now + expires_in}
        signer = key or (self.ec if alg == "ES256" else self.rsa)
        return jwt.encode(claims, signer, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Each test gives Envoy its own auth."""
    s = recording_stack(tmp_path_factory.mktemp("auth"))
    yield s
    s.stop()


def with_auth(stack: LocalStack, auth: AuthConfig | None) -> LocalStack:
    stack.cfg.auth = auth
    stack.restart_envoy()
    return stack


def policy(**spec) -> dict:
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "SecurityPolicy",
        "metadata": {"name": "test-auth", "namespace": "default"},
        "spec": {
            "targetRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llm-route"}
            ],
            **spec,
        },
    }


def jwt_policy(keys: Keys, **spec) -> dict:
    provider = {
        "name": "dev",
        "issuer": ISSUER,
        "localJWKS": {"type": "Inline", "inline": keys.jwks},
        "claimToHeaders": [{"header": USER_HEADER, "claim": "sub"}],
    }
    return policy(jwt={"providers": [provider]}, **spec)


def received(stack: LocalStack, name: str) -> list[str]:
    """Every value of header `name` in the last request the pod received."""
    return [v for k, v in recorded(stack)[-1]["headers"] if k == name]


def refused(stack: LocalStack, *attempts: dict) -> None:
    """Each attempt gets Envoy's 401, and neither the picker nor the pod sees it."""
    seen, served = picker_requests(stack), len(recorded(stack))
    for headers in attempts:
        r = ask(stack, headers)
        assert r.status_code == 401, (headers, r.status_code, r.text)
    assert picker_requests(stack) == seen
    assert len(recorded(stack)) == served


def accepted(stack: LocalStack, headers) -> list[str]:
    """200 through the picker; the x-infergate-user values the pod received."""
    seen = picker_requests(stack)
    r = ask(stack, headers)
    assert r.status_code == 200, r.text
    assert picker_requests(stack) == seen + 1
    return received(stack, USER_HEADER)


def test_the_quickstart_api_keys(stack):
    with_auth(stack, Example.read(QUICKSTART).auth)
    refused(
        stack,
        {},
        {USER_HEADER: "alice"},  # claiming to be someone is no credential
        {"authorization": "Bearer sk-infergate-dev-mallory"},
        {"x-api-key": ALICE_KEY.upper()},
        {"authorization": ALICE_KEY + "x"},
    )
    # The key as OpenAI clients send it; the pod gets the client id and never the key.
    assert accepted(stack, {"authorization": f"Bearer {ALICE_KEY}"}) == ["alice"]
    assert received(stack, "authorization") == []
    # x-api-key works too, and a forged user id (even several, in any case) is replaced.
    forged = [(USER_HEADER, "admin"), ("X-Infergate-User", "root"), ("x-api-key", BOB_KEY)]
    assert accepted(stack, forged) == ["bob"]
    assert received(stack, "x-api-key") == []

    import openai

    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=BOB_KEY, max_retries=0)
    assert client.completions.create(model="infergate-sim", prompt="hi", max_tokens=1).choices
    assert received(stack, USER_HEADER) == ["bob"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_jwts_signed_by_the_jwks_pass_and_others_get_401(stack, keys):
    with_auth(stack, AuthConfig.from_objects([jwt_policy(keys)]))
    bearer = lambda token: {"authorization": f"Bearer {token}"}  # noqa: E731
    refused(
        stack,
        {},
        {USER_HEADER: "carol"},
        bearer(keys.token("carol", expires_in=-3600)),  # expired (beyond Envoy's 60 s skew)
        bearer(keys.token("carol", key=keys.stranger)),  # signed by a key not in the JWKS
        bearer(keys.token("carol", key=keys.stranger, kid="stranger")),
        bearer(keys.token("carol", iss="https://elsewhere.test")),  # another issuer
        bearer(keys.token("carol")[:-4] + "AAAA"),  # signature tampered with
        bearer("not-a-jwt"),
    )
    forged = [(USER_HEADER, "admin"), ("authorization", f"Bearer {keys.token('carol')}")]
    assert accepted(stack, forged) == ["carol"]
    assert accepted(stack, bearer(keys.token("dave", alg="ES256", kid="ec"))) == ["dave"]


def test_api_keys_and_jwt_together_need_both_as_in_envoy_gateway(stack, keys):
    api_keys = {
        "credentialRefs": [{"name": "quickstart-api-keys"}],
        "extractFrom": [{"headers": ["x-api-key"]}],
        "forwardClientIDHeader": USER_HEADER,
    }
    (secret,) = [
        d
        for docs in Example.read(QUICKSTART).documents.values()
        for d in docs
        if d["kind"] == "Secret"
    ]
    with_auth(stack, AuthConfig.from_objects([jwt_policy(keys, apiKeyAuth=api_keys), secret]))
    token = {"authorization": f"Bearer {keys.token('erin')}"}
    refused(stack, {}, {"x-api-key": ALICE_KEY}, token)
    # Both: the JWT filter runs second, and its claim is the user the picker gets.
    assert accepted(stack, {"x-api-key": ALICE_KEY, **token, USER_HEADER: "admin"}) == ["erin"]


def test_without_auth_everyone_passes_but_no_client_names_the_user(stack):
    with_auth(stack, None)
    assert accepted(stack, {}) == []
    assert accepted(stack, [(USER_HEADER, "admin"), (USER_HEADER, "root")]) == []
