"""The real CLI in kubernetes mode: `python -m infergw.controllers --mode kubernetes --leader-elect`
as subprocesses, with a kubeconfig pointing at the API emulator (tests/kubeapi.py, real HTTP).

The emulator authorizes the controllers' requests (they carry their ServiceAccount's bearer
token) with the RBAC of gateway-manifests/controllers.yaml, as kube-apiserver would, and
refuses anything else with 403: a Model becomes its ModelInfer, pods and InferencePool with
exactly those permissions. The leader holds the Lease infergate-controllers in
infergate-system; a standby serves metrics and the webhook (what the Deployment's probes ask)
and stops on SIGTERM; SIGTERM stops the leader with exit 0 and hands the Lease back, so the
next replica leads at once and keeps reconciling. A webhook that cannot start stops the
process instead of leaving it running without one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from infergw.api.lifetime import spawn
from tests.conftest import free_port, running
from tests.controller_manifests import Authorizer
from tests.controllers_in_emulator import CONTROLLERS, TOKEN, kubelet, manifest_rbac
from tests.kube_rbac import RBACEmulator
from tests.kubeapi import KubeAPIEmulator, kubeconfig_env
from tests.paths import CRD_EXAMPLES
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

EXAMPLE = CRD_EXAMPLES / "model.yaml"
LEASE_NS, LEASE_NAME = "infergate-system", "infergate-controllers"
WORKLOAD = "workload.infergate.io/v1alpha1"


def emulator(auth: Authorizer) -> RBACEmulator:
    """The emulator, authorizing requests that carry TOKEN with `auth`."""
    return RBACEmulator({TOKEN: (CONTROLLERS, lambda: auth)})


def denied(api: RBACEmulator) -> list:
    return api.denied.get(CONTROLLERS.name, [])


def controllers_cmd(metrics_port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "infergw.controllers", "--mode", "kubernetes", "--leader-elect",
        "--leader-namespace", LEASE_NS, "--metrics-port", str(metrics_port), *extra,
    ]  # fmt: skip


def identity(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}-{proc.pid}"  # what controllers/app.py competes as


def answers(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=1, context=ctx) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, within: float = 10.0) -> int:
    """SIGTERM, as the kubelet sends it; the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"controllers did not stop within {within:.0f}s of SIGTERM")


def holder(api: KubeAPIEmulator) -> str | None:
    lease = api.get("coordination.k8s.io/v1", "Lease", LEASE_NAME, LEASE_NS)
    return None if lease is None else lease["spec"].get("holderIdentity")


def pod_names(core: client.CoreV1Api) -> set[str]:
    # raw JSON: the emulator keeps quantities as written (an int GPU count), which the
    # client's models would refuse; a real API server answers them as strings
    resp = core.list_namespaced_pod(
        "default", label_selector="infergate.io/model=llama-3-8b", _preload_content=False
    )
    return {p["metadata"]["name"] for p in json.loads(resp.data)["items"]}


