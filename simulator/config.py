"""Command-line flags, named like vLLM's so a manifest can swap one server for the other."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from infergw.api import logs, version
from infergw.simulator.latency import LatencyModel
from infergw.simulator.latency_profiles import DEFAULT_PROFILE, PROFILES
from infergw.simulator.vllm_flags import add_ignored_flags, ignored_given


@dataclass(slots=True)
class KVEventsConfig:
    """vLLM's KVEventsConfig: the same JSON keys and defaults."""

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"--kv-events-config has unknown keys: {sorted(unknown)}")
        cfg = cls(**raw)
        if cfg.enable_kv_cache_events and raw.get("publisher") is None:
            cfg.publisher = (
                "zmq"  # vLLM picks zmq when events are enabled and no publisher is named
            )
        if cfg.publisher not in ("zmq", "null"):
            raise ValueError(
                f"--kv-events-config publisher must be 'zmq' or 'null', got {cfg.publisher!r}"
            )
        return cfg

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


KV_ROLES = ("prefill", "decode", "both")
# vLLM's kv_transfer_config.kv_role values, as our roles.
VLLM_KV_ROLES = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}
# VLLM_NIXL_ABORT_REQUEST_TIMEOUT's default: how long a prefill pod keeps KV nobody pulled.
DEFAULT_KV_HOLD_SECONDS = 480.0


@dataclass(slots=True)
class KVTransferConfig:
    """P/D disaggregation as vLLM's NixlConnector does it (see simulator/kv_transfer.py)."""

    role: str = "both"
    # Set by --kv-transfer-config or --kv-role: without it the pod has no KV connector and
    # ignores kv_transfer_params, as vLLM does.
    connector: bool = False
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    hold_seconds: float = DEFAULT_KV_HOLD_SECONDS
    load_failure_policy: str = "fail"  # vLLM's kv_load_failure_policy: "fail" or "recompute"
    # Where decode pods reach this pod's KV side channel (remote_host in kv_transfer_params):
    # VLLM_NIXL_SIDE_CHANNEL_HOST as in vLLM, else --host unless that is a wildcard.
    side_channel_host: str | None = None


