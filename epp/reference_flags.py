"""The reference picker's flags (the Gateway API Inference Extension's EPP, now llm-d's router),
as its Helm charts and manifests pass them, so that a Deployment written for it starts ours.

Each flag is one of three kinds: **meant** — infergate does the same thing (mapped onto its own
option); **not applied** — accepted, and the picker says at start what it does instead (a
warning: the operator asked for something that will not happen); **refused** — accepting
would route wrongly or silently drop a setting the reference itself refuses (an error that
says what to do). Flags both pickers spell alike (`--pool-name`, `--grpc-port`,
`--secure-serving`, `--config-file`, …) are the picker's own and not listed here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from infergw.api.upstream import POOL_GROUP_VERSION

INFERENCE_POOL_GROUP = POOL_GROUP_VERSION.partition("/")[0]

# The reference's `-v` levels (its logging package): 1-2 default, 3 verbose, 4 debug, 5 trace.
# Ours are counts (api/logs.py): 4 is our -v (our loggers at debug), 5 and up our -vv.
DEBUG_VERBOSITY = 4
TRACE_VERBOSITY = 5
ZAP_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "error": "ERROR",
    "dpanic": "CRITICAL",
    "panic": "CRITICAL",
    "fatal": "CRITICAL",
}
ZAP_ENCODERS = {"json": "json", "console": "text"}


@dataclass(frozen=True, slots=True)
class Verbosity:
    """What a `-v` on the picker's command line said: the reference's `-v N` / `--v=N`, or our
    own bare `-v` / `-vv` (a count)."""

    count: int  # ours: 0, 1 (-v) or 2 (-vv and more)

    @classmethod
    def parse(cls, text: str) -> Verbosity:
        """argparse `type`: `-vv` reaches it as "v", `-v=4` as "4"."""
        value = text.strip()
        if value and set(value) == {"v"}:
            return cls(min(len(value) + 1, 2))
        try:
            level = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"-v takes a number (the reference's verbosity) or is repeated (-vv): {text!r}"
            ) from None
        return cls(2 if level >= TRACE_VERBOSITY else 1 if level >= DEBUG_VERBOSITY else 0)


@dataclass(frozen=True, slots=True)
class NotApplied:
    flag: str
    instead: str  # what the picker does instead, for the start-up warning


# Switches a chart sets to true, with what infergate does in their place.
SWITCHES = (
    NotApplied(
        "--ha-enable-leader-election",
        "every replica serves and reports ready (active-active, README 'Several pickers')",
    ),
    NotApplied(
        "--metrics-endpoint-auth",
        "/metrics is served without authentication: restrict who reaches the port with a "
        "NetworkPolicy (gateway-manifests/network-policies.yaml)",
    ),
    NotApplied("--enable-pprof", "no pprof handlers (py-spy profiles the picker from outside)"),
    NotApplied("--enable-cert-reload", "the certificate in --cert-path is read once, at start"),
)
TRACING_FLAG = "--tracing"
# Valued flags accepted and not applied.
IGNORED_VALUES = (
    NotApplied(
        "--model-server-metrics-path",
        "each pod is scraped where its engine type serves metrics (api/engines.py)",
    ),
    NotApplied(
        "--model-server-metrics-scheme",
        "each pod is scraped where its engine type serves metrics (api/engines.py)",
    ),
    NotApplied(
        "--model-server-metrics-port",
        "each pod is scraped on its pool target port",
    ),
    NotApplied(
        "--model-server-metrics-https-insecure-skip-verify",
        "each pod is scraped where its engine type serves metrics (api/engines.py)",
    ),
    NotApplied(
        "--refresh-prometheus-metrics-interval",
        "the picker's own metrics are computed when /metrics is read",
    ),
    NotApplied("--grpc-max-recv-msg-size", "request bodies are bounded by --max-body-bytes"),
    NotApplied("--zap-devel", "log lines are infergate's format (--log-format, --log-level)"),
    NotApplied("--zap-stacktrace-level", "tracebacks are logged with errors"),
    NotApplied("--zap-time-encoding", "log lines' time is RFC 3339 in UTC (api/log_format.py)"),
)
# Flags whose setting the reference itself refuses today, or a mode infergate has not.
REFUSED = {
    "--total-queued-requests-metric": "metric names come from each pod's engine type",
    "--total-running-requests-metric": "metric names come from each pod's engine type",
    "--kv-cache-usage-percentage-metric": "metric names come from each pod's engine type",
    "--lora-info-metric": "metric names come from each pod's engine type",
    "--cache-info-metric": "metric names come from each pod's engine type",
    "--endpoint-selector": "infergate serves an InferencePool: give --pool-name",
    "--endpoint-target-ports": "infergate serves an InferencePool: give --pool-name",
}


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _dest(flag: str) -> str:
    return "ref_" + flag.removeprefix("--").replace("-", "_")


def add_reference_flags(p: argparse.ArgumentParser) -> None:
    """The reference picker's flags, in a group of their own in --help."""
    g = p.add_argument_group(
        "flags of the reference picker (its charts pass them; see epp/reference_flags.py)"
    )
    g.add_argument(
        "--pool-group",
        default=INFERENCE_POOL_GROUP,
        help=f"the InferencePool's API group: {INFERENCE_POOL_GROUP} only",
    )
    for s in SWITCHES:
        g.add_argument(
            s.flag, dest=_dest(s.flag), type=_switch, nargs="?", const=True, default=False,
            help=f"accepted; {s.instead}",
        )  # fmt: skip
    # Meant: the reference's tracing switch, on api/tracing.py (its defaults when no OTEL_*
    # variable says otherwise: OTLP gRPC to localhost:4317, a tenth of new traces).
    g.add_argument(
        TRACING_FLAG, dest=_dest(TRACING_FLAG), type=_switch, nargs="?", const=True,
        default=False, help="export traces over OTLP as the OTEL_* variables say (README: Tracing)",
    )  # fmt: skip
    # nargs="?": some are switches in the reference (--zap-devel), given bare.
    for s in IGNORED_VALUES:
        g.add_argument(
            s.flag, dest=_dest(s.flag), nargs="?", const="true", default=None, metavar="VALUE",
            help=f"accepted; {s.instead}",
        )  # fmt: skip
    for flag, why in REFUSED.items():
        g.add_argument(flag, dest=_dest(flag), metavar="VALUE", help=f"refused: {why}")
    g.add_argument(
        "--metrics-staleness-threshold",
        dest="ref_metrics_staleness_threshold",
        default=None,
        metavar="DURATION",
        help="metrics older than this make a pod stale (scored as saturated); default "
        "max(0.2 s, 5 × --refresh-metrics-interval)",
    )
    g.add_argument(
        "--drain-timeout",
        dest="ref_drain_timeout",
        default=None,
        metavar="DURATION",
        help="as --grace-period",
    )
    g.add_argument(
        "--health-checking",
        dest="ref_health_checking",
        type=_switch,
        nargs="?",
        const=True,
        default=True,
        help="accepted; the gRPC health service is always served",
    )
    g.add_argument(
        "-v", "--v", dest="ref_v", type=Verbosity.parse, nargs="?", const=Verbosity(1),
        default=None, metavar="LEVEL",
        help=f"the reference's verbosity -v=N ({DEBUG_VERBOSITY}: our -v, {TRACE_VERBOSITY} and "
        "up: -vv), or ours: -v our log lines at debug, -vv every library's too "
        "(unless --log-level is given)",
    )  # fmt: skip
    g.add_argument(
        "--zap-log-level",
        dest="ref_zap_log_level",
        type=_zap_level,
        default=None,
        help="as --log-level (debug, info, warn, error, panic), or a number as -v=N "
        "(unless --log-level is given)",
    )
    g.add_argument(
        "--zap-encoder",
        dest="ref_zap_encoder",
        choices=sorted(ZAP_ENCODERS),
        default=None,
        help="as --log-format: json, or console (text) (unless --log-format is given)",
    )


