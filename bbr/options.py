"""Command-line flags of the body-based router (`infergate bbr`), named like the picker's
where they mean the same (epp/options.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from infergw.api import logs, version
from infergw.api.cli_help import HelpFormatter
from infergw.api.parents import GatewayName, parse_gateway
from infergw.epp.options import add_body_limit_flags, add_serving_flags, duration

# The reference router's ports (gateway-api-inference-extension's body-based routing).
DEFAULT_GRPC_PORT = 9004
DEFAULT_HEALTH_PORT = 9005
DEFAULT_METRICS_PORT = 9090


@dataclass(frozen=True, slots=True)
class BbrOptions:
    host: str
    grpc_port: int
    grpc_health_port: int
    metrics_port: int
    provider: str
    pool_files: tuple[Path, ...]
    namespace: str
    # The Gateway whose EnvoyExtensionPolicy runs this router: ModelRoutes whose parentRefs do
    # not name it, and Models on another Gateway, are not in its table. None: every one.
    gateway: GatewayName | None
    secure_serving: bool
    cert_path: Path | None
    max_body_bytes: int
    max_held_request_bytes: int
    request_body_timeout: float
    pass_bad_bodies: bool
    grace_period: float
    resync: float
    log: logs.LogSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate bbr",
        description="Body-based routing: an Envoy ext_proc server in front of the pickers that "
        "puts the InferencePool serving the body's `model` in x-gateway-model-name.",
        formatter_class=HelpFormatter,
    )
    listening = add_serving_flags(
        p,
        grpc_port=DEFAULT_GRPC_PORT,
        health_port=DEFAULT_HEALTH_PORT,
        metrics_port=DEFAULT_METRICS_PORT,
    )
    pools = p.add_argument_group("Pools, routes and Models")
    pools.add_argument(
        "--provider",
        choices=["file", "kubernetes"],
        default="kubernetes",
        help="where the objects come from: the API server, or --pool-file",
    )
    pools.add_argument(
        "--pool-file",
        dest="pool_files",
        type=Path,
        action="append",
        default=[],
        help="with --provider file: YAML file or directory with the InferencePools, "
        "ModelRoutes, ModelServers and Models (repeatable); reloaded on change",
    )
    pools.add_argument(
        "--namespace", default="default", help="whose InferencePools, routes and Models"
    )
    pools.add_argument(
        "--gateway",
        metavar="[NS/]NAME",
        help="the Gateway this router runs for (NS defaults to --namespace): a ModelRoute "
        "whose parentRefs do not name it, and a Model whose spec.gateway is another, answer "
        "404 here; unset (one Envoy, the local stack): every route and Model counts",
    )
    # The picker's defaults: a body one passes, the other does too.
    bodies = add_body_limit_flags(p)
    bodies.add_argument(
        "--on-bad-body",
        choices=["reject", "pass"],
        default="reject",
        help="a body that is not JSON or names no model: 400 here (reject), or on without "
        "the header (pass: no HTTPRoute matches it, the gateway's catch-all answers)",
    )
    listening.add_argument(
        "--grace-period", type=duration, default=30.0, help="drain on SIGTERM (seconds)"
    )
    pools.add_argument(
        "--resync", type=duration, default=300.0, help="kubernetes: a full list this often"
    )
    logs.add_log_flags(p.add_argument_group("Logging"))
    version.add_version_flag(p)
    return p


def parse_options(argv: list[str] | None = None) -> BbrOptions:
    p = build_parser()
    a = p.parse_args(argv)
    if a.provider == "file" and not a.pool_files:
        p.error("--provider file needs --pool-file")
    for name in ("grpc_port", "grpc_health_port", "metrics_port"):
        if not 0 < getattr(a, name) < 65536:
            p.error(f"--{name.replace('_', '-')} must be a port (1-65535)")
    for name in ("max_body_bytes", "max_held_request_bytes"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.max_held_request_bytes < a.max_body_bytes:
        p.error("--max-held-request-bytes must hold at least one body of --max-body-bytes")
    gateway = None
    if a.gateway is not None:
        try:
            gateway = parse_gateway(a.gateway, a.namespace)
        except ValueError as exc:
            p.error(f"--gateway: {exc}")
    return BbrOptions(
        host=a.host,
        grpc_port=a.grpc_port,
        grpc_health_port=a.grpc_health_port,
        metrics_port=a.metrics_port,
        provider=a.provider,
        pool_files=tuple(a.pool_files),
        namespace=a.namespace,
        gateway=gateway,
        secure_serving=a.secure_serving,
        cert_path=a.cert_path,
        max_body_bytes=a.max_body_bytes,
        max_held_request_bytes=a.max_held_request_bytes,
        request_body_timeout=a.request_body_timeout,
        pass_bad_bodies=a.on_bad_body == "pass",
        grace_period=a.grace_period,
        resync=a.resync,
        log=logs.settings_from_args(a),
    )
