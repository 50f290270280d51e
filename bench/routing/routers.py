"""The routers under test. Each starts in front of a running fleet, answers OpenAI requests
on a base URL and names the processes whose CPU time is its cost.

infergate runs as in production: Envoy with the picker as ext_proc, the picker reading the
pods' KV events per pod. vllm-router and sglang-router run from their PyPI wheels with their
own defaults; only what any user must set (worker URLs, policy, the KV-event source) is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infergw.api.lifetime import spawn
from infergw.bench.common import counter_sum, cpu_over
from infergw.stack.local import LocalStack
from infergw.stack.ports import free_port
from infergw.stack.readiness import wait_http, wait_until

# infergate's scheduling profiles: (plugin, weight); a max-score picker closes each.
INFERGATE_PROFILES = {
    # No prefill-backlog-scorer in the two prefix profiles: through the stack it let the
    # shared-prefix fleet fall behind at two of three rates (issue 16, README). The precise
    # scorer weighs as much as the three load scorers (the quickstart's weights; at 3 it lost
    # conversations to a slightly busier holder's neighbours, README issue 16).
    "precise": [
        ("precise-prefix-cache-scorer", 6),
        ("queue-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
        ("least-request", 2),
    ],
    "approximate": [
        ("prefix-cache-scorer", 3),
        ("queue-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
        ("least-request", 2),
    ],
    "load": [
        ("queue-scorer", 1),
        ("kv-cache-utilization-scorer", 1),
        ("least-request", 1),
        ("prefill-backlog-scorer", 2),
    ],
    "random": [("random-scorer", 1)],
    # No scorer: the picker's own cost with a plain load balancer's choices (its picker below).
    "round-robin": [],
}
# Profiles run only when named (--routers): a default profile with one setting more, so its
# worth shows in one run on the same fleet (a --baseline picker cannot run a plugin newer
# than its commit).
COMPARISON_PROFILES = {
    # precise with the prefill-backlog scorer, charged every prompt token (issue 16)
    "precise-with-backlog": [*INFERGATE_PROFILES["precise"], ("prefill-backlog-scorer", 4)],
    # ... charged only the tokens the chosen pod did not hold when it was scored
    "precise-backlog-uncached": [
        *INFERGATE_PROFILES["precise"],
        ("prefill-backlog-scorer", 4, {"chargeCachedTokens": False}),
    ],
    # The precise scorer at its weight before issue 16's affinity run (3), and above (10).
    "precise-affinity3": [("precise-prefix-cache-scorer", 3), *INFERGATE_PROFILES["precise"][1:]],
    "precise-affinity10": [("precise-prefix-cache-scorer", 10), *INFERGATE_PROFILES["precise"][1:]],
}
# The picker closing a profile: max-score-picker unless named here.
PROFILE_PICKERS = {"round-robin": "round-robin-picker"}


def picker_config(plugins: list[tuple], picker: str = "max-score-picker") -> str:
    """A config of (plugin type, weight[, its parameters]) in one profile, then the picker."""
    lines = [
        "apiVersion: llm-d.ai/v1alpha1",
        "kind: EndpointPickerConfig",
        "plugins:",
    ]
    for t, _, *params in plugins:
        lines.append(f"- type: {t}")
        if params:
            lines.append(f"  parameters: {json.dumps(params[0])}")  # JSON is YAML
    lines.append(f"- type: {picker}")
    lines += ["schedulingProfiles:", "- name: default", "  plugins:"]
    lines += [f"  - {{pluginRef: {t}, weight: {w}}}" for t, w, *_ in plugins]
    lines += [f"  - {{pluginRef: {picker}}}"]
    return "\n".join(lines) + "\n"


class RouterUnavailable(RuntimeError):
    """The router cannot run here (not installed): the benchmark reports it and goes on."""


# The picker's fast scrape interval (its default): the idle baseline scrapes every pod at
# it, as the picker scraped busy pods before they went quiet between its requests (so that
# baseline overstates the scraping of a run; the pickers' own count does not).
FAST_SCRAPE = "50ms"


# Pickers run only when named (--routers): they compare one setting against the default.
PICKER_VARIANTS = {
    # Every pod scraped at the fast interval, idle, busy or sent nothing: how the picker
    # scraped before idle pods rested and busy ones went quiet (epp/scrape_pace.py).
    "always-fast-scrape": [
        "--idle-metrics-interval",
        FAST_SCRAPE,
        "--quiet-metrics-interval",
        FAST_SCRAPE,
    ],
}


@dataclass(frozen=True, slots=True)
class Scraping:
    """What a router's scraping of the pods has cost so far (counters: subtract two)."""

    cpu_s: float | None  # CPU seconds its scraping took; None: not counted
    pages: float  # /metrics pages it fetched

    def since(self, before: Scraping) -> Scraping:
        cpu = None if self.cpu_s is None or before.cpu_s is None else self.cpu_s - before.cpu_s
        return Scraping(cpu, self.pages - before.pages)


