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
DEBUG_VERBOSITY = 4
ZAP_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}


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
    NotApplied("--zap-devel", "log lines are infergate's format (--log-level)"),
    NotApplied("--zap-stacktrace-level", "tracebacks are logged with errors"),
    NotApplied("--zap-time-encoding", "log lines are infergate's format (--log-level)"),
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
        "-v", "--v", dest="ref_v", type=int, default=None, metavar="LEVEL",
        help=f"verbosity: {DEBUG_VERBOSITY} and up logs at debug (unless --log-level is given)",
    )  # fmt: skip
    g.add_argument(
        "--zap-log-level",
        dest="ref_zap_log_level",
        choices=sorted(ZAP_LEVELS),
        default=None,
        help="as --log-level (unless --log-level is given)",
    )
    g.add_argument(
        "--zap-encoder",
        dest="ref_zap_encoder",
        choices=["console", "json"],
        default=None,
        help="accepted; log lines are infergate's text format (json: not yet)",
    )


@dataclass(frozen=True, slots=True)
class ReferenceSettings:
    """What the reference flags asked for, in the picker's terms."""

    warnings: tuple[str, ...]
    log_level: str | None  # from -v / --zap-log-level, when --log-level was not given
    staleness: str | None  # --metrics-staleness-threshold, still a duration string
    drain: str | None  # --drain-timeout, still a duration string


def read_reference_flags(
    p: argparse.ArgumentParser, a: argparse.Namespace, log_level_given: bool
) -> ReferenceSettings:
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
    if a.ref_zap_encoder == "json":
        warnings.append("--zap-encoder=json is not applied: log lines are text")
    level = None
    if not log_level_given:
        if a.ref_zap_log_level is not None:
            level = ZAP_LEVELS[a.ref_zap_log_level]
        elif a.ref_v is not None:
            level = "DEBUG" if a.ref_v >= DEBUG_VERBOSITY else "INFO"
    return ReferenceSettings(
        tuple(warnings), level, a.ref_metrics_staleness_threshold, a.ref_drain_timeout
    )
