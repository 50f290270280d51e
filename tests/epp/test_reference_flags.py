"""epp/reference_flags.py: the reference picker's flags, as its charts pass them, start our
picker — meant ones mapped onto ours, the rest said aloud at start or refused with what to do."""

from __future__ import annotations

import pytest

from infergw.epp.options import parse_options
from infergw.epp.reference_flags import IGNORED_VALUES, REFUSED, SWITCHES

BASE = ["--provider=file", "--pool-file=x.yaml", "--pool-name=pool"]

# What the reference's InferencePool chart renders for its EPP container (v1.x), ours aside.
CHART_ARGS = [
    "--pool-name=pool",
    "--pool-namespace=default",
    "--pool-group=inference.networking.k8s.io",
    "--zap-encoder=json",
    "--config-file=/config/default-plugins.yaml",
    "--tracing=false",
    "--v=3",
    "--metrics-endpoint-auth=true",
    "--ha-enable-leader-election",
    "--enable-pprof=true",
    "--model-server-metrics-path=/metrics",
    "--model-server-metrics-scheme=http",
    "--model-server-metrics-https-insecure-skip-verify",
    "--refresh-prometheus-metrics-interval=5s",
    "--metrics-staleness-threshold=2s",
    "--drain-timeout=30s",
]


def test_the_reference_charts_args_start_the_picker_and_each_unapplied_one_is_said():
    opts = parse_options(["--provider=file", "--pool-file=x.yaml", *CHART_ARGS])
    assert opts.pool_name == "pool" and str(opts.config_file) == "/config/default-plugins.yaml"
    assert opts.metrics_staleness_threshold == 2.0  # meant: the scraper's staleness bound
    assert opts.grace_period == 30.0  # meant: the drain window
    assert (opts.log.level, opts.log.libraries_level) == ("INFO", "INFO")  # -v 3: verbose
    assert opts.log.format == "json"  # --zap-encoder=json
    said = "\n".join(opts.reference_warnings)
    for flag in (
        "--metrics-endpoint-auth",
        "--ha-enable-leader-election",
        "--enable-pprof",
        "--model-server-metrics-path",
        "--model-server-metrics-https-insecure-skip-verify",
        "--refresh-prometheus-metrics-interval",
    ):
        assert flag in said, flag
    assert "--tracing" not in said  # it was turned off: nothing is missing


@pytest.mark.parametrize("flag", [s.flag for s in SWITCHES])
def test_a_switch_turned_on_is_said_and_off_is_not(flag):
    assert any(flag in w for w in parse_options([*BASE, flag]).reference_warnings)
    assert not parse_options([*BASE, f"{flag}=false"]).reference_warnings


@pytest.mark.parametrize("flag", [s.flag for s in IGNORED_VALUES])
def test_a_valued_flag_not_applied_is_said_with_its_value(flag):
    (warning,) = parse_options([*BASE, f"{flag}=x1"]).reference_warnings
    assert warning.startswith(f"{flag}=x1 is accepted and not applied")


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_a_flag_that_would_mislead_is_refused_with_what_to_do(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options([*BASE, f"{flag}=x"])
    assert exit_info.value.code == 2
    assert f"{flag} is not supported: {REFUSED[flag]}" in capsys.readouterr().err


def test_another_pool_group_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_options([*BASE, "--pool-group=inference.networking.x-k8s.io"])
    assert "move the pool to that group" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "ours", "libraries"),
    [
        (["-v", "4"], "DEBUG", "INFO"),  # the reference's debug: our -v
        (["--v=5"], "DEBUG", "DEBUG"),  # its trace: our -vv
        (["--v=2"], "INFO", "INFO"),
        (["-v"], "DEBUG", "INFO"),  # ours
        (["-vv"], "DEBUG", "DEBUG"),
        (["-vvv"], "DEBUG", "DEBUG"),
        (["--zap-log-level=error"], "ERROR", "ERROR"),
        (["--zap-log-level=debug"], "DEBUG", "DEBUG"),
        (["--zap-log-level=4"], "DEBUG", "INFO"),  # zap's number: as -v=N
        (["--zap-log-level=panic"], "CRITICAL", "CRITICAL"),
        (["--v=5", "--log-level=warning"], "WARNING", "WARNING"),  # our own flag wins
        (["--log-level=error", "--zap-log-level=debug"], "ERROR", "ERROR"),
    ],
)
def test_verbosity_maps_onto_the_log_level_unless_log_level_is_given(
    args, ours, libraries, monkeypatch
):
    monkeypatch.delenv("INFERGATE_VERBOSITY", raising=False)
    monkeypatch.delenv("INFERGATE_LOG_LEVEL", raising=False)
    log = parse_options([*BASE, *args]).log
    assert (log.level, log.libraries_level) == (ours, libraries)


@pytest.mark.parametrize(
    ("args", "fmt"),
    [
        (["--zap-encoder=json"], "json"),
        (["--zap-encoder=console"], "text"),
        (["--zap-encoder=json", "--log-format=text"], "text"),  # our own flag wins
        (["--log-format=json"], "json"),
    ],
)
def test_the_zap_encoder_maps_onto_the_log_format(args, fmt, monkeypatch):
    monkeypatch.delenv("INFERGATE_LOG_FORMAT", raising=False)
    assert parse_options([*BASE, *args]).log.format == fmt


@pytest.mark.parametrize("bad", ["-v=lots", "--v=x", "--zap-log-level=chatty", "--zap-log-level=0"])
def test_a_level_neither_knows_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options([*BASE, bad])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "bad",
    ["--metrics-staleness-threshold=0s", "--metrics-staleness-threshold=soon", "--drain-timeout=x"],
)
def test_bad_durations_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_options([*BASE, bad])


async def test_the_staleness_threshold_reaches_the_scraper(tmp_path):
    from infergw.epp.app import start_scraper
    from infergw.epp.datastore import Datastore
    from infergw.epp.gatekeeper import Gatekeeper
    from infergw.epp.metrics import PickerMetrics

    opts = parse_options([*BASE, "--metrics-staleness-threshold=1500ms"])
    metrics = PickerMetrics()
    scraper = await start_scraper(opts, Datastore(), metrics, Gatekeeper(metrics.registry))
    try:
        assert scraper.stale_after == 1.5
    finally:
        await scraper.stop()


def test_tracing_is_meant_it_turns_on_the_pickers_tracing():
    """--tracing (README: Tracing): on with the reference's defaults unless OTEL_* say more."""
    assert parse_options([*BASE, "--tracing"]).tracing is True
    assert parse_options([*BASE, "--tracing=true"]).reference_warnings == ()
    assert parse_options([*BASE, "--tracing=false"]).tracing is False
    assert parse_options(BASE).tracing is False