@dataclass(slots=True)
class InfergateRouter:
    config: str  # a key of INFERGATE_PROFILES or COMPARISON_PROFILES
    variant: str = ""  # a key of PICKER_VARIANTS: the picker with other flags
    pickers: int = 1  # picker replicas behind the one Envoy (each subscribes to every pod)
    # Another commit's picker (--baseline): its name, and bench/checkout.py's folder for it.
    commit: str = ""
    checkout: Path | None = None
    _stack: LocalStack | None = None

    @property
    def name(self) -> str:
        replicas = f"-x{self.pickers}" if self.pickers > 1 else ""
        variant = f"-{self.variant}" if self.variant else ""
        return f"infergate-{self.config}{replicas}{variant}" + (
            f"@{self.commit}" if self.commit else ""
        )

    def _start_pickers(self, stack: LocalStack) -> None:
        with _pythonpath(self.checkout):
            stack.start_picker()

    def start(self, stack: LocalStack) -> str:
        path = stack.cfg.workdir / "epp-config.yaml"
        picker = PROFILE_PICKERS.get(self.config, "max-score-picker")
        plugins = (INFERGATE_PROFILES | COMPARISON_PROFILES)[self.config]
        path.write_text(picker_config(plugins, picker))
        stack.cfg.picker_config = path
        stack.cfg.picker_args = [*stack.cfg.picker_args, *PICKER_VARIANTS.get(self.variant, [])]
        stack.cfg.pickers = self.pickers
        self._start_pickers(stack)
        stack.start_envoy()
        self._stack = stack
        return stack.url

    def pids(self) -> dict[str, int]:
        assert self._stack is not None
        names = [*map(self._stack.picker_name, self._stack.picker_indexes), "envoy"]
        return {n: self._stack.procs[n].pid for n in names}

    def scraping(self) -> Scraping | None:
        """The pickers' scraping so far, summed over them, from their /metrics (the CPU is
        None for a picker from before it was counted: --baseline)."""
        stack = self._stack
        assert stack is not None
        cpu: float | None = 0.0
        pages = 0.0
        for i in stack.picker_indexes:
            url = f"http://127.0.0.1:{stack.picker_ports(i).metrics}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            pages += counter_sum(text, "infergate_epp_metrics_scrapes")
            if cpu is not None and "infergate_epp_scrape_cpu_seconds" in text:
                cpu += counter_sum(text, "infergate_epp_scrape_cpu_seconds")
            else:
                cpu = None
        return Scraping(cpu, pages)

    def idle_baseline(self, seconds: float) -> dict[str, float]:
        """CPU seconds over `seconds` of no traffic with every pod scraped at the fast
        interval, as busy pods are: the cost of scraping (and of the picker's and Envoy's
        housekeeping), apart from any request. The picker then restarts with its defaults,
        under which idle pods rest (epp/scrape_pace.py)."""
        stack = self._stack
        assert stack is not None
        defaults = list(stack.cfg.picker_args)
        self._restart_picker([*defaults, "--idle-metrics-interval", FAST_SCRAPE])
        pods = len(stack.pod_addresses)

        def all_fresh() -> bool:
            eps = stack.picker_endpoints()
            return len(eps) == pods and not any(e["stale"] for e in eps.values())

        wait_until(
            all_fresh,
            30,
            stack.procs["picker"],
            "every pod scraped",
        )
        cpu = cpu_over(self.pids(), seconds)
        self._restart_picker(defaults)
        return cpu

    def _restart_picker(self, args: list[str]) -> None:
        assert self._stack is not None
        stack = self._stack
        stack.stop_picker()
        stack.cfg.picker_args = args
        self._start_pickers(stack)
        if "envoy" in stack.procs:  # no request until Envoy's health checks pass it again
            wait_until(stack.pickers_healthy_in_envoy, 30, stack.procs["envoy"], "pickers healthy")

    def stop(self) -> None:
        pass  # the stack stops the picker and Envoy with the pods