def test_leader_reconciles_hands_over_on_sigterm_and_a_standby_waits(tmp_path: Path) -> None:
    api = emulator(manifest_rbac())
    with api.threaded():
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)
        env = kubeconfig_env(kubeconfig)
        admin = client.ApiClient(api.client_configuration())  # no token: not the controllers
        custom, core = client.CustomObjectsApi(admin), client.CoreV1Api(admin)
        a_metrics = free_port()
        with running(controllers_cmd(a_metrics), env=env) as a:
            wait_for(lambda: holder(api) == identity(a), "A holds the Lease", alive=(a,), within=30)
            assert answers(f"http://127.0.0.1:{a_metrics}/metrics")

            model = yaml.safe_load(EXAMPLE.read_text())
            custom.create_namespaced_custom_object(
                "workload.infergate.io", "v1alpha1", "default", "models", model
            )
            wait_for(lambda: len(pod_names(core)) == 4, "the Model's 4 pods", alive=(a,), within=30)
            for api_version, kind in (
                (WORKLOAD, "ModelInfer"),
                ("inference.networking.k8s.io/v1", "InferencePool"),
                ("networking.infergate.io/v1alpha1", "ModelServer"),
                ("networking.infergate.io/v1alpha1", "ModelRoute"),
                (WORKLOAD, "AutoScalingPolicyBinding"),
            ):
                obj = wait_for(
                    lambda v=api_version, k=kind: api.get(v, k, "llama-3-8b"),
                    kind,
                    alive=(a,),
                    within=30,
                )
                assert obj["metadata"]["ownerReferences"][0]["kind"] == "Model"

            def model_ready() -> bool:
                kubelet(api, pod_names(core))
                status = api.get(WORKLOAD, "Model", "llama-3-8b").get("status") or {}
                return status.get("readyReplicas") == 2

            wait_for(model_ready, "the Model's status: 2 groups ready", alive=(a,), within=30)

            # a standby: waits for the Lease, answers the probes meanwhile, stops on SIGTERM
            b_metrics, b_webhook = free_port(), free_port()
            cmd = controllers_cmd(b_metrics, "--webhook-port", str(b_webhook))
            with running(cmd, env=env) as b:
                wait_for(
                    lambda: answers(f"http://127.0.0.1:{b_metrics}/metrics"),
                    "the standby's metrics (the liveness probe)",
                    alive=(b,),
                    within=30,
                )
                wait_for(
                    lambda: answers(f"https://127.0.0.1:{b_webhook}/healthz"),
                    "the standby's webhook (the readiness probe)",
                    alive=(b,),
                    within=30,
                )
                assert holder(api) == identity(a)
                assert stop(b) == 0
            assert holder(api) == identity(a)

            assert stop(a) == 0
            lease = api.get("coordination.k8s.io/v1", "Lease", LEASE_NAME, LEASE_NS)
            assert lease["spec"]["holderIdentity"] == "", "the Lease was not handed back"

        # the next leader takes the Lease A handed back (free, asserted above) rather than
        # one left to expire; the bound is generous because a loaded machine starts C slowly
        with running(controllers_cmd(free_port()), env=env) as c:
            wait_for(lambda: holder(api) == identity(c), "C holds the Lease", alive=(c,), within=30)
            lease = api.get("coordination.k8s.io/v1", "Lease", LEASE_NAME, LEASE_NS)
            assert lease["spec"]["leaseTransitions"] >= 1
            victim = "llama-3-8b-0-decode-0-0"
            core.delete_namespaced_pod(victim, "default", _preload_content=False)
            wait_for(
                lambda: victim in pod_names(core),
                "C recreates a deleted pod",
                alive=(c,),
                within=30,
            )
            assert stop(c) == 0
            assert holder(api) == ""
        admin.close()

    assert not denied(api), f"the RBAC of controllers.yaml refused {denied(api)}"
    # Nothing the controllers wrote was a field the CRDs do not have (a cluster drops those).
    assert api.warnings == []
    used = api.allowed[CONTROLLERS.name]
    assert ("coordination.k8s.io", "leases", "update", LEASE_NS) in used
    assert ("", "pods", "create", "default") in used
    assert ("", "pods", "watch", "") in used  # every namespace
    assert ("workload.infergate.io", "models/status", "update", "default") in used


def test_the_emulator_refuses_what_the_rbac_does_not_grant(tmp_path: Path) -> None:
    """Without the Role for Leases the controllers cannot lead: the check above has teeth."""
    rbac = manifest_rbac()
    rbac.namespaced.clear()
    api = emulator(rbac)
    with api.threaded():
        env = kubeconfig_env(api.write_kubeconfig(tmp_path / "kubeconfig", TOKEN))
        with running(controllers_cmd(free_port()), env=env) as proc:
            wait_for(lambda: denied(api), "a refused request", alive=(proc,), within=20)
        assert holder(api) is None
    assert denied(api)[0] == ("coordination.k8s.io", "leases", "get", LEASE_NS)


def test_a_webhook_that_cannot_start_stops_the_controllers(tmp_path: Path) -> None:
    api = emulator(manifest_rbac())
    with api.threaded():
        env = {**os.environ, **kubeconfig_env(api.write_kubeconfig(tmp_path / "kubeconfig", TOKEN))}
        empty = tmp_path / "certs"
        empty.mkdir()
        cmd = controllers_cmd(
            free_port(), "--webhook-port", str(free_port()), "--webhook-cert-dir", str(empty)
        )
        proc = spawn(cmd, env=env, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the controllers kept running without their webhook")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0
    assert "has no tls.crt" in err, err
