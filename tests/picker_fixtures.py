"""A real picker process (`python -m infergw.epp` over a file provider) with three simulator pods,
for tests that play Envoy against it over ext_proc: `Picker`, and the module-scoped `sims` and
`picker` fixtures (import them into the test module to use them)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from subprocess import Popen

import pytest
import requests
import yaml

from tests.conftest import free_port, running, simulators

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: least-request
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: least-request
  - pluginRef: max-score-picker
"""


# Simulated time runs 20x faster: tests wait for tokens, not for the latency model.
FAST_SIMULATOR = ("--sim-time-scale", "0.05")

# A port free when free_port() found it can be taken before the picker binds it: by another
# process's server, or as the source port of any outgoing connection on the machine (both
# come from the kernel's ephemeral range). Under load the picker starts slowly and the window
# is wide; the picker then exits at start ("address already in use") and is started again on
# other ports, this many times in all.
START_ATTEMPTS = 3
PORT_TAKEN = "address already in use"


def picker_cmd(grpc_port: int, metrics_port: int, *flags: str) -> list[str]:
    """`python -m infergw.epp` on 127.0.0.1 with these ext_proc and metrics ports (health on a
    free one)."""
    return [
        sys.executable,
        "-m",
        "infergw.epp",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(free_port()),
        "--metrics-port",
        str(metrics_port),
        *flags,
    ]


def pool_yaml(ports: list[int], ready: bool = True, name: str = "pool") -> str:
    return yaml.safe_dump_all(
        [
            {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "selector": {"matchLabels": {"app": "sim"}},
                    "targetPorts": [{"number": p} for p in ports],
                    "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "sims", "namespace": "default", "labels": {"app": "sim"}},
                "status": {
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                },
            },
        ]
    )


class Picker:
    def __init__(self, tmp_path, ports, *, ready=True, extra=(), secure=False):
        self.dir = tmp_path
        self.pool = tmp_path / f"pool-{free_port()}.yaml"
        self.pool.write_text(pool_yaml(ports, ready))
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG)
        self.flags = (
            "--provider",
            "file",
            "--pool-file",
            str(self.pool),
            "--pool-name",
            "pool",
            "--config",
            str(config),
            f"--secure-serving={'true' if secure else 'false'}",
            "--enable-debug-endpoints",
            *extra,
        )
        self.addresses = [f"127.0.0.1:{p}" for p in ports]
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.grpc, self.metrics = free_port(), free_port()
        self.cmd = picker_cmd(self.grpc, self.metrics, *self.flags)
        self.target = f"127.0.0.1:{self.grpc}"

    @contextmanager
    def run(self) -> Iterator[Popen]:
        """The picker for the length of a with-block, ready; started again on other ports
        when one it was given was taken before it could bind it (START_ATTEMPTS)."""
        with ExitStack() as stack:
            for attempt in range(1, START_ATTEMPTS + 1):
                log = self.dir / f"picker-{self.grpc}.log"
                try:
                    proc = stack.enter_context(
                        running(
                            self.cmd,
                            ready_url=f"http://127.0.0.1:{self.metrics}/healthz",
                            output=log,
                        )
                    )
                    break
                except RuntimeError:  # it exited before it was ready
                    output = log.read_text(errors="replace")
                    if attempt == START_ATTEMPTS or PORT_TAKEN not in output.lower():
                        print(output, file=sys.stderr)  # the picker's reason, in the report
                        raise
                    self._choose_ports()
            yield proc

    def debug(self) -> dict:
        return requests.get(f"http://127.0.0.1:{self.metrics}/debug/endpoints", timeout=5).json()

    def metric_lines(self, prefix: str) -> list[str]:
        text = requests.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).text
        return [ln for ln in text.splitlines() if ln.startswith(prefix)]


@pytest.fixture(scope="module")
def sims():
    with simulators(3, *FAST_SIMULATOR) as ports:
        yield ports


@pytest.fixture(scope="module")
def picker(sims, tmp_path_factory):
    p = Picker(tmp_path_factory.mktemp("picker"), sims)
    with p.run():
        deadline = time.monotonic() + 10
        while any(e["stale"] for e in p.debug()["endpoints"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield p


COMPLETION = {"model": "infergate-sim", "prompt": "hello", "max_tokens": 2}
GET = {":method": "GET"}