@contextlib.contextmanager
def _pythonpath(path: Path | None):
    """The stack starts the picker with this process's environment: with `path` first on
    PYTHONPATH, its `infergw` (another commit's) wins over the installed one."""
    if path is None:
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


@dataclass(slots=True)
class ExternalRouter:
    """A router from PyPI started in front of the fleet with the flags any user must set:
    the worker URLs, the policy, and for kv_aware the pods' KV-event sockets."""

    name: str
    policy: str
    _proc: subprocess.Popen | None = None

    def start(self, stack: LocalStack) -> str:
        port = free_port()
        cmd = self.command(port, stack)
        log = open(stack.cfg.workdir / f"{self.name}.log", "wb")
        self._proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        url = f"http://127.0.0.1:{port}"
        self.wait_ready(url, len(stack.pod_addresses))
        return url

    def command(self, port: int, stack: LocalStack) -> list[str]:
        raise NotImplementedError

    def wait_ready(self, url: str, pods: int) -> None:
        assert self._proc is not None
        wait_http(url + "/health", 60, self._proc)

    def pids(self) -> dict[str, int]:
        return {"router": self._proc.pid} if self._proc else {}

    def scraping(self) -> Scraping | None:
        return None  # its scraping is not told apart from its requests

    def idle_baseline(self, seconds: float) -> dict[str, float]:
        """CPU seconds over `seconds` of no traffic: its health checks and event loops."""
        return cpu_over(self.pids(), seconds)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@dataclass(slots=True)
class VllmRouter(ExternalRouter):
    def command(self, port: int, stack: LocalStack) -> list[str]:
        workers = [f"http://{a}" for a in stack.pod_addresses]
        cmd = [
            _script("vllm-router"),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--prometheus-port", str(free_port()),
            "--worker-urls", *workers,
            "--policy", self.policy,
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip
        if self.policy == "kv_aware":
            p = stack.cfg.ports
            assert p.kv_pub_base is not None, "kv_aware needs pods that bind their KV PUB"
            for rank, w in enumerate(workers):
                cmd += ["--kv-event-source", f"{w}=tcp://127.0.0.1:{p.kv_pub_base + rank}"]
                cmd += [
                    "--kv-event-replay-source",
                    f"{w}=tcp://127.0.0.1:{p.kv_replay_base + rank}",
                ]
            block = _flag(stack.cfg.sim_args, "--block-size", "16")
            cmd += ["--kv-event-block-size", block, "--kv-event-model", stack.cfg.served_model_name]
        return cmd

    def wait_ready(self, url: str, pods: int) -> None:
        ExternalRouter.wait_ready(self, url, pods)  # slots dataclasses lose zero-arg super()
        time.sleep(1.0)  # its first worker health round


@dataclass(slots=True)
class SglangRouter(ExternalRouter):
    def command(self, port: int, stack: LocalStack) -> list[str]:
        _script_module("sglang_router")
        return [
            sys.executable, "-m", "sglang_router.launch_router",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port()),
            "--worker-urls", *[f"http://{a}" for a in stack.pod_addresses],
            "--policy", self.policy,
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip

    def wait_ready(self, url: str, pods: int) -> None:
        """/health answers before the workers are registered: wait for all of them."""
        import json
        import urllib.request

        ExternalRouter.wait_ready(self, url, pods)  # slots dataclasses lose zero-arg super()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/readiness", timeout=2) as resp:
                    if json.loads(resp.read()).get("healthy_workers", 0) >= pods:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"sglang-router at {url} never saw {pods} healthy workers")


def EXTERNAL_ROUTERS() -> list[ExternalRouter]:
    return [
        VllmRouter("vllm-router-kv_aware", "kv_aware"),
        VllmRouter("vllm-router-cache_aware", "cache_aware"),
        VllmRouter("vllm-router-round_robin", "round_robin"),
        SglangRouter("sglang-router-cache_aware", "cache_aware"),
    ]


def _flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def _script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RouterUnavailable(f"{name} is not installed (pip install -e '.[bench-routers]')")
    return found


def _script_module(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RouterUnavailable(f"{module} is not installed (pip install -e '.[bench-routers]')")
