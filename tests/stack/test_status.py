"""`infergate status` (stack/status_screen.py, stack/status_sources.py): what it reads is
untrusted — pages over a limit, malformed metrics, debug pages of the wrong shape, values
that are not finite numbers — and comes out as `?`, never a traceback; an unreachable
picker is named and `--once` exits 1; a cluster namespace's objects read through the
emulator; and against a real local stack (slow), the pods behind the picker and the request
just sent."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

import pytest
import requests
from kubernetes import client

from infergw.cluster.kube_store import KubeStore
from infergw.stack import status_cluster, status_screen, status_sources
from infergw.stack.status_sources import (
    CACHED_TOKENS,
    ERRORS,
    INPUT_TOKENS,
    REQUESTS,
    parse_metrics,
    pod_rows,
    read_picker,
    recent_warnings,
)
from tests.conftest import free_port
from tests.fetch.hub_mirror import serve
from tests.kube_crd import DEFAULT_CRDS
from tests.kube_objects import pod, pool
from tests.kubeapi import KubeAPIEmulator

METRICS = f"""# HELP inference_objective_request_total Counter of inference objective requests.
# TYPE inference_objective_request_total counter
{REQUESTS}{{model_name="m",target_model_name="m"}} 7
{ERRORS}{{model_name="m",target_model_name="m",error_code="429"}} 2
{ERRORS}{{model_name="m",target_model_name="m",error_code="503"}} 1
{INPUT_TOKENS}{{model_name="m",target_model_name="m"}} 400
{CACHED_TOKENS}{{model_name="m",target_model_name="m"}} 100
infergate_epp_flow_control_queue_size 3
""".encode()
ENDPOINTS = json.dumps(
    {
        "pool": {"name": "vllm-pool"},
        "endpoints": [
            {
                "name": "pod-0",
                "address": "127.0.0.2:8000",
                "reachable": True,
                "running": 2,
                "waiting": 1,
                "kv_usage": 0.25,
                "inflight_requests": 3,
                "engine": "vllm",
            },
        ],
    }
).encode()


@contextmanager
def serving(pages: dict[str, bytes]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering each path with its page (else 404)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")  # a reader stopping at its limit: serve() expects it

        def log_message(self, *args) -> None:
            pass

    with serve(Handler) as url:
        yield url


def test_a_picker_s_pages_become_its_view() -> None:
    with serving({"/metrics": METRICS, "/debug/endpoints": ENDPOINTS}) as url:
        view = read_picker(url)
    assert view.error is None and view.pool == "vllm-pool"
    assert view.samples.get(REQUESTS) == 7 and view.samples.get(ERRORS) == 3
    assert view.samples.errors_by_code == {"429": 2, "503": 1}
    assert view.cached_share == 0.25
    [pod] = view.pods
    assert (pod.running, pod.waiting, pod.inflight, pod.kv_usage) == (2, 1, 3, 0.25)


def test_once_prints_the_screen_as_text(capsys) -> None:
    with serving({"/metrics": METRICS, "/debug/endpoints": ENDPOINTS}) as url:
        assert status_screen.main(["--once", "--picker", url]) == 0
    out = capsys.readouterr().out
    assert "pool vllm-pool" in out and "pod-0" in out
    assert "cached-token share 25%" in out and "flow-control queue 3" in out
    assert "429: 2" in out


HOSTILE_ENDPOINTS = [
    b"not json",
    b"[1, 2, 3]",
    json.dumps({"endpoints": "many"}).encode(),
    json.dumps(
        {
            "pool": "x",
            "endpoints": [
                7,
                None,
                {
                    "name": 5,
                    "running": "two",
                    "waiting": True,
                    "kv_usage": float("nan"),
                    "inflight_requests": [1],
                    "reachable": "yes",
                },
                {"name": "a" * 10_000, "address": {"x": 1}, "running": 1e308 * 10},
            ],
        },
        allow_nan=True,
    ).encode(),
    b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
    b'{"endpoints": [{"name": "p", "running": 1' + b"0" * 400 + b"}]}",  # no float holds it
]


@pytest.mark.parametrize("page", HOSTILE_ENDPOINTS)
def test_a_malformed_debug_page_shows_unknowns_never_a_traceback(page: bytes, capsys) -> None:
    with serving({"/metrics": b"garbage {{{ \x00\xff\n", "/debug/endpoints": page}) as url:
        code = status_screen.main(["--once", "--picker", url])
    out = capsys.readouterr().out
    assert code in (0, 1) and "Traceback" not in out
    assert "requests ?" in out  # nothing readable in the metrics
    for line in out.splitlines():
        assert len(line) < 400


@pytest.mark.parametrize(
    "hostile",
    ["\x1b[2J", "\x9b31m", "\u202egnp.exe", "\u2066x\u2069", "a\u2028b", "\ud800", "\u200f"],
)
def test_text_shown_never_carries_controls_bidi_overrides_or_surrogates(hostile: str) -> None:
    shown = status_sources.text(f"pod-{hostile}-0")
    assert shown is not None and shown.startswith("pod-") and shown.endswith("-0")
    assert all(c.isprintable() and not "\ud800" <= c <= "\udfff" for c in shown), repr(shown)


def test_values_that_are_not_finite_numbers_are_unknown() -> None:
    pool, rows, more = pod_rows(HOSTILE_ENDPOINTS[3])
    assert pool is None and more == 0
    bad = rows[0]
    assert (bad.name, bad.running, bad.waiting, bad.kv_usage, bad.inflight, bad.reachable) == (
        None,
        None,
        None,
        None,
        None,
        None,
    )
    assert len(rows[1].name) <= status_sources.TEXT_LIMIT and rows[1].address is None
    assert rows[1].running is None  # inf


def test_an_integer_too_large_for_a_float_is_unknown() -> None:
    _, [row], _ = pod_rows(HOSTILE_ENDPOINTS[-1])
    assert row.name == "p" and row.running is None


def test_a_page_that_trickles_is_given_up_at_the_timeout() -> None:
    """Each byte within the socket's timeout, the whole page never: a bound on each read
    alone kept `infergate status` waiting for as long as the picker liked."""

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            for _ in range(100):  # 5 s in all, each byte well within the timeout
                self.wfile.write(b"#")
                self.wfile.flush()
                time.sleep(0.05)

        def log_message(self, *args) -> None:
            pass

    with serve(Trickle) as url, pytest.raises(status_sources.SourceError, match="within"):
        status_sources.fetch(f"{url}/metrics", timeout=0.5)


def test_metrics_lines_are_read_leniently_and_boundedly(monkeypatch) -> None:
    body = (
        f'{REQUESTS} NaN\n{REQUESTS} +Inf\n{REQUESTS} 1\n{REQUESTS}{{a="b"}} two\nnoise\n'
    ).encode()
    s = parse_metrics(body)
    assert s.get(REQUESTS) == 1 and s.skipped == 4
    codes = "".join(f'{ERRORS}{{error_code="{i}"}} 1\n' for i in range(100)).encode()
    assert len(parse_metrics(codes).errors_by_code) == 16  # one per code, at most 16
    monkeypatch.setattr(status_sources, "MAX_LINES", 10)
    s = parse_metrics(f"{REQUESTS} 1\n".encode() * 100)
    assert s.get(REQUESTS) == 10


def test_a_page_over_the_limit_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(status_sources, "PAGE_LIMIT", 1000)
    with serving({"/metrics": b"x" * 5000, "/debug/endpoints": ENDPOINTS}) as url:
        view = read_picker(url)
    assert view.samples is None and "more than 1000 bytes" in view.error
    assert view.pods  # the other page still read


def test_an_unreachable_picker_is_named_and_once_exits_1(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert status_screen.main(["--once", "--picker", url]) == 1
    out = capsys.readouterr().out
    assert url in out and "unreachable" in out


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/", "http://", "127.0.0.1:9090"])
def test_only_http_addresses_are_read(url: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        status_screen.main(["--once", "--picker", url])
    assert exc.value.code == 2 and "not an http:// or https:// address" in capsys.readouterr().err


def test_without_a_kubeconfig_the_cluster_view_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert status_screen.main(["--once", "--kubernetes"]) == 2
    assert "no cluster to read" in capsys.readouterr().err


def test_the_stack_s_further_pickers_show_only_while_they_answer() -> None:
    """infergate up's pickers after the first are looked for; one not running is left out,
    but the first, or one given, is named when it does not answer."""
    dead = f"http://127.0.0.1:{free_port()}"
    with serving({"/metrics": METRICS, "/debug/endpoints": ENDPOINTS}) as url:
        snap = asyncio.run(status_screen.Reader([url], optional=(dead, url + "/")).snapshot())
        assert [v.url for v in snap.pickers] == [url, url]  # the answering optional one too
        snap = asyncio.run(status_screen.Reader([dead], optional=(dead, dead)).snapshot())
    assert [v.url for v in snap.pickers] == [dead] and not snap.ok


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9", "soon"])
def test_a_refresh_interval_out_of_range_is_refused(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        status_screen.main(["--watch", "--interval", value])
    assert exc.value.code == 2 and "from 0.2 to 3600" in capsys.readouterr().err


def test_new_errors_are_counted_between_snapshots() -> None:
    pages = {"/metrics": METRICS, "/debug/endpoints": ENDPOINTS}
    with serving(pages) as url:
        reader = status_screen.Reader([url])
        first = asyncio.run(reader.snapshot())
        pages["/metrics"] = METRICS.replace(b'"429"} 2', b'"429"} 6')
        second = asyncio.run(reader.snapshot())
    assert first.new_errors[url] is None and second.new_errors[url] == 4


def test_the_watch_screen_renders_with_rich() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    with serving({"/metrics": METRICS, "/debug/endpoints": ENDPOINTS}) as url:
        snap = asyncio.run(
            status_screen.Reader([url, f"http://127.0.0.1:{free_port()}"]).snapshot()
        )
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(status_screen.render_rich(snap))
    text = console.export_text()
    assert "pod-0" in text and "25%" in text and "vllm-pool" in text
    assert "unreachable" in text  # the second picker, named on the screen


def test_watching_without_rich_says_what_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setattr(status_screen.importlib.util, "find_spec", lambda name: None)
    assert status_screen.main(["--watch"]) == status_screen.RICH_MISSING
    assert "pip install 'infergw[status]'" in capsys.readouterr().err


def test_recent_warnings_are_the_newest_few() -> None:
    events = [
        {
            "type": "Warning",
            "reason": f"R{i}",
            "eventTime": f"2026-12-07T10:00:{i:02d}.0Z",
            "regarding": {"kind": "Model", "name": "m"},
        }
        for i in range(20)
    ]
    events += [{"type": "Normal", "reason": "Created"}, "junk", {"type": "Warning", "note": 5}]
    rows = recent_warnings(events)
    assert len(rows) == status_sources.MAX_EVENTS
    assert rows[0].reason == "R19"


@pytest.mark.parametrize("bindings_served", [True, False])
def test_a_cluster_namespace_through_the_api(bindings_served: bool) -> None:
    """What the namespace holds; a kind that cannot be listed (here: its CRD not installed)
    is named, and the rest still shows."""
    crds = [c for c in DEFAULT_CRDS if bindings_served or "policybindings" not in c.name]
    with KubeAPIEmulator(crds=crds).threaded() as api:
        api.put(
            {
                "apiVersion": "workload.infergate.io/v1alpha1",
                "kind": "Model",
                "metadata": {"name": "m", "namespace": "default"},
                "spec": {"modelURI": "hf://a/b", "image": "vllm/vllm-openai:v0.11.0"},
                "status": {
                    "replicas": 2,
                    "readyReplicas": "lots",
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "GroupsNotReady",
                            "message": "",
                            "lastTransitionTime": "2026-12-07T10:00:00Z",
                        }
                    ],
                },
            }
        )
        api.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "m-0",
                    "namespace": "default",
                    "labels": {"infergate.io/model": "m"},
                },
                "spec": {"containers": [{"name": "engine", "image": "x"}]},
                "status": {"phase": "Running", "containerStatuses": [{"restartCount": 2}]},
            }
        )
        api.put(
            {
                "apiVersion": "events.k8s.io/v1",
                "kind": "Event",
                "metadata": {"name": "m.1", "namespace": "default"},
                "eventTime": "2026-12-07T10:00:00.000000Z",
                "type": "Warning",
                "reportingController": "infergate.io/controllers",
                "reportingInstance": "i",
                "action": "Apply",
                "reason": "ObjectNotOwned",
                "note": "ModelServer m is not ours",
                "regarding": {"kind": "Model", "name": "m", "namespace": "default"},
            }
        )

        async def read():
            store = KubeStore(client.ApiClient(api.client_configuration()))
            try:
                return await status_cluster.read_cluster(store, "default")
            finally:
                store.close()

        view = asyncio.run(read())
    if bindings_served:
        assert view.error is None
    else:
        assert view.error.startswith("cannot list autoscalingpolicybindings: ")
    [m] = view.models
    assert (m.ready, m.reason, m.replicas, m.ready_replicas) == ("False", "GroupsNotReady", 2, None)
    [pod] = view.pods
    assert (pod.phase, pod.ready, pod.restarts) == ("Running", False, 2)
    [w] = view.warnings
    assert (w.reason, w.object) == ("ObjectNotOwned", "Model/m")
    text = "\n".join(status_screen.cluster_lines(view))
    assert "0/2" not in text and "?/2 groups ready" in text


def picker_pod(name: str, port: int) -> dict:
    """A ready picker replica of pool llama, its metrics on 127.0.0.1:port."""
    obj = pod(name, "127.0.0.1", labels={"app": "llama-epp"})
    obj["spec"]["containers"][0]["ports"] = [{"name": "http-metrics", "containerPort": port}]
    return obj


def test_a_cluster_pool_s_pickers_through_the_api_server_s_pod_proxy(
    tmp_path, monkeypatch, capsys
) -> None:
    """Each ready replica behind the pool's endpointPickerRef is read through the pod proxy
    (the emulator relays to the real server); a replica that does not answer and a pool with
    none ready are named, with why."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "llama-epp", "namespace": "default"},
        "spec": {"selector": {"app": "llama-epp"}, "ports": [{"port": 9002}]},
    }
    lonely = pool(name="lonely")
    lonely["spec"]["endpointPickerRef"] = {"name": "nobody-epp"}
    pages = {"/metrics": METRICS, "/debug/endpoints": ENDPOINTS}
    with serving(pages) as url, KubeAPIEmulator().threaded() as api:
        for obj in (pool(), lonely, service, picker_pod("llama-epp-a", int(url.split(":")[-1]))):
            api.put(obj)
        api.put(picker_pod("llama-epp-b", free_port()))  # nothing listens there
        api.put(picker_pod("llama-epp-c", 1) | {"status": {"podIP": "127.0.0.1"}})  # not ready
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "config")))
        code = status_screen.main(["--once", "--kubernetes"])
    assert code == 1  # two pickers could not be read
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    text = out.out
    a = text[text.index("pod default/llama-epp-a") :]
    assert "pool vllm-pool" in a and "127.0.0.2:8000" in a and "requests 7" in a
    assert "cached-token share 25%" in a
    b = text[text.index("pod default/llama-epp-b") :]
    assert "unreachable or unreadable" in b.splitlines()[1] and "error trying to reach" in b
    assert "llama-epp-c" not in text
    assert "pool default/lonely" in text and "no ready picker pod" in text
    assert "no pods behind it" not in text  # said only of a picker that answered


def test_a_picker_with_no_pods_says_so(capsys) -> None:
    empty = json.dumps({"pool": {"name": "cold"}, "endpoints": []}).encode()
    with serving({"/metrics": METRICS, "/debug/endpoints": empty}) as url:
        assert status_screen.main(["--once", "--picker", url]) == 0
    out = capsys.readouterr().out
    assert "pool cold" in out and status_screen.NO_PODS in out and "address" not in out


@pytest.mark.slow
def test_once_against_a_real_local_stack(tmp_path) -> None:
    from tests.e2e.gateway_config import MODEL
    from tests.e2e.stack_fixtures import make_stack

    stack = make_stack(tmp_path, pods=2)
    try:
        r = requests.post(
            stack.url + "/v1/completions",
            json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        url = f"http://127.0.0.1:{stack.picker_ports().metrics}"
        out = subprocess.run(
            [sys.executable, "-m", "infergw.cli", "status", "--once", "--picker", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stack.stop()
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    for address in stack.pod_addresses:
        assert address in out.stdout
    assert "requests 1 " in out.stdout  # the one request sent
