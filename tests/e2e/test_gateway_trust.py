"""What a client cannot do to the gateway, through a real Envoy and picker: send headers only the
gateway sets, have Envoy talk ext_proc to a picker whose certificate Envoy's CA did not sign,
or take the picker down with one slow health check.

What the checks observe is real: the headers the model-server pod received (after the picker,
tests/e2e/recording_backend.py records them), Envoy's own status codes and admin stats
(TLS verification failures, health-check outcomes), and the picker's count of ext_proc streams.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import requests

from infergw.api.names import USER_HEADER
from infergw.cluster.certs import serving_cert
from infergw.stack.auth import CLIENT_HINT_HEADERS, GATEWAY_HEADERS
from infergw.stack.local import LocalStack
from infergw.stack.readiness import wait_until
from tests.e2e.stack_fixtures import ask, picker_requests, recorded, recording_stack

pytestmark = pytest.mark.slow

FORGED = "forged-by-client"
# Every header a client may not set, as a client might spell it (and repeat it).
FORGERIES = [
    (name, f"{FORGED}-{i}")
    for i, header in enumerate((USER_HEADER, *GATEWAY_HEADERS, *CLIENT_HINT_HEADERS))
    for name in (header, header.upper())
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = recording_stack(tmp_path_factory.mktemp("trust"))
    yield s
    s.stop()


def forged_values_received(stack: LocalStack) -> dict[str, str]:
    """The client's forged headers in the last request the pod received."""
    return {k: v for k, v in recorded(stack)[-1]["headers"] if v.startswith(FORGED)}


def test_no_client_copy_of_a_gateway_header_reaches_the_picker_or_the_pod(stack):
    r = ask(stack, FORGERIES)
    assert r.status_code == 200, r.text
    assert forged_values_received(stack) == {}
    # A request without a body (a read path of the inference API) too.
    r = ask(stack, FORGERIES, get="/v1/responses/resp-1")
    assert r.status_code == 200, r.text
    assert recorded(stack)[-1]["path"] == "/v1/responses/resp-1"
    assert forged_values_received(stack) == {}


def test_trusted_clients_keep_their_scheduling_hints_and_nothing_else(stack):
    """--trust-client-headers: Envoy alone (no picker in the chain, so what the pod receives
    is what Envoy's filters passed on) lets the objective and fairness id through."""
    stack.cfg.trust_client_headers, stack.cfg.with_picker = True, False
    try:
        stack.restart_envoy()
        assert ask(stack, FORGERIES).status_code == 200
        kept = forged_values_received(stack)
        assert sorted(kept) == sorted(CLIENT_HINT_HEADERS)
    finally:
        stack.cfg.trust_client_headers, stack.cfg.with_picker = False, True
        stack.restart_envoy()


def envoy_stats(stack: LocalStack, pattern: str) -> dict[str, int]:
    url = f"http://127.0.0.1:{stack.cfg.ports.envoy_admin}/stats"
    text = requests.get(url, params={"filter": pattern}, timeout=5).text
    return {k: int(v) for k, v in (line.split(": ", 1) for line in text.splitlines())}


def restart_picker_with(stack: LocalStack, tls_dir) -> None:
    """The picker again, serving tls.crt and tls.key from `tls_dir` (Envoy's CA unchanged)."""
    for name in ("tls.crt", "tls.key"):
        shutil.copy(tls_dir / name, stack.picker_tls_dir / name)
    stack.stop_picker()
    stack.start_picker()


def test_envoy_refuses_a_picker_whose_certificate_another_ca_signed(stack, tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("tls.crt", "tls.key"):
        shutil.copy(stack.picker_tls_dir / name, ours / name)
    # The same SAN and key type, from a CA Envoy does not trust.
    impostor = serving_cert(hosts=("127.0.0.1",), common_name="infergate-epp").write(
        tmp_path / "impostor"
    )
    failed = "cluster.endpoint-picker.ssl.fail_verify_error"
    before = envoy_stats(stack, f"^{failed}$")[failed]
    try:
        restart_picker_with(stack, impostor)
        # The health check (plaintext, on the health port) passes; the request's own ext_proc
        # connection refuses the impostor's certificate and, failing closed, the request fails
        # instead of going to a pod unpicked.
        wait_until(stack.pickers_healthy_in_envoy, 30, None, "Envoy to check the new picker")
        seen, served = picker_requests(stack), len(recorded(stack))

        def refused_by_its_certificate() -> bool:
            # Every request fails; the first ones may not even dial (the restart's refused
            # connection ejected the picker for a second), so wait for a handshake to fail.
            r = ask(stack)
            assert r.status_code >= 500, (r.status_code, r.text)
            return envoy_stats(stack, f"^{failed}$")[failed] > before

        wait_until(refused_by_its_certificate, 30, None, "Envoy to refuse the impostor")
        assert picker_requests(stack) == seen
        assert len(recorded(stack)) == served
    finally:
        restart_picker_with(stack, ours)
    wait_until(stack.pickers_healthy_in_envoy, 30, None, "Envoy to see the picker healthy")
    # The refused handshake ejected the picker for a second (outlier detection); then it serves.
    wait_until(lambda: ask(stack).status_code == 200, 30, None, "the picker to serve again")


def test_one_slow_health_check_does_not_take_the_picker_down(stack):
    """The picker stalls (SIGSTOP, as under a CPU burst) until one health check has timed
    out, then goes on: Envoy keeps it healthy, and requests keep being picked."""
    assert ask(stack).status_code == 200
    wait_until(stack.pickers_healthy_in_envoy, 30, None, "Envoy to see the picker healthy")
    prefix = "cluster.endpoint-picker.health_check"
    pattern = f"^{prefix}\\.(failure|healthy)$"
    failures = envoy_stats(stack, pattern)[f"{prefix}.failure"]
    pgid = stack.procs["picker"].pid  # its own session: the group of the picker's processes
    os.killpg(pgid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: envoy_stats(stack, pattern)[f"{prefix}.failure"] > failures,
            30,
            None,
            "a health check of the stalled picker to fail",
        )
        stats = envoy_stats(stack, pattern)
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert stats[f"{prefix}.failure"] == failures + 1, stats
    assert stats[f"{prefix}.healthy"] == 1, "one failed check marked the picker down"
    assert ask(stack).status_code == 200
