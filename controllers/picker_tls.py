"""The picker's TLS Secret `m-epp-tls`, made by the controllers themselves: nothing to install
besides them (no cert-manager), and they know the CA, so the Model's EnvoyPatchPolicy can
inline it for Envoy to verify the picker (picker_patch.py).

Per Model a throwaway CA signs one serving certificate for the picker Service's DNS names
(cluster/certs.py `serving_cert`); the CA's key is never kept. The Secret (type
kubernetes.io/tls, owned by the Model) holds tls.crt, tls.key and ca.crt. It is replaced once
`reuse_problem` finds anything wrong: less than RENEW_BEFORE left, other names, unreadable.
ca.crt then holds the new CA and the previous one, so Envoy keeps trusting the replicas still
serving the old certificate while the Deployment rolls (its pod template carries the
certificate's fingerprint, TLS_ANNOTATION, so a new certificate restarts the replicas).

The same Secret holds the pool's Responses API id key (RESPONSE_ID_KEY, epp/response_ids.py):
made once, kept through renewals (a new key would orphan every response id clients hold), and
shared by every replica, so a client cannot make up an id naming a pod of its choice.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets

from cryptography import x509

from infergw.api import ObjectMeta
from infergw.api.core import Secret
from infergw.cluster.certs import CA_FILE, CERT_FILE, KEY_FILE, ServingCert, reuse_problem
from infergw.cluster.certs import serving_cert as make_serving_cert

CERT_DAYS = 90  # renewed RENEW_BEFORE (30 days) before it ends
TLS_ANNOTATION = "infergate.io/picker-cert-sha256"
PEM_END = b"-----END CERTIFICATE-----"
RESPONSE_ID_KEY = "response-id.key"  # its key in the Secret and its file beside tls.crt


def hosts(namespace: str, picker: str) -> tuple[str, str]:
    """What Envoy dials (and verifies), short and fully qualified."""
    return (f"{picker}.{namespace}.svc", f"{picker}.{namespace}.svc.cluster.local")


def stored_cert(secret: dict) -> ServingCert | None:
    """The Secret's certificate, CA bundle and key, or None if a key is missing or not base64."""
    data = secret.get("data") or {}
    try:
        return ServingCert(
            ca=base64.b64decode(data[CA_FILE], validate=True),
            cert=base64.b64decode(data[CERT_FILE], validate=True),
            key=base64.b64decode(data[KEY_FILE], validate=True),
        )
    except (KeyError, ValueError, TypeError):
        return None


def first_pem(bundle: bytes) -> bytes:
    """The first certificate of a PEM bundle: the CA that signed the current certificate."""
    head, sep, _ = bundle.partition(PEM_END)
    return head + sep + b"\n"


def renewal_problem(
    secret: dict, namespace: str, picker: str, now: datetime.datetime | None = None
) -> str | None:
    """Why the stored Secret must be replaced, or None."""
    stored = stored_cert(secret)
    if stored is None:
        return "it lacks tls.crt, tls.key or ca.crt"
    current = ServingCert(ca=first_pem(stored.ca), cert=stored.cert, key=stored.key)
    return reuse_problem(current, hosts(namespace, picker), now)


def issue(
    namespace: str, picker: str, previous: dict | None = None, now: datetime.datetime | None = None
) -> ServingCert:
    """A new certificate; its ca.crt bundles the previous Secret's current CA while it is valid."""
    made = make_serving_cert(hosts(namespace, picker), picker, CERT_DAYS, now)
    old = stored_cert(previous) if previous else None
    if old is not None:
        old_ca = first_pem(old.ca)
        try:
            ends = x509.load_pem_x509_certificate(old_ca).not_valid_after_utc
        except ValueError:
            ends = None
        if ends is not None and ends > (now or datetime.datetime.now(datetime.UTC)):
            return ServingCert(ca=made.ca + old_ca, cert=made.cert, key=made.key)
    return made


def fingerprint(cert_pem: bytes) -> str:
    return hashlib.sha256(cert_pem).hexdigest()


def new_response_id_key() -> bytes:
    """32 random bytes as text (the picker strips blanks around a key file's bytes)."""
    return secrets.token_urlsafe(32).encode()


def stored_response_id_key(secret: dict) -> bytes | None:
    """The Secret's response id key, or None if it has none (made before there was one)."""
    text = (secret.get("data") or {}).get(RESPONSE_ID_KEY)
    try:
        return base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except ValueError:
        return None


def secret(meta: ObjectMeta, cert: ServingCert, response_id_key: bytes) -> Secret:
    """The Secret the picker mounts (tls.crt, tls.key, its response id key) and Envoy's CA
    comes from (ca.crt)."""
    files = ((CERT_FILE, cert.cert), (KEY_FILE, cert.key), (CA_FILE, cert.ca))
    return Secret(
        metadata=meta,
        type="kubernetes.io/tls",
        data={
            k: base64.b64encode(v).decode() for k, v in (*files, (RESPONSE_ID_KEY, response_id_key))
        },
    )
