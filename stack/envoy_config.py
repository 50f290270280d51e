"""Render the local Envoy config from gateway-manifests/local/envoy.yaml.j2."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from infergw.api.retries import RETRIABLE_STATUS_CODES, RETRY_ON, retry_budget
from infergw.stack.auth import AuthConfig, http_filters
from infergw.stack.ports import PickerPorts

TEMPLATE = Path(__file__).resolve().parent.parent / "gateway-manifests" / "local" / "envoy.yaml.j2"


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


def render(settings: EnvoySettings) -> str:
    if settings.failure_mode not in ("FailOpen", "FailClose"):
        raise ValueError(
            f"failure mode must be FailOpen or FailClose, not {settings.failure_mode!r}"
        )
    if not settings.endpoints and settings.eds_path is None:
        raise ValueError("the pool has no endpoints to put in the Envoy cluster")
    if settings.with_picker and not settings.pickers:
        raise ValueError("the ext_proc cluster needs at least one picker")
    if settings.picker_tls and not settings.picker_ca:
        raise ValueError("TLS to the picker needs picker_ca: Envoy verifies its certificate")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    fields = {name: getattr(settings, name) for name in settings.__slots__}
    fields["eds_dir"] = str(Path(settings.eds_path).parent) if settings.eds_path else None
    fields["request_filters"] = _as_filter_list(
        http_filters(settings.auth, settings.trust_client_headers)
    )
    fields["picker_san_type"] = _san_type(settings.picker_host)
    fields["retry_on"] = RETRY_ON
    fields["retriable_status_codes"] = _flow(list(RETRIABLE_STATUS_CODES))
    fields["retry_budget"] = _flow(retry_budget())
    return env.from_string(TEMPLATE.read_text()).render(**fields)


def _as_filter_list(filters: list[dict]) -> str:
    """Filters as items of the template's http_filters list (indented to match it)."""
    text = yaml.safe_dump(filters, sort_keys=False, width=float("inf"))
    return "\n".join(" " * 10 + line for line in text.splitlines())


def _flow(value: object) -> str:
    """A value as one line of YAML flow style, for the template."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()


def _san_type(host: str) -> str:
    """How Envoy matches the picker's certificate to the address it dials."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "DNS"
    return "IP_ADDRESS"
