"""Render the local Envoy config from gateway-manifests/local/envoy.yaml.j2 (shipped as
`infergw.gateway_manifests`' data, stack/resources.py)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from infergw.api.names import MODEL_NAME_HEADER, SERVED_HEADER
from infergw.api.retries import RETRIABLE_STATUS_CODES, RETRY_ON, retry_budget
from infergw.api.tracing import TraceSettings
from infergw.cluster.certs import key_problem
from infergw.stack.auth import AuthConfig, http_filters
from infergw.stack.envoy_tracing import as_yaml, collector_cluster, tracing_block
from infergw.stack.ports import PickerPorts, RouterPorts
from infergw.stack.resources import ENVOY_TEMPLATE

# One pool alone: its clusters keep the names they always had.
POOL_CLUSTER = "pool"
PICKER_CLUSTER = "endpoint-picker"
# The answer to a request the router gave no pool (no body, or one passed on unread).
NO_POOL_ANSWER = {
    "error": {
        "message": "this gateway serves several models: send a JSON body naming one in 'model'",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
}

# CONNECT asks for a tunnel, which no inference API is.
CONNECT_ANSWER = {
    "error": {
        "message": "CONNECT is not served here: send the inference API's requests",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }
}


@dataclass(frozen=True, slots=True)
class PoolRoute:
    """One InferencePool behind Envoy: its pods' cluster (EDS from the controllers when
    eds_path is set) and its pickers' ext_proc cluster."""

    name: str
    pickers: list[PickerPorts]
    eds_path: str | None = None
    cluster: str = POOL_CLUSTER
    picker_cluster: str = PICKER_CLUSTER

    @property
    def eds_dir(self) -> str | None:
        return str(Path(self.eds_path).parent) if self.eds_path else None

    @classmethod
    def named(cls, name: str, pickers: list[PickerPorts], eds_path: str | None) -> PoolRoute:
        """A pool among several: clusters named after it (the controllers' EDS files name
        their cluster after the pool)."""
        return cls(name, pickers, eds_path, cluster=name, picker_cluster=f"{PICKER_CLUSTER}/{name}")


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """HTTPS on the client listener: the PEM certificate chain and key Envoy serves (it reads
    them at start; TLS 1.2 and 1.3, ALPN h2 and http/1.1)."""

    cert_file: Path
    key_file: Path

    def check(self) -> None:
        """ValueError naming what is wrong: a file missing or unreadable, a certificate or key
        that is not PEM, a key that is not the certificate's."""
        try:
            cert, key = self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as exc:
            raise ValueError(f"the listener's TLS files: {exc}") from None
        problem = key_problem(cert, key)
        if problem is not None:
            raise ValueError(
                f"the listener's TLS files {self.cert_file}, {self.key_file}: {problem}"
            )


@dataclass(slots=True)
class EnvoySettings:
    listen_port: int
    admin_port: int
    picker_host: str
    # One endpoint of the ext_proc cluster per picker process: Envoy spreads streams over
    # them and health-checks each on its own gRPC health port.
    pickers: list[PickerPorts]
    picker_tls: bool  # ext_proc over TLS; then picker_ca is required (Envoy verifies it)
    failure_mode: str  # the InferencePool's FailOpen or FailClose
    endpoints: list[tuple[str, int]]
    fallbacks: int = 1
    with_picker: bool = True  # False: plain round robin, the baseline benchmarks compare to
    response_bodies: bool = True  # stream response bodies through the picker
    # False (only with response_bodies False): Envoy sends the picker nothing of the
    # response either; the picker then learns only that the stream ended.
    response_headers: bool = True
    # Set: the pool's endpoints come from this EDS file (the controllers keep it current)
    # instead of the fixed `endpoints`.
    eds_path: str | None = None
    # Set: Envoy authenticates requests (API keys, JWT) before the picker sees them. Unset or
    # not, a client-sent x-infergate-user is removed (stack/auth.py).
    auth: AuthConfig | None = None
    # The CA file that signed the picker's certificate; its SAN must name picker_host.
    picker_ca: str | None = None
    # True (a closed network): client-sent objective and fairness-id headers reach the picker.
    trust_client_headers: bool = False
    # Several pools behind one listener (unset: the one pool of the fields above). With
    # `router`, the body-based router picks among them by x-gateway-model-name.
    pools: list[PoolRoute] | None = None
    router: RouterPorts | None = None

    def routed_pools(self) -> list[PoolRoute]:
        if self.pools is not None:
            return self.pools
        return [PoolRoute("pool", self.pickers, self.eds_path)]

    listen_host: str = "127.0.0.1"  # the client listener's address
    # Set: the client listener speaks HTTPS only, with this certificate.
    listener_tls: ListenerTls | None = None
    # Set: Envoy's OpenTelemetry tracer exports to the OTEL_* variables' collector
    # (stack/envoy_tracing.py).
    tracing: TraceSettings | None = None


