"""The picker's start-up steps (epp/app.py) in-process: the KV cache is built only for a
config that needs it and reaches its plugin, the P/D handler counts in the picker's metrics,
a config mistake stops start-up before the provider runs, the servers answer and stop, and
the HTTP port serves the route groups its flags ask for. Everything listens on 127.0.0.1 and
is stopped by the test."""

from __future__ import annotations

import aiohttp
import pytest

from infergw.epp.app import build_picker, drain_and_stop, start_servers, stop_picker
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore
from infergw.epp.http_server import make_app
from infergw.epp.metrics import PickerMetrics
from infergw.epp.options import parse_options
from infergw.epp.request import parse_request
from infergw.epp.scheduling.config import ConfigError
from infergw.epp.scheduling.plugins.precise_prefix_cache import PrecisePrefixCacheScorer
from tests.conftest import free_port
from tests.default_ports import ports_free
from tests.director_fixtures import HEAD, PRECISE
from tests.picker_fixtures import pool_yaml

PD = (
    HEAD
    + """\
plugins:
- {type: pd-profile-handler, parameters: {nonCachedTokens: 1}}
- type: decode-filter
- type: prefill-filter
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""
)


def options(tmp_path, config: str | None, *, pool: bool = True, kv_port: int | None = None):
    pool_file = tmp_path / "pool.yaml"
    if pool:
        pool_file.write_text(pool_yaml([free_port()]))
    argv = [
        "--host=127.0.0.1",
        f"--grpc-port={free_port()}",
        f"--grpc-health-port={free_port()}",
        f"--metrics-port={free_port()}",
        "--secure-serving=false",
        "--provider=file",
        f"--pool-file={pool_file}",
        "--pool-name=pool",
        "--grace-period=0",
        f"--kv-events-bind=tcp://127.0.0.1:{kv_port or free_port()}",
    ]
    if config is not None:
        argv.append(f"--config-text={config}")
    return parse_options(argv)


async def test_no_kv_cache_unless_a_plugin_type_needs_it(tmp_path):
    picker = await build_picker(options(tmp_path, None))
    try:
        assert picker.view is None
        assert picker.datastore.synced and len(picker.datastore.endpoints()) == 1
    finally:
        await stop_picker(picker)


async def test_the_kv_cache_is_built_started_and_handed_to_its_plugin(tmp_path):
    kv_port = free_port()
    picker = await build_picker(options(tmp_path, PRECISE, kv_port=kv_port))
    try:
        assert picker.view is not None
        scorer = picker.scheduling.plugins["precise-prefix-cache-scorer"]
        assert isinstance(scorer, PrecisePrefixCacheScorer) and scorer.kv is picker.view.cache
        assert not ports_free([kv_port])  # central mode: the subscriber is bound
    finally:
        await stop_picker(picker)
    assert ports_free([kv_port])


async def test_the_scraper_paces_under_its_staleness_and_exports_its_cpu(tmp_path):
    picker = await build_picker(options(tmp_path, None))
    try:
        # 250 ms asked by default, kept one 50 ms interval under the 250 ms after which the
        # picker's numbers are stale; flow control, off here, bounds nothing.
        assert picker.scraper.pace.quiet_interval == pytest.approx(0.2)
        assert not picker.scraper.held()  # no flow-control queue configured: nothing held
        cpu = picker.metrics.registry.get_sample_value(
            "infergate_epp_scrape_cpu_seconds_total", {"part": "fetch"}
        )
        assert cpu is not None and cpu >= 0
    finally:
        await stop_picker(picker)


async def test_with_a_flow_control_queue_the_scraper_knows_when_requests_are_held(tmp_path):
    """The quiet pace gives way while requests wait in flow control (epp/scrape_pace.py):
    the scraper reads the queue's count, which was once called as a method (a TypeError on
    every manager tick, and queued requests never released)."""
    config = PRECISE + "flowControl:\n  maxRequests: 4\n"
    picker = await build_picker(options(tmp_path, config))
    try:
        assert picker.gate.queue is not None
        assert picker.scraper.held() is False
        # Flow control reads the numbers: the quiet pace stays one interval under its 200 ms.
        assert picker.scraper.pace.quiet_interval == pytest.approx(0.15)
    finally:
        await stop_picker(picker)


async def test_the_pd_handler_counts_in_the_pickers_metrics(tmp_path):
    picker = await build_picker(options(tmp_path, PD))
    try:
        body = b'{"model": "m", "prompt": "a prompt the decode pod has never seen"}'
        r = parse_request("/v1/completions", body, {}, max_body_bytes=1 << 20)
        targets = await picker.director.handle(RequestContext(r))
        assert [e.address for e in targets] == [picker.datastore.endpoints()[0].address]
        sample = picker.metrics.registry.get_sample_value(
            "infergate_epp_pd_decisions_total", {"outcome": "no_prefill_pod"}
        )
        assert sample == 1.0
    finally:
        await stop_picker(picker)


async def test_a_plugin_mistake_stops_start_up_before_the_provider_and_kv_cache(tmp_path):
    kv_port = free_port()
    bad = PRECISE.replace(
        "- type: precise-prefix-cache-scorer\n",
        "- {type: precise-prefix-cache-scorer, parameters: {speculativeIndexing: 3}}\n",
    )
    # No pool file: had the provider started, it would have failed differently.
    with pytest.raises(ConfigError, match="speculativeIndexing"):
        await build_picker(options(tmp_path, bad, pool=False, kv_port=kv_port))
    assert ports_free([kv_port])


async def test_the_servers_answer_and_stop(tmp_path):
    opts = options(tmp_path, None)
    picker = await build_picker(opts)
    servers = await start_servers(opts, picker)
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{opts.metrics_port}"
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{base}/metrics") as r:
                assert "inference_extension_info" in await r.text()
            async with http.get(f"{base}/debug/endpoints") as r:
                assert r.status == 404  # debug pages are off unless asked for
        assert not ports_free([opts.grpc_port]) and not ports_free([opts.grpc_health_port])
    finally:
        await drain_and_stop(opts, picker, servers)
    assert servers.gauges.cancelled() or servers.gauges.done()
    for port in (opts.grpc_port, opts.grpc_health_port, opts.metrics_port):
        assert ports_free([port])


# ---- the HTTP port's route groups ----------------------------------------------------------

BASE = {"/metrics", "/healthz"}
DEBUG = {"/debug/prefix-scores", "/debug/pd", "/debug/endpoints"}
HOOKS = {"/debug/kv-events/drop"}


@pytest.mark.parametrize(
    ("debug", "hooks", "with_view", "expected"),
    [
        (False, False, False, BASE),
        (False, True, True, BASE),  # hooks only beside the debug pages
        (True, False, True, BASE | DEBUG),
        (True, True, False, BASE | DEBUG),  # no KV cache: nothing to drop
        (True, True, True, BASE | DEBUG | HOOKS),
    ],
)
def test_make_app_serves_the_groups_its_flags_ask_for(
    monkeypatch, debug, hooks, with_view, expected
):
    monkeypatch.setenv("INFERGATE_TEST_HOOKS", "1" if hooks else "0")
    view = object() if with_view else None  # only whether there is one counts here
    app = make_app(Datastore(), PickerMetrics(), None, view, debug=debug)
    assert {r.resource.canonical for r in app.router.routes()} == expected


@pytest.mark.parametrize(
    ("bind", "warned"),
    [("tcp://*:{port}", True), ("tcp://0.0.0.0:{port}", True), ("tcp://127.0.0.1:{port}", False)],
)
def test_a_wildcard_replica_sync_bind_is_warned_about(bind, warned, caplog):
    """Peers name a replica by its bind; a wildcard names nobody, so nothing is shared."""
    from infergw.epp.app import build_replica_members, build_replica_sync

    opts = parse_options(
        [
            "--provider=file",
            "--pool-file=x.yaml",
            "--pool-name=pool",
            f"--replica-sync-bind={bind.format(port=9)}",
        ]
    )
    assert opts.share_scrapes  # on by default with a replica sync
    ds, metrics = Datastore(), PickerMetrics()
    replicas = build_replica_sync(opts, ds, metrics)
    assert replicas is not None
    with caplog.at_level("WARNING", logger="epp"):
        assert build_replica_members(opts, replicas, metrics) is not None
    assert ("is a wildcard" in caplog.text) is warned


def test_share_scrapes_needs_a_replica_sync_and_can_be_turned_off():
    with pytest.raises(SystemExit):
        parse_options(
            ["--provider=file", "--pool-file=x.yaml", "--pool-name=pool", "--share-scrapes"]
        )
    off = parse_options(
        [
            "--provider=file",
            "--pool-file=x.yaml",
            "--pool-name=pool",
            "--replica-sync-bind=tcp://127.0.0.1:9",
            "--no-share-scrapes",
        ]
    )
    assert not off.share_scrapes
    assert not parse_options(
        ["--provider=file", "--pool-file=x.yaml", "--pool-name=pool"]
    ).share_scrapes
