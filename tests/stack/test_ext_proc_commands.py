"""stack/local.py starts the pickers and the body-based router down one path: each command
line, read by that server's own flag parser, says where it listens (its ports, on the host
Envoy dials), with the stack's certificate, and which pool file it reads."""

from __future__ import annotations

import pytest

from infergw.bbr.options import parse_options as router_options
from infergw.epp.options import parse_options as picker_options
from infergw.stack import local
from infergw.stack.local import PICKER_HOST, LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports


@pytest.fixture
def started(tmp_path, monkeypatch):
    """A stack whose processes are recorded (name -> argv after `-m module`), not run."""
    commands: dict[str, tuple[str, list[str]]] = {}

    def record(self, name, cmd, cwd=None):
        assert cmd[1] == "-m"
        commands[name] = (cmd[2], cmd[3:])

    monkeypatch.setattr(LocalStack, "_spawn", record)
    monkeypatch.setattr(local, "wait_http", lambda *a, **kw: None)
    return commands


@pytest.mark.parametrize("tls", [True, False])
def test_pickers_and_the_router_get_the_same_serving_flags(tmp_path, started, tls):
    ports = free_stack_ports(pickers=2)
    stack = LocalStack(StackConfig(tmp_path, ports=ports, pickers=2, picker_tls=tls))
    stack.start_picker()
    stack.start_router()
    assert {name: module for name, (module, _) in started.items()} == {
        "picker": "infergw.epp",
        "picker-1": "infergw.epp",
        "router": "infergw.bbr",
    }
    servers = [
        (picker_options(started["picker"][1]), stack.picker_ports(0)),
        (picker_options(started["picker-1"][1]), stack.picker_ports(1)),
        (router_options(started["router"][1]), ports.router),
    ]
    for opts, want in servers:
        assert opts.host == PICKER_HOST
        assert (opts.grpc_port, opts.grpc_health_port, opts.metrics_port) == (
            want.grpc,
            want.health,
            want.metrics,
        )
        assert (opts.provider, tuple(opts.pool_files)) == ("file", (stack.pool_path,))
        assert opts.secure_serving is tls
        assert opts.cert_path == (stack.picker_tls_dir if tls else None)
    picker = servers[0][0]
    assert picker.pool_name == stack.pool_name and picker.config_file is not None