def parse_kv_transfer_config(text: str) -> dict:
    """The parts of vLLM's --kv-transfer-config the simulator uses (other keys are ignored)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-transfer-config is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("--kv-transfer-config must be a JSON object")
    out: dict = {}
    connector = raw.get("kv_connector")
    if connector is not None and connector != "NixlConnector":
        raise ValueError(
            f"--kv-transfer-config kv_connector {connector!r}: the simulator only behaves like "
            "vLLM's NixlConnector"
        )
    role = raw.get("kv_role")
    if role is not None:
        if role not in VLLM_KV_ROLES:
            raise ValueError(
                f"--kv-transfer-config kv_role must be one of {sorted(VLLM_KV_ROLES)}, got {role!r}"
            )
        out["role"] = VLLM_KV_ROLES[role]
    if raw.get("engine_id") is not None:
        out["engine_id"] = str(raw["engine_id"])
    policy = raw.get("kv_load_failure_policy")
    if policy is not None:
        if policy not in ("fail", "recompute"):
            raise ValueError(
                "--kv-transfer-config kv_load_failure_policy must be 'fail' or 'recompute', "
                f"got {policy!r}"
            )
        out["load_failure_policy"] = policy
    return out


@dataclass(slots=True)
class LoraModule:
    name: str
    path: str
    base_model_name: str | None = None


@dataclass(slots=True)
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None
    served_model_name: list[str] = field(default_factory=list)
    block_size: int = 16
    num_gpu_blocks: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    enable_prompt_tokens_details: bool = True
    # vLLM's --fingerprint-mode/--fingerprint-value: the answers' system_fingerprint.
    fingerprint_mode: str = "full"
    fingerprint_value: str | None = None
    trust_request_chat_template: bool = False
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    kv_events_format: str = "map"
    kv_events_bind_pub: bool = False  # bind the PUB to a concrete address (simulator only)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    enable_lora: bool = False
    lora_modules: list[LoraModule] = field(default_factory=list)
    max_loras: int = 1
    seed: int = 0
    engine: str = "vllm"
    output_len_mean: float = 0.0
    latency: LatencyModel = field(default_factory=LatencyModel)
    log: logs.LogSettings = field(default_factory=logs.LogSettings)
    headless: bool = False  # a worker node of a multi-node engine: no server
    # A model named by id with no local files (a Hugging Face repo): its name is served.
    model_id: str | None = None
    warnings: tuple[str, ...] = ()  # said at start: flags accepted that change nothing

    @property
    def model_name(self) -> str:
        """The name clients use: the first served name, else the model path as vLLM does."""
        if self.served_model_name:
            return self.served_model_name[0]
        return self.model or self.model_id or "infergate-sim"


def _parse_lora_module(text: str) -> LoraModule:
    # vLLM accepts `name=path` or a JSON object {"name", "path", "base_model_name"}; the
    # simulator also a bare name (it has no weights to find).
    if text.lstrip().startswith("{"):
        raw = json.loads(text)
        if not isinstance(raw, dict) or "name" not in raw or "path" not in raw:
            raise argparse.ArgumentTypeError("a JSON --lora-modules entry needs 'name' and 'path'")
        return LoraModule(str(raw["name"]), str(raw["path"]), raw.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep and name:  # a bare name: the simulator loads no weights, so none is needed
        return LoraModule(name, name)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules entry {text!r} is not name=path")
    return LoraModule(name, path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# Flags that override one term of the latency profile: (flag, LatencyModel field, seconds per
# flag unit, help). Their defaults are the profile's.
LATENCY_FLAGS = (
    (
        "--sim-prefill-us-per-token",
        "prefill_s_per_token",
        1e-6,
        "prefill time per uncached prompt token, microseconds",
    ),
    (
        "--sim-decode-ms-per-step",
        "decode_s_per_step",
        1e-3,
        "decode time of one engine step with a single sequence; roofline: the weight read "
        "every step pays, ms",
    ),
    (
        "--sim-decode-ms-per-seq",
        "decode_s_per_seq",
        1e-3,
        "extra decode time per running sequence in the batch; roofline: its compute, ms",
    ),
    ("--sim-step-overhead-ms", "step_overhead_s", 1e-3, "fixed cost of every engine step, ms"),
    (
        "--sim-kv-read-ns-per-token",
        "kv_read_s_per_token",
        1e-9,
        "time to read one context token's KV in a step, nanoseconds",
    ),
    (
        "--sim-attention-ns-per-pair",
        "attention_s_per_pair",
        1e-9,
        "attention compute per (new token, earlier token) pair: the quadratic prompt term, "
        "nanoseconds",
    ),
)
_UNIT_NAMES = {1e-3: "MS", 1e-6: "US", 1e-9: "NS"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate simulate",
        description="A vLLM-compatible model server without GPUs: real tokenizer, real KV events "
        "and metrics formats, simulated timing.",
    )
    serving = p.add_argument_group("Serving (vLLM's frontend flags)")
    scheduling = p.add_argument_group("Scheduling")
    kv = p.add_argument_group("KV cache")
    pd = p.add_argument_group("Prefill/decode disaggregation")
    lora = p.add_argument_group("LoRA adapters")
    logging_group = p.add_argument_group("Logging")
    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as in `vllm serve MODEL` (overrides --model)",
    )
    serving.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serving.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    serving.add_argument(
        "--model",
        default=None,
        help="a model directory with tokenizer.json, or a model id (a Hugging Face repo: "
        "served under that name with the simulator's own tokenizer, as nothing is downloaded); "
        "default: the small tokenizer shipped with infergate",
    )
    serving.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        help="the names the model answers to (default: the model's own)",
    )
    kv.add_argument(
        "--block-size",
        type=_positive_int,
        default=16,
        help="tokens in a KV-cache block (default: %(default)s)",
    )
    kv.add_argument(
        "--num-gpu-blocks-override",
        type=_positive_int,
        default=4096,
        help="KV capacity in blocks (the simulator has no GPU memory to size it from; "
        "default: %(default)s)",
    )
    scheduling.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=256,
        help="requests in one step at most (default: %(default)s)",
    )
    scheduling.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=8192,
        help="tokens in one step at most (default: %(default)s)",
    )
    scheduling.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="tokens of prompt and answer at most (default: the model's max_position_embeddings, "
        "else 4096; never above what the KV cache holds)",
    )
    kv.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse cached blocks of a prompt's prefix (default: %(default)s)",
    )
    kv.add_argument(
        "--prefix-caching-hash-algo",
        choices=["sha256", "sha256_cbor"],
        default="sha256",
        help="how blocks are hashed, as vLLM's flag (KV events carry the hashes; default: "
        "%(default)s)",
    )
    serving.add_argument(
        "--enable-prompt-tokens-details",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="report usage.prompt_tokens_details.cached_tokens "
        "(vLLM's default is off; the picker wants it, so ours is on)",
    )
    serving.add_argument(
        "--fingerprint-mode",
        choices=["full", "hash", "custom", "none"],
        default="full",
        help="system_fingerprint in answers: vllm-<version>-<config hash> (full, hash), "
        "--fingerprint-value (custom) or null (none) (default: %(default)s)",
    )
    serving.add_argument(
        "--fingerprint-value", default=None, help="with --fingerprint-mode custom: its value"
    )
    serving.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a chat_template in requests (off: 400, as in vLLM; a template is code "
        "that runs in the server)",
    )
    kv.add_argument("--kv-events-config", default=None, help="vLLM's KVEventsConfig as JSON")
    kv.add_argument(
        "--kv-events-format",
        choices=["map", "array"],
        default="map",
        help="map: events as {'type': ...} maps (vLLM >= 0.26); array: the older "
        "positional encoding (default: %(default)s)",
    )
    pd.add_argument(
        "--kv-role",
        choices=KV_ROLES,
        default=None,
        help="prefill/decode disaggregation role (default both). Every role serves plain "
        "requests, prefill legs and decode legs, as vLLM's NixlConnector does; the role only "
        "counts legs that reach the wrong kind of pod (infergate_sim:kv_role_mismatch_total)",
    )
    pd.add_argument(
        "--kv-transfer-config",
        default=None,
        help="vLLM's KVTransferConfig as JSON: kv_connector (NixlConnector), kv_role "
        "(kv_producer, kv_consumer, kv_both), engine_id, kv_load_failure_policy "
        "(fail, recompute); other keys are ignored",
    )
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        type=_parse_lora_module,
        default=[],
        help="adapters served from the start: NAME=PATH, NAME or vLLM's JSON form",
    )
    lora.add_argument(
        "--max-loras",
        type=_positive_int,
        default=1,
        help="adapters in one step at most (default: %(default)s)",
    )
    scheduling.add_argument(
        "--seed", type=int, default=0, help="random seed of the answers (default: %(default)s)"
    )
    serving.add_argument(
        "--engine",
        choices=["vllm", "sglang"],
        default="vllm",
        help="which engine's metric names /metrics uses (default: %(default)s)",
    )
    logs.add_log_flags(logging_group)
    version.add_version_flag(p)
    serving.add_argument(
        "--headless",
        action="store_true",
        help="a worker node of a multi-node engine (vLLM's flag): serve nothing, run until stopped",
    )
    sim = p.add_argument_group(
        "Latency model (simulator only)",
        "A profile sets every term; each flag below overrides its profile's value "
        "(README: Latency profiles).",
    )
    sim.add_argument(
        "--sim-latency-profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="named step-time model: "
        + "; ".join(f"{p.name}: {p.summary}" for p in PROFILES.values()),
    )
    default_model = PROFILES[DEFAULT_PROFILE].model
    for flag, field_, scale, help_text in LATENCY_FLAGS:
        default = getattr(default_model, field_) / scale
        sim.add_argument(
            flag,
            dest=field_,
            metavar=_UNIT_NAMES[scale],
            type=float,
            default=None,
            help=f"{help_text} (default: the profile's; {DEFAULT_PROFILE}: {default:g})",
        )
    sim.add_argument(
        "--sim-roofline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="combine the terms as a roofline (max of compute and memory time) rather than "
        "adding them (default: the profile's)",
    )
    sim.add_argument(
        "--sim-kv-transfer-ms-per-block",
        type=float,
        default=None,
        help="time a decode pod takes to pull one KV block from a prefill pod, ms (the pull "
        "runs beside the engine's steps and replaces the prefill of those tokens; default: "
        "the profile's, 0.1 for sim-default)",
    )
    sim.add_argument(
        "--sim-kv-hold-seconds",
        type=float,
        default=None,
        help="how long a prefill pod keeps (pins) the KV of a finished prefill leg for a "
        "decode pod to pull; then the blocks are freed and a late pull fails (default: "
        "VLLM_NIXL_ABORT_REQUEST_TIMEOUT if set, else 480 as in vLLM; wall-clock seconds, "
        "not scaled by --sim-time-scale)",
    )
    sim.add_argument(
        "--sim-output-len-mean",
        type=float,
        default=0.0,
        help="mean length at which answers end with EOS (finish_reason 'stop'), drawn per "
        "request; 0 (default) never ends early, like a random-weight model: max_tokens decides",
    )
    sim.add_argument(
        "--sim-kv-events-bind",
        action="store_true",
        help="bind the KV-event PUB to its endpoint even when it names one address (vLLM "
        "binds only '*', '::' and ipc endpoints): per-pod subscribers on one machine can then "
        "reach each pod on loopback",
    )
    sim.add_argument(
        "--sim-time-scale",
        type=float,
        default=1.0,
        help="multiply every simulated duration (0 runs as fast as possible; default: %(default)s)",
    )
    add_ignored_flags(p)
    return p


def parse_config(argv: list[str] | None = None) -> SimulatorConfig:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `vllm serve MODEL ...` with the simulator put in vllm's place
        argv = argv[1:]
    args = parser.parse_args(argv)
    warnings = [
        f"{flag} is accepted and changes nothing in a simulation" for flag in ignored_given(args)
    ]
    model_dir, model_id = _model(parser, args.model_tag or args.model)
    if model_id is not None:
        warnings.append(
            f"model {model_id!r} is not a local directory: served under that name with the "
            "simulator's own tokenizer (token counts differ from the real model's)"
        )
    try:
        kv_events = (
            KVEventsConfig.from_json(args.kv_events_config)
            if args.kv_events_config
            else KVEventsConfig()
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    if args.num_gpu_blocks_override < 2:
        parser.error(
            "--num-gpu-blocks-override must be at least 2: block 0 is reserved (vLLM's null "
            "block), so 1 leaves no room for a single token"
        )
    if args.sim_time_scale < 0:
        parser.error("--sim-time-scale must be >= 0")
    negative = [flag for flag, field_, _, _ in LATENCY_FLAGS if (getattr(args, field_) or 0) < 0]
    if negative:
        parser.error(f"{', '.join(negative)} must be >= 0")
    if args.sim_output_len_mean < 0:
        parser.error("--sim-output-len-mean must be >= 0")
    try:
        kv_transfer = _kv_transfer_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        model=model_dir,
        model_id=model_id,
        served_model_name=list(args.served_model_name),
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks_override,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_caching_hash_algo=args.prefix_caching_hash_algo,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        fingerprint_mode=args.fingerprint_mode,
        fingerprint_value=args.fingerprint_value,
        trust_request_chat_template=args.trust_request_chat_template,
        kv_events=kv_events,
        kv_events_format=args.kv_events_format,
        kv_events_bind_pub=args.sim_kv_events_bind,
        kv_transfer=kv_transfer,
        enable_lora=args.enable_lora,
        lora_modules=list(args.lora_modules),
        max_loras=args.max_loras,
        seed=args.seed,
        engine=args.engine,
        output_len_mean=args.sim_output_len_mean,
        latency=_latency_model(args),
        log=logs.settings_from_args(args),
        headless=args.headless,
        warnings=tuple(warnings),
    )


def _model(parser: argparse.ArgumentParser, given: str | None) -> tuple[str | None, str | None]:
    """(a model directory, a model id) from --model or the positional MODEL: a directory must
    hold tokenizer.json; anything that is not a path here is an id (a Hugging Face repo)."""
    if given is None:
        return None, None
    if Path(given).is_dir():
        if not Path(given, "tokenizer.json").is_file():
            parser.error(
                f"--model {given}: no tokenizer.json in that directory; give a model directory "
                "with one, a Hugging Face model id, or leave --model out (the simulator's own)"
            )
        return given, None
    if Path(given).exists() or given.startswith(("/", "./", "../")):
        parser.error(
            f"--model {given}: not a directory; give a model directory with tokenizer.json, "
            "a Hugging Face model id, or leave --model out (the simulator's own)"
        )
    return None, given


def _latency_model(args: argparse.Namespace) -> LatencyModel:
    """The profile's model with the flags' overrides."""
    overrides = {
        field_: getattr(args, field_) * scale
        for _, field_, scale, _ in LATENCY_FLAGS
        if getattr(args, field_) is not None
    }
    if args.sim_roofline is not None:
        overrides["roofline"] = args.sim_roofline
    if args.sim_kv_transfer_ms_per_block is not None:
        overrides["kv_transfer_s_per_block"] = args.sim_kv_transfer_ms_per_block * 1e-3
    return replace(
        PROFILES[args.sim_latency_profile].model, **overrides, time_scale=args.sim_time_scale
    )


def _kv_transfer_config(args: argparse.Namespace) -> KVTransferConfig:
    fields = parse_kv_transfer_config(args.kv_transfer_config) if args.kv_transfer_config else {}
    if args.kv_role is not None:
        if fields.get("role", args.kv_role) != args.kv_role:
            raise ValueError(
                f"--kv-role {args.kv_role} contradicts --kv-transfer-config's kv_role "
                f"(role {fields['role']})"
            )
        fields["role"] = args.kv_role
    hold = args.sim_kv_hold_seconds
    if hold is None:
        env = os.environ.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT")
        try:
            hold = float(env) if env else DEFAULT_KV_HOLD_SECONDS
        except ValueError as exc:
            raise ValueError(f"VLLM_NIXL_ABORT_REQUEST_TIMEOUT={env!r} is not a number") from exc
    if hold <= 0:
        raise ValueError("--sim-kv-hold-seconds must be > 0")
    if args.sim_kv_transfer_ms_per_block is not None and args.sim_kv_transfer_ms_per_block < 0:
        raise ValueError("--sim-kv-transfer-ms-per-block must be >= 0")
    host = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST") or None
    connector = bool(args.kv_transfer_config) or args.kv_role is not None
    return KVTransferConfig(
        hold_seconds=hold, side_channel_host=host, connector=connector, **fields
    )
