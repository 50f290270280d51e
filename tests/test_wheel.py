"""The built wheel is complete: installed into a fresh venv, it runs `infergate up --pods 2`
from an empty directory and answers a completion through Envoy, then stops on SIGINT.

pip builds the wheel (an isolated build: setuptools from the package index, or pip's cache)
and installs it; the dependencies it declares (and theirs) are linked in from the suite's
environment, nothing else, so a file the wheel lacks or a dependency it does not declare
fails here. It measures each step (printed)."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from infergw.api.lifetime import spawn
from infergw.stack.readiness import wait_http
from tests.default_ports import DEFAULT_PORTS, ports_free
from tests.paths import ROOT
from tests.venv_links import link_distributions, requirements_closure

pytestmark = pytest.mark.slow

HEAD = subprocess.run(
    ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
).stdout.strip()
DEV_KEY = "sk-infergate-dev-alice"  # examples/quickstart/api-keys.yaml
# The folders whose files the commands read, and where the wheel puts them.
DATA = {
    ROOT / "examples": "infergw/examples",
    ROOT / "gateway-manifests": "infergw/gateway_manifests",
    ROOT / "crds": "infergw/crds",
    ROOT / "simulator" / "default_model": "infergw/simulator/default_model",
}


def data_files() -> set[str]:
    """Every file of DATA's folders, as the wheel names it."""
    return {
        f"{inside}/{path.relative_to(folder).as_posix()}"
        for folder, inside in DATA.items()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def _run(args: list, **kwargs) -> None:
    subprocess.run([str(a) for a in args], check=True, **kwargs)


@pytest.mark.timeout(600)
def test_the_wheel_in_a_fresh_venv_runs_up_from_an_empty_directory(tmp_path: Path) -> None:
    if not ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    steps: dict[str, float] = {}
    start = time.monotonic()

    def step(name: str) -> None:
        steps[name] = round(time.monotonic() - start - sum(steps.values()), 1)

    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, ROOT])
    (wheel,) = dist.glob("infergw-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert data_files() - set(z.namelist()) == set()
        # setup.py's hook: the commit built from, for --version and inference_extension_info
        assert z.read("infergw/api/_build_info.py").decode().endswith(f'COMMIT = "{HEAD}"\n')
    step("build")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    # The dependencies the wheel declares, linked from the suite's environment
    # (tests/venv_links.py says why and what that still proves); the wheel itself installed
    # by pip, without bytecode (Python compiles what it imports anyway).
    with zipfile.ZipFile(wheel) as z:
        [meta] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        declared = email.message_from_bytes(z.read(meta)).get_all("Requires-Dist") or []
    link_distributions(requirements_closure(declared), venv)
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    _run([*pip, "install", "-q", "--no-deps", "--no-compile", wheel])
    _run([*pip, "check"])
    step("install")
    bench = subprocess.run(
        [venv / "bin" / "infergate", "bench", "kvindex"], capture_output=True, text=True
    )
    assert bench.returncode == 3, bench.stderr  # the bench extra is not installed
    assert "pip install 'infergw[bench]'" in bench.stderr
    said = subprocess.run(
        [venv / "bin" / "infergate", "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert said.stdout.strip().endswith(f"(commit {HEAD[:12]})"), said

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    proc = spawn(
        [str(venv / "bin" / "infergate"), "up", "--pods", "2", "--workdir", str(tmp_path / "w")],
        cwd=empty,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http("http://127.0.0.1:9901/ready", 120, proc)
        r = requests.post(
            "http://127.0.0.1:8080/v1/completions",
            json={"model": "infergate-sim", "prompt": "hi", "max_tokens": 4},
            headers={"authorization": f"Bearer {DEV_KEY}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        served = r.headers["x-gateway-destination-endpoint-served"]
        step("up and one request")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "2 pods serving 'infergate-sim'" in out, out
        for address in ("127.0.0.1:8080", "127.0.0.1:9002", served):
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{address}/", timeout=2)
        step("stop")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert list(empty.iterdir()) == []  # it wrote nothing where it ran
    print(f"wheel test, seconds per step: {steps} (total {sum(steps.values()):.0f})")
