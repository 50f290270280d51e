"""A one-address pod's command line: its ports moved where they are written as ports, nothing
else."""

from __future__ import annotations

import json

from infergw.api.pod_ports import HostPorts
from infergw.controllers.moved_ports import moved_args, moved_env

PORTS = HostPorts.parse("8000=20001,8200=20002,5557=20003,5600=20004")


def test_ports_move_in_flags_addresses_urls_topics_and_json() -> None:
    events = {
        "endpoint": "tcp://127.0.0.1:5557",
        "replay_endpoint": "tcp://*:5600",
        "topic": "kv@127.0.0.1:8000@tiny",
    }
    args = [
        "--port=8000",
        "--port",
        "8200",
        "--engine-url=http://127.0.0.1:8200",
        "--kv-events-replay-port=5600",
        f"--kv-events-config={json.dumps(events)}",
        "--KV-PORT=5557",
    ]
    moved = moved_args(args, PORTS)
    assert moved[:5] == [
        "--port=20001",
        "--port",
        "20002",
        "--engine-url=http://127.0.0.1:20002",
        "--kv-events-replay-port=20004",
    ]
    assert json.loads(moved[5].split("=", 1)[1]) == {
        "endpoint": "tcp://127.0.0.1:20003",
        "replay_endpoint": "tcp://*:20004",
        "topic": "kv@127.0.0.1:20001@tiny",
    }
    assert moved[6] == "--KV-PORT=20003"


def test_other_numbers_keep_their_meaning() -> None:
    args = [
        "--max-model-len=8000",
        "--max-num-seqs",
        "8000",
        "--seed=5557",
        "--url=http://h:80000",  # not port 8000
        "--url=http://h:18000",
        "8000",
    ]
    assert moved_args(args, PORTS) == args
    assert moved_args(["--port=8000"], HostPorts()) == ["--port=8000"]


def test_env_ports_move_by_name_or_where_written() -> None:
    env = {"VLLM_PORT": "8000", "WORKERS": "8000", "URL": "http://127.0.0.1:8200/v1"}
    assert moved_env(env, PORTS) == {
        "VLLM_PORT": "20001",
        "WORKERS": "8000",
        "URL": "http://127.0.0.1:20002/v1",
    }