def _zap_level(text: str) -> str | Verbosity:
    """zap's level: a name, or a number > 0 for its levels of increasing verbosity."""
    value = text.strip().lower()
    if value in ZAP_LEVELS:
        return ZAP_LEVELS[value]
    if value.isdigit() and int(value) > 0:
        return Verbosity.parse(value)
    raise argparse.ArgumentTypeError(
        f"unknown zap level {text!r} (one of: {', '.join(ZAP_LEVELS)}, or a number > 0)"
    )


@dataclass(frozen=True, slots=True)
class ReferenceSettings:
    """What the reference flags asked for, in the picker's terms."""

    warnings: tuple[str, ...]
    log_level: str | None  # --zap-log-level's name, as --log-level
    verbosity: int | None  # -v / --v / --zap-log-level=N, as our -v count
    log_format: str | None  # --zap-encoder, as --log-format
    staleness: str | None  # --metrics-staleness-threshold, still a duration string
    drain: str | None  # --drain-timeout, still a duration string


def read_reference_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> ReferenceSettings:
    """Refuse what must be refused (p.error), and say what is not applied."""
    if a.pool_group != INFERENCE_POOL_GROUP:
        p.error(
            f"--pool-group {a.pool_group!r}: infergate reads InferencePools of "
            f"{INFERENCE_POOL_GROUP}/v1 only; move the pool to that group"
        )
    for flag, why in REFUSED.items():
        if getattr(a, _dest(flag)) is not None:
            p.error(f"{flag} is not supported: {why}")
    warnings = [
        f"{s.flag} is accepted and not applied: {s.instead}"
        for s in SWITCHES
        if getattr(a, _dest(s.flag))
    ]
    warnings += [
        f"{s.flag}={getattr(a, _dest(s.flag))} is accepted and not applied: {s.instead}"
        for s in IGNORED_VALUES
        if getattr(a, _dest(s.flag)) is not None
    ]
    if not a.ref_health_checking:
        warnings.append("--health-checking=false is not applied: health is always served")
    zap_level = a.ref_zap_log_level
    verbosity = a.ref_v.count if a.ref_v is not None else None
    if isinstance(zap_level, Verbosity):
        verbosity, zap_level = max(verbosity or 0, zap_level.count), None
    return ReferenceSettings(
        tuple(warnings),
        zap_level,
        verbosity,
        ZAP_ENCODERS[a.ref_zap_encoder] if a.ref_zap_encoder else None,
        a.ref_metrics_staleness_threshold,
        a.ref_drain_timeout,
    )
