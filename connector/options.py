"""The sidecar's command-line flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from infergw.api import logs, version
from infergw.api.cli_help import HelpFormatter
from infergw.api.names import POOL_FILE_ENV

CONNECTORS = ("nixl", "mooncake", "http", "lmcache", "sglang")
# llm-d's sidecar calls the same protocol nixlv2; accept its spelling too.
ALIASES = {"nixlv2": "nixl"}


@dataclass(slots=True)
class ConnectorOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    engine_url: str = "http://127.0.0.1:8200"
    kv_connector: str = "nixl"
    prefill_retries: int = 2
    retry_backoff: float = 0.05
    connect_timeout: float = 5.0
    prefill_timeout: float = 60.0
    decode_timeout: float = 600.0
    sglang_bootstrap_port: int = 8998
    local_prefill_fallback: bool = True
    pool_name: str | None = None
    pool_namespace: str = "default"
    pool_file: str | None = None
    prefiller_grace: float = 10.0
    log_format: str | None = None  # api/logs.py: None is the environment's default
    log_level: str | None = None
    verbosity: int | None = None

    def __post_init__(self) -> None:
        self.kv_connector = ALIASES.get(self.kv_connector, self.kv_connector)
        if self.kv_connector not in CONNECTORS:
            raise ValueError(f"kv connector must be one of {', '.join(CONNECTORS)}")
        if not self.engine_url.startswith(("http://", "https://")):
            raise ValueError(f"engine URL must start with http:// or https://: {self.engine_url}")
        self.engine_url = self.engine_url.rstrip("/")
        if self.prefill_retries < 0:
            raise ValueError("prefill retries must be >= 0")
        for name in ("connect_timeout", "prefill_timeout", "decode_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0")
        if not 0 <= self.prefiller_grace < float("inf"):
            raise ValueError("prefiller-grace must be a number of seconds >= 0")
        if self.pool_name is not None and not self.pool_name:
            raise ValueError("pool-name must not be empty")


def build_parser() -> argparse.ArgumentParser:
    d = ConnectorOptions()
    p = argparse.ArgumentParser(
        prog="infergate connector",
        description="Connector sidecar for a decode pod: passes requests to the local engine, "
        "or runs prefill on the pod named in x-prefiller-host-port (only a prefill pod of "
        "--pool-name) and decode locally.",
        formatter_class=HelpFormatter,
    )
    listening = p.add_argument_group("Listening")
    engine = p.add_argument_group("Engine and KV connector")
    prefill = p.add_argument_group("Prefill leg")
    pool = p.add_argument_group("Pool and pods (which prefill pods may be called)")
    logging_group = p.add_argument_group("Logging")
    listening.add_argument("--host", default=d.host, help=f"listen address (default {d.host})")
    listening.add_argument(
        "--port", type=int, default=d.port, help=f"listen port (default {d.port})"
    )
    engine.add_argument(
        "--engine-url",
        default=d.engine_url,
        help=f"the local engine (decode leg and passthrough; default {d.engine_url})",
    )
    engine.add_argument(
        "--kv-connector",
        default=d.kv_connector,
        choices=[*CONNECTORS, *ALIASES],
        help="how prefill and decode legs are rewritten (default nixl)",
    )
    prefill.add_argument(
        "--prefill-retries",
        type=int,
        default=d.prefill_retries,
        help="extra prefill attempts after the first, each on the next prefiller of the "
        "header, wrapping round (on 502/503/504, connection errors and timeouts; a prefiller "
        "that could not be connected to is not tried again; default "
        f"{d.prefill_retries})",
    )
    prefill.add_argument(
        "--retry-backoff",
        type=float,
        default=d.retry_backoff,
        help=f"seconds to wait before going round the prefillers again (default {d.retry_backoff})",
    )
    prefill.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout,
        help=f"seconds to open a connection to any upstream (default {d.connect_timeout})",
    )
    prefill.add_argument(
        "--prefill-timeout",
        type=float,
        default=d.prefill_timeout,
        help="seconds for the whole prefill leg, every attempt and backoff included "
        f"(default {d.prefill_timeout})",
    )
    engine.add_argument(
        "--decode-timeout",
        type=float,
        default=d.decode_timeout,
        help="seconds the local engine may stay silent: before its headers and between two "
        f"reads of its body (default {d.decode_timeout})",
    )
    engine.add_argument(
        "--sglang-bootstrap-port",
        type=int,
        default=d.sglang_bootstrap_port,
        help=f"the prefill pods' SGLang bootstrap port (default {d.sglang_bootstrap_port})",
    )
    prefill.add_argument(
        "--local-prefill-fallback",
        action=argparse.BooleanOptionalAction,
        default=d.local_prefill_fallback,
        help="when every prefill attempt failed to connect, lost its connection or got "
        "502/503/504, serve the request on the local engine, which then prefills it itself "
        "(nothing has been sent to the client yet); --no-local-prefill-fallback answers "
        "502/503 instead (default on; nixl, mooncake, http and lmcache: an SGLang decode "
        "server cannot serve a request without its prefill peer)",
    )
    pool.add_argument(
        "--pool-name",
        default=d.pool_name,
        help="the InferencePool whose prefill pods (role label prefill or both, ready) are the "
        "only prefillers this sidecar calls; a request naming any other in "
        "x-prefiller-host-port gets 403 and nothing is sent. Without it every such request "
        "gets 403",
    )
    pool.add_argument(
        "--pool-namespace",
        default=d.pool_namespace,
        help=f"the pool's namespace (default {d.pool_namespace})",
    )
    pool.add_argument(
        "--pool-file",
        default=os.environ.get(POOL_FILE_ENV) or d.pool_file,
        help="read the pool and its pods from this file (the picker's file provider; default "
        f"${POOL_FILE_ENV}, which the local stack sets) instead of the Kubernetes API",
    )
    pool.add_argument(
        "--prefiller-grace",
        type=float,
        default=d.prefiller_grace,
        help="seconds a prefill pod that left the pool stays allowed, so a request the picker "
        "sent it before noticing fails over as for an unreachable prefiller instead of being "
        f"refused (default {d.prefiller_grace:g})",
    )
    logs.add_log_flags(logging_group)
    version.add_version_flag(p)
    return p


def parse_options(argv: list[str] | None = None) -> ConnectorOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ConnectorOptions(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
