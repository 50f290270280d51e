"""The certificate of the local gateway's HTTPS listener (`infergate up --tls`).

Either the stack makes it — a CA and a certificate it signs (cluster/certs.py) for the names
clients dial: 127.0.0.1, localhost and the listen address — and keeps it in a directory, so
clients trust the same ca.crt across `up`s until it expires (or nearly) or the names change; or
the user brings one (--tls-cert/--tls-key), which is checked and never replaced.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from infergw.cluster.certs import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    ensure_serving_cert,
    validity_problem,
)
from infergw.stack.envoy_config import ListenerTls

GATEWAY_TLS_DIR = "gateway-tls"  # in the work directory, or the user's state directory
COMMON_NAME = "infergate-gateway"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
# A listener on every address, and where this machine's own clients reach it.
WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class GatewayCert:
    listener: ListenerTls
    ca_file: Path | None  # the CA clients trust; None: the user's own certificate
    made_because: str | None  # why a new one was made at this start; None: reused, or the user's


def certificate_hosts(listen_host: str) -> tuple[str, ...]:
    """The names the certificate must carry: loopback's, and the listen address (for a
    wildcard address, this machine's host name and FQDN, which remote clients dial)."""
    loopback = WILDCARD_LOOPBACK.get(listen_host)
    extra = (loopback, socket.gethostname(), socket.getfqdn()) if loopback else (listen_host,)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, *extra)))


def default_directory(workdir: Path | None) -> Path:
    """Where the stack keeps the certificate: the work directory given, else the user's state
    directory (the same path every `up`, so a client's --cacert keeps working)."""
    if workdir is not None:
        return workdir / GATEWAY_TLS_DIR
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "infergate" / GATEWAY_TLS_DIR


def stack_cert(directory: Path, listen_host: str) -> GatewayCert:
    """The stored certificate if it still serves `listen_host`'s names, else a new one."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # the key is in it
    _, made_because = ensure_serving_cert(directory, certificate_hosts(listen_host), COMMON_NAME)
    listener = ListenerTls(cert_file=directory / CERT_FILE, key_file=directory / KEY_FILE)
    return GatewayCert(listener, directory / CA_FILE, made_because)


def own_cert(cert_file: Path, key_file: Path) -> GatewayCert:
    """The user's certificate and key; ValueError if they cannot serve (a file missing, not
    PEM, a key that is not the certificate's, expired or not yet valid)."""
    listener = ListenerTls(cert_file=cert_file.resolve(), key_file=key_file.resolve())
    listener.check()
    problem = validity_problem(x509.load_pem_x509_certificate(listener.cert_file.read_bytes()))
    if problem is not None:
        raise ValueError(f"the certificate {cert_file} {problem}")
    return GatewayCert(listener, ca_file=None, made_because=None)