def render(settings: EnvoySettings) -> str:
    if settings.failure_mode not in ("FailOpen", "FailClose"):
        raise ValueError(
            f"failure mode must be FailOpen or FailClose, not {settings.failure_mode!r}"
        )
    pools = settings.routed_pools()
    if not pools:
        raise ValueError("Envoy needs at least one pool")
    if not settings.endpoints and any(pool.eds_path is None for pool in pools):
        raise ValueError("the pool has no endpoints to put in the Envoy cluster")
    if settings.with_picker and not all(pool.pickers for pool in pools):
        raise ValueError("the ext_proc cluster needs at least one picker")
    if len(pools) > 1 and settings.router is None:
        raise ValueError("several pools need the body-based router to choose among them")
    if settings.response_bodies and not settings.response_headers:
        raise ValueError("response bodies through the picker need its response headers too")
    if settings.picker_tls and not settings.picker_ca:
        raise ValueError("TLS to the picker needs picker_ca: Envoy verifies its certificate")
    if not is_ip_address(settings.listen_host):
        raise ValueError(f"the listen address must be an IP address, not {settings.listen_host!r}")
    if settings.listener_tls is not None:
        settings.listener_tls.check()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    fields = {name: getattr(settings, name) for name in settings.__slots__}
    fields["pools"] = pools
    fields["bbr"] = settings.router
    fields["model_name_header"] = MODEL_NAME_HEADER
    fields["served_header"] = SERVED_HEADER
    # In single quotes in the YAML, where a quote is written twice.
    fields["no_pool_body"] = json.dumps(NO_POOL_ANSWER).replace("'", "''")
    fields["connect_body"] = json.dumps(CONNECT_ANSWER).replace("'", "''")
    fields["request_filters"] = _as_filter_list(
        http_filters(settings.auth, settings.trust_client_headers)
    )
    fields["picker_san_type"] = _san_type(settings.picker_host)
    fields["retry_on"] = RETRY_ON
    fields["retriable_status_codes"] = _flow(list(RETRIABLE_STATUS_CODES))
    fields["retry_budget"] = _flow(retry_budget())
    trace = settings.tracing
    fields["tracing_block"] = as_yaml({"tracing": tracing_block(trace)}, 10) if trace else ""
    fields["tracing_cluster"] = as_yaml([collector_cluster(trace)], 2) if trace else ""
    return env.from_string(ENVOY_TEMPLATE.read_text()).render(**fields)


def _as_filter_list(filters: list[dict]) -> str:
    """Filters as items of the template's http_filters list (indented to match it)."""
    text = yaml.safe_dump(filters, sort_keys=False, width=float("inf"))
    return "\n".join(" " * 10 + line for line in text.splitlines())


def _flow(value: object) -> str:
    """A value as one line of YAML flow style, for the template."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()


def is_ip_address(host: str) -> bool:
    """Whether `host` is an IP address (Envoy binds a listener to one, never to a name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _san_type(host: str) -> str:
    """How Envoy matches the picker's certificate to the address it dials."""
    return "IP_ADDRESS" if is_ip_address(host) else "DNS"
