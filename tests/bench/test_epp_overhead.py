"""bench/epp_overhead's comparison with a minimal ext_proc stub: one Envoy config with a
listener per (server, response-body mode), the stub and canned pods answering through it,
and the picker pipeline measured in a child process, for this code and another commit's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from infergw.bench import epp_pipeline, epp_vs_stub
from infergw.bench.checkout import importable
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports


def _stack(tmp_path) -> LocalStack:
    return LocalStack(
        StackConfig(
            workdir=tmp_path,
            pods=2,
            ports=free_stack_ports(2),
            pod_ports=[free_port(), free_port()],
        )
    )


def test_one_listener_per_server_and_mode_each_asking_its_own_cluster(tmp_path):
    stack = _stack(tmp_path)
    ca = str(stack.picker_tls_dir / "ca.crt")
    stub = epp_vs_stub.ExtProcServer("stub", None, 7001, ca)
    picker = epp_vs_stub.ExtProcServer("picker@abc123", None, 7002, ca)
    listeners = [
        epp_vs_stub.Listener(stub, "through", 8101),
        epp_vs_stub.Listener(picker, "through", 8102),
        epp_vs_stub.Listener(picker, "headers", 8103),
        epp_vs_stub.Listener(stub, "none", 8104),
    ]
    doc = yaml.safe_load(epp_vs_stub.envoy_config(stack, listeners, 9999))
    resources = doc["static_resources"]
    clusters = {c["name"]: c for c in resources["clusters"]}
    assert set(clusters) == {"pool", "extproc-stub", "extproc-picker-abc123"}

    def port(cluster):
        lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        return lb["address"]["socket_address"]["port_value"]

    assert port(clusters["extproc-stub"]) == 7001
    assert port(clusters["extproc-picker-abc123"]) == 7002
    seen = []
    for listener in resources["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (ext_proc,) = [f for f in manager["http_filters"] if f["name"].endswith("ext_proc")]
        config = ext_proc["typed_config"]
        mode = config["processing_mode"]
        seen.append(
            (
                listener["address"]["socket_address"]["port_value"],
                config["grpc_service"]["envoy_grpc"]["cluster_name"],
                mode["request_body_mode"],
                mode["response_header_mode"],
                mode["response_body_mode"],
                mode["response_trailer_mode"],
            )
        )
    full = "FULL_DUPLEX_STREAMED"
    assert seen == [
        (8101, "extproc-stub", full, "SEND", full, "SEND"),
        (8102, "extproc-picker-abc123", full, "SEND", full, "SEND"),
        (8103, "extproc-picker-abc123", full, "SEND", "NONE", "SKIP"),
        (8104, "extproc-stub", full, "SKIP", "NONE", "SKIP"),
    ]


def test_a_listener_takes_only_the_known_response_modes():
    server = epp_vs_stub.ExtProcServer("stub", None, 7001, None)
    with pytest.raises(ValueError, match="response mode"):
        epp_vs_stub.Listener(server, "bodies", 8101)


def test_another_commit_imports_as_infergw_from_its_own_files(tmp_path):
    path = importable("HEAD", tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", "import infergw.epp.extproc as m; print(m.__file__)"],
        env={**os.environ, "PYTHONPATH": str(path)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(path))


@pytest.mark.slow
def test_stub_and_picker_answer_side_by_side_through_one_envoy():
    out = epp_vs_stub.compare(
        concurrency=4, duration=1.0, rounds=1, loadgen="python", responses=("through", "none")
    )
    names = out["servers"]
    assert names == [
        "stub",
        "picker",
        "stub (response headers and bodies kept away)",
        "picker (response headers and bodies kept away)",
    ]
    for name in names:
        assert out[name]["errors"] == 0, (name, out[name])
        assert out[name]["rps"] > 0, (name, out[name])
        assert out[name]["cpu_us_per_request"] > 0
    assert out["picker"]["rps_ratio"] == pytest.approx(
        out["picker"]["rps"] / out["stub"]["rps"], rel=0.01
    )
    assert "picker / stub" not in epp_vs_stub.markdown(out)  # one row per server


@pytest.mark.slow
def test_the_pipeline_child_runs_the_pickers_code_and_reports_cpu_per_request():
    out = epp_pipeline.compare(["HEAD"], requests=50, rounds=1, chunks=(0, 20))
    json_answer, streamed = (mode["commits"]["HEAD"] for mode in out["modes"])
    assert json_answer["cpu_us_per_request"] > 0 and "cpu_us_per_chunk" not in json_answer
    assert json_answer["wall_us_per_request"] >= json_answer["cpu_us_per_request"] * 0.5
    # The chunks are timed on their own, a part of the request's CPU.
    assert 0 < 20 * streamed["cpu_us_per_chunk"] < streamed["cpu_us_per_request"]
    assert streamed["cpu_us_per_request_without_chunks"] > 0
    assert "20 streamed chunks" in epp_pipeline.markdown(out)


@pytest.mark.slow
def test_the_pipeline_child_keeps_requests_in_flight_together():
    """With --concurrency the child's requests overlap (the child checks every answer, so a
    request that lost its messages to another would fail the run)."""
    out = epp_pipeline.compare(["HEAD"], requests=60, rounds=1, concurrency=16)
    assert out["concurrency"] == 16
    assert out["modes"][0]["commits"]["HEAD"]["cpu_us_per_request"] > 0
    assert "16 request(s) in flight" in epp_pipeline.markdown(out)
    with pytest.raises(SystemExit):
        epp_pipeline.main(["--concurrency", "0"])
