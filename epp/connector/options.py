"""The sidecar's command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

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
    log_level: str = "info"

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


def build_parser() -> argparse.ArgumentParser:
    d = ConnectorOptions()
    p = argparse.ArgumentParser(
        prog="infergate connector",
        description="Connector sidecar for a decode pod: passes requests to the local engine, "
        "or runs prefill on the pod named in x-prefiller-host-port and decode locally.",
    )
    p.add_argument("--host", default=d.host, help=f"listen address (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"listen port (default {d.port})")
    p.add_argument(
        "--engine-url",
        default=d.engine_url,
        help=f"the local engine (decode leg and passthrough; default {d.engine_url})",
    )
    p.add_argument(
        "--kv-connector",
        default=d.kv_connector,
        choices=[*CONNECTORS, *ALIASES],
        help="how prefill and decode legs are rewritten (default nixl)",
    )
    p.add_argument(
        "--prefill-retries",
        type=int,
        default=d.prefill_retries,
        help="extra prefill attempts after the first, each on the next prefiller of the "
        "header, wrapping round (on 502/503/504, connection errors and timeouts; default "
        f"{d.prefill_retries})",
    )
    p.add_argument(
        "--retry-backoff",
        type=float,
        default=d.retry_backoff,
        help=f"seconds to wait before going round the prefillers again (default {d.retry_backoff})",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout,
        help=f"seconds to open a connection to any upstream (default {d.connect_timeout})",
    )
    p.add_argument(
        "--prefill-timeout",
        type=float,
        default=d.prefill_timeout,
        help=f"seconds for one whole prefill attempt (default {d.prefill_timeout})",
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=d.decode_timeout,
        help="seconds the local engine may stay silent: before its headers and between two "
        f"reads of its body (default {d.decode_timeout})",
    )
    p.add_argument(
        "--sglang-bootstrap-port",
        type=int,
        default=d.sglang_bootstrap_port,
        help=f"the prefill pods' SGLang bootstrap port (default {d.sglang_bootstrap_port})",
    )
    p.add_argument(
        "--local-prefill-fallback",
        action=argparse.BooleanOptionalAction,
        default=d.local_prefill_fallback,
        help="when every prefill attempt failed to connect, lost its connection or got "
        "502/503/504, serve the request on the local engine, which then prefills it itself "
        "(nothing has been sent to the client yet); --no-local-prefill-fallback answers "
        "502/503 instead (default on; nixl, mooncake, http and lmcache: an SGLang decode "
        "server cannot serve a request without its prefill peer)",
    )
    p.add_argument("--log-level", default=d.log_level, help="debug, info, warning, error")
    return p


def parse_options(argv: list[str] | None = None) -> ConnectorOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ConnectorOptions(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
