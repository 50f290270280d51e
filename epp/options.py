"""Command-line flags of the picker, named like the reference picker's where one exists."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from infergw.api import logs, version
from infergw.api.cli_help import HelpFormatter
from infergw.api.engine_keys import INDEX_KEYS
from infergw.epp.body_budget import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HELD_BYTES
from infergw.epp.body_deadline import DEFAULT_REQUEST_BODY_TIMEOUT
from infergw.epp.capacity_wait import DEFAULT_CAPACITY_WAIT_TTL
from infergw.epp.reference_flags import add_reference_flags, read_reference_flags
from infergw.epp.response_ids import load_key
from infergw.epp.scrape_pace import (
    DEFAULT_IDLE_INTERVAL,
    DEFAULT_QUIET_INTERVAL,
    DEFAULT_REFRESH_INTERVAL,
)

if TYPE_CHECKING:
    from infergw.kvindex.engine_hashing import EngineHashing

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a namespace or Service name
KV_EVENTS_PORT = 5557


def default_kv_events_bind() -> str:
    """Central mode's SUB: the pod network address (`$POD_IP`, the downward API), else
    loopback; never every interface."""
    host = os.environ.get("POD_IP") or "127.0.0.1"
    return f"tcp://[{host}]:{KV_EVENTS_PORT}" if ":" in host else f"tcp://{host}:{KV_EVENTS_PORT}"


def duration(text: str) -> float:
    """'50ms', '1s', '0.5', '2m' → seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 50ms, 1s)")
    value, unit = float(m.group(1)), m.group(2) or "s"
    return value * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclass(slots=True, frozen=True)
class ServiceRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def service_ref(text: str, default_namespace: str) -> ServiceRef:
    """'[NAMESPACE/]SERVICE' → ServiceRef; ValueError names what is wrong."""
    namespace, _, name = text.strip().rpartition("/")
    namespace = namespace or default_namespace
    for what, value in (("namespace", namespace), ("Service name", name)):
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"{what} {value!r} is not a DNS label (lower case, digits, '-')")
    return ServiceRef(namespace, name)


@dataclass(slots=True)
class PickerOptions:
    host: str
    grpc_port: int
    grpc_health_port: int
    metrics_port: int
    config_file: Path | None
    config_text: str | None
    pool_name: str
    pool_namespace: str
    provider: str
    pool_files: list[Path]
    secure_serving: bool
    cert_path: Path | None
    refresh_metrics_interval: float
    idle_metrics_interval: float
    quiet_metrics_interval: float
    fallback_endpoints: int
    max_body_bytes: int
    max_held_request_bytes: int
    request_body_timeout: float
    subset_filter: bool
    log: logs.LogSettings
    grace_period: float
    kv_events_mode: str
    kv_events_bind: str
    kv_events_pub_port: int
    kv_events_replay_port: int | None
    kv_index_block_size: int
    kv_index_max_entries: int
    tokenizers: dict[str, Path]
    trust_client_headers: bool = False
    response_headers_skipped: bool = False
    trust_model_rewrite_header: bool = False
    enable_debug_endpoints: bool = False
    kv_index_backend: str = "memory"  # memory | redis (kvindex.redis_index)
    kv_index_layout: str = "dict"  # dict (kvindex.dict_index) | packed (kvindex.index)
    # Set: the index is keyed by the engines' own block hashes (kvindex.engine_hashing).
    kv_engine_hashing: EngineHashing | None = None
    kv_index_redis_url: str | None = None
    kv_index_redis_write: bool = True
    kv_index_redis_shard: bool = False  # subscribe to this replica's shard of the pods only
    kv_index_redis_timeout: float = 0.05
    kv_index_redis_ttl: float = 3600.0
    replica_sync_bind: str | None = None
    replica_sync_peers: tuple[str, ...] = ()
    replica_sync_discovery: ServiceRef | None = None
    # With a replica sync: each pod scraped by one replica, heard by the others.
    share_scrapes: bool = False
    # How long a request with no ready endpoint waits for one (epp/capacity_wait.py).
    capacity_wait_ttl: float = DEFAULT_CAPACITY_WAIT_TTL
    # Metrics older than this make a pod stale; None: the scraper's default.
    metrics_staleness_threshold: float | None = None
    # The reference picker's flags given and not applied (epp/reference_flags.py), logged at start.
    reference_warnings: tuple[str, ...] = ()
    # The reference's --tracing: export traces even when no OTEL_* variable asks (api/tracing.py).
    tracing: bool = False
    # The MAC key of the Responses API ids (epp/response_ids.py); None: from the pool's name.
    response_id_key: bytes | None = None


def add_serving_flags(
    p: argparse.ArgumentParser, *, grpc_port: int, health_port: int, metrics_port: int
) -> argparse._ArgumentGroup:
    """Where an ext_proc server listens (--host, its three ports, given their defaults) and
    with what TLS: the picker and the body-based router take the same flags. Returns the
    "Listening" group, for the caller's other flags of that kind."""
    g = p.add_argument_group("Listening")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0 in a pod)")
    g.add_argument("--grpc-port", type=int, default=grpc_port, help="the ext_proc gRPC port")
    g.add_argument(
        "--grpc-health-port", type=int, default=health_port, help="the gRPC health service"
    )
    g.add_argument(
        "--metrics-port", type=int, default=metrics_port, help="/metrics and health over HTTP"
    )
    add_tls_flags(p)
    return g


def add_body_limit_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--max-body-bytes (one request), --max-held-request-bytes (all streams at once) and
    --request-body-timeout (a stalled body), as the picker and the body-based router bound the
    bodies they read. Returns their group."""
    g = p.add_argument_group("Requests and answers")
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="one request's body; a longer one is answered 413",
    )
    g.add_argument(
        "--max-held-request-bytes",
        type=int,
        default=DEFAULT_MAX_HELD_BYTES,
        help="request bytes held at once over all streams (bodies and what parsing keeps); "
        "a request that would exceed it is answered 429 with Retry-After",
    )
    g.add_argument(
        "--request-body-timeout",
        type=duration,
        default=DEFAULT_REQUEST_BODY_TIMEOUT,
        help="longest gap between two parts of a request's body (as nginx's "
        "client_body_timeout): a body that stalls longer is answered 408 and its stream "
        "ends; the wait in the queue and the answer are not bounded by it; 0: no bound "
        "(epp/body_deadline.py)",
    )
    return g


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """--secure-serving and --cert-path, as the picker and the body-based router take them."""
    g = p.add_argument_group("TLS")
    g.add_argument(
        "--secure-serving",
        type=boolean,
        default=True,
        nargs="?",
        const=True,
        help="TLS on the ext_proc port (default true; --secure-serving=false)",
    )
    g.add_argument(
        "--cert-path",
        type=Path,
        help="directory with tls.crt and tls.key (default: a self-signed certificate)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate epp",
        description="The endpoint picker: an Envoy ext_proc server.",
        formatter_class=HelpFormatter,
    )
    listening = add_serving_flags(p, grpc_port=9002, health_port=9003, metrics_port=9090)
    pool = p.add_argument_group("Pool and pods")
    scheduling = p.add_argument_group("Scheduling")
    scheduling.add_argument(
        "--config",
        "--config-file",
        dest="config_file",
        type=Path,
        help="EndpointPickerConfig YAML (default: queue 2, kv-cache 2, prefix 3)",
    )
    scheduling.add_argument("--config-text", help="EndpointPickerConfig YAML given inline")
    pool.add_argument("--pool-name", required=True, help="the InferencePool this picker serves")
    pool.add_argument("--pool-namespace", default="default", help="the InferencePool's namespace")
    pool.add_argument(
        "--provider",
        choices=["file", "kubernetes"],
        default="kubernetes",
        help="where the pool and its pods come from: the API server, or --pool-file",
    )
    pool.add_argument(
        "--pool-file",
        dest="pool_files",
        type=Path,
        action="append",
        default=[],
        help="with --provider file: YAML file or directory with the InferencePool "
        "and its Pods (repeatable); reloaded on change",
    )
    pool.add_argument(
        "--refresh-metrics-interval",
        type=duration,
        default=DEFAULT_REFRESH_INTERVAL,
        help="how often each pod's /metrics is read (seconds, or 50ms, 1s…)",
    )
    pool.add_argument(
        "--idle-metrics-interval",
        type=duration,
        default=DEFAULT_IDLE_INTERVAL,
        help="scrape a pod this seldom while it is idle and the picker sends it nothing "
        "(epp/scrape_pace.py); at most --refresh-metrics-interval: always the fast interval",
    )
    pool.add_argument(
        "--quiet-metrics-interval",
        type=duration,
        default=DEFAULT_QUIET_INTERVAL,
        help="scrape a busy pod this seldom while the picker sends it nothing; kept one "
        "--refresh-metrics-interval below the staleness bounds (epp/scrape_pace.py); at most "
        "--refresh-metrics-interval: busy pods always at the fast interval",
    )
    scheduling.add_argument(
        "--fallback-endpoints",
        type=int,
        default=1,
        help="endpoints after the primary in the destination list",
    )
    bodies = add_body_limit_flags(p)
    scheduling.add_argument(
        "--capacity-wait-ttl",
        type=duration,
        default=DEFAULT_CAPACITY_WAIT_TTL,
        help="how long a request waits when no endpoint of the pool is ready (scaled to zero, "
        "pods starting) before 503 with Retry-After; 0: answer 503 at once "
        "(epp/capacity_wait.py)",
    )
    scheduling.add_argument(
        "--disable-endpoint-subset-filter",
        action="store_true",
        help="ignore the proxy's endpoint subset hint (x-gateway-destination-endpoint-subset)",
    )
    bodies.add_argument(
        "--response-headers-skipped",
        action="store_true",
        help="the proxy sends the picker nothing of the response (response_header_mode SKIP, "
        "response bodies NONE): a stream that ends after the request went on counts as "
        "answered, its status unknown, instead of as cancelled",
    )
    bodies.add_argument(
        "--response-id-key-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="the key (16 bytes or more) that signs the Responses API ids the picker gives "
        "clients, which name the pod that stored each response; every replica of the pool "
        "needs the same one (default: derived from the pool's name, so ids cannot be moved "
        "to another pool but could be made up to pick a pod of this one)",
    )
    trust = p.add_argument_group("Trust and debugging (epp/trust.py)")
    trust.add_argument(
        "--trust-client-headers",
        action="store_true",
        help="honour clients' x-gateway-inference-objective and x-gateway-inference-fairness-id "
        "(closed networks only; otherwise they come from the verified user and the config's "
        "users section)",
    )
    trust.add_argument(
        "--trust-model-rewrite-header",
        action="store_true",
        help="honour x-gateway-model-name-rewrite (only when the gateway sets it and removes "
        "clients' copies)",
    )
    trust.add_argument(
        "--enable-debug-endpoints",
        action="store_true",
        help="serve /debug/* on the metrics port (what the picker knows about pods, prefix "
        "scores, P/D decisions); off by default",
    )
    listening.add_argument(
        "--grace-period",
        type=duration,
        default=25.0,
        help="after SIGTERM: how long in-flight ext_proc streams may take to finish while "
        "health says NOT_SERVING and new streams are refused (default 25s: the rest of the "
        "shutdown fits in the kubelet's 30s terminationGracePeriodSeconds)",
    )
    kv = p.add_argument_group("KV cache (KV events and the index the precise prefix scorer reads)")
    replicas = p.add_argument_group("Replicas (several pickers side by side)")
    kv.add_argument(
        "--kv-events-mode",
        choices=["central", "per-pod"],
        default="central",
        help="central: bind one SUB that pods' PUBs connect to; per-pod: connect to each pod's PUB",
    )
    kv.add_argument(
        "--kv-events-bind",
        default=default_kv_events_bind(),
        help="central mode: the SUB's endpoint (default tcp://$POD_IP:5557, else 127.0.0.1)",
    )
    kv.add_argument(
        "--kv-events-pub-port",
        type=int,
        default=KV_EVENTS_PORT,
        help="per-pod mode: a pod's PUB port for rank 0 (rank r adds r)",
    )
    kv.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=None,
        help="a pod's replay (ROUTER) port for rank 0 (rank r adds r); unset: no replay",
    )
    replicas.add_argument(
        "--replica-sync-bind",
        default=None,
        help="several picker replicas: bind a ZMQ PUB here (tcp://host:port) that tells the "
        "other replicas this one's recent decisions (speculative KV entries, the approximate "
        "prefix scorer's records) so they choose alike (default: not shared)",
    )
    replicas.add_argument(
        "--replica-sync-peers",
        default="",
        help="the other replicas' --replica-sync-bind endpoints, comma-separated (this one's "
        "own is skipped, so every replica may get the same list)",
    )
    replicas.add_argument(
        "--replica-sync-discovery",
        default=None,
        metavar="[NAMESPACE/]SERVICE",
        help="in a cluster, instead of --replica-sync-peers: the other replicas are the ready "
        "endpoints of this headless Service's port named replica-sync, watched through its "
        "EndpointSlices (needs list/watch on endpointslices; namespace default: "
        "--pool-namespace); endpoints at $POD_IP or the bind are this replica and skipped",
    )
    replicas.add_argument(
        "--share-scrapes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --replica-sync-bind: each pod's /metrics is scraped by one replica and its "
        "numbers shared with the others, instead of by every replica (epp/scrape_shares.py; "
        "default: on with a replica sync)",
    )
    kv.add_argument(
        "--kv-index-block-size", type=int, default=16, help="tokens a block of the index holds"
    )
    kv.add_argument(
        "--kv-index-max-entries",
        type=int,
        default=5_000_000,
        help="(block, pod) entries the index keeps; past it the least recent go",
    )
    kv.add_argument(
        "--kv-index-layout",
        choices=["dict", "packed"],
        default="dict",
        help="dict: faster lookups and ingestion; packed: about a third of the memory per "
        "(block, pod), for large fleets (README: bench/kvindex)",
    )
    kv.add_argument(
        "--kv-index-keys",
        choices=INDEX_KEYS,
        default="tokens",
        help="tokens: the index keys blocks by their token ids (needs nothing of the engines); "
        "engine: by the engines' own block hashes, which the picker computes as vLLM does: no "
        "per-pod hash map (less memory, faster ingestion), but the engines' hashing must be "
        "given (--kv-engine-hash-algo, --kv-engine-hash-seed, --kv-index-block-size = their "
        "--block-size, --kv-engine-lora-path); a mismatch is logged and counted",
    )
    kv.add_argument(
        "--kv-engine-hash-algo",
        default="sha256",
        metavar="ALGO",
        help="with --kv-index-keys engine: the engines' --prefix-caching-hash-algo (sha256, "
        "sha256_cbor, xxhash, xxhash_cbor)",
    )
    kv.add_argument(
        "--kv-engine-hash-seed",
        default=None,
        metavar="SEED",
        help="with --kv-index-keys engine: the engines' PYTHONHASHSEED (default: unset, as "
        "vLLM then roots sha256 hashes in a fixed seed; xxhash ones need it)",
    )
    kv.add_argument(
        "--kv-engine-lora-path",
        action="append",
        default=[],
        metavar="ADAPTER=PATH",
        help="with --kv-index-keys engine: the path a LoRA adapter was loaded from on the "
        "engines (vLLM hashes it); prompts of adapters without one get no index hits "
        "(repeatable)",
    )
    kv.add_argument(
        "--kv-index-backend",
        choices=["memory", "redis"],
        default="memory",
        help="memory: this picker's own index; redis: one index shared by every replica in "
        "Redis/Valkey (--kv-index-redis-url)",
    )
    kv.add_argument(
        "--kv-index-redis-url",
        default=None,
        metavar="HOST:PORT",
        help="the shared index's Redis (redis://HOST:PORT or HOST:PORT; standalone, not a "
        "cluster); may be the rate limits' Redis",
    )
    kv.add_argument(
        "--kv-index-redis-write",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subscribe to KV events and write them to the shared index (default); with "
        "--no-kv-index-redis-write this replica only reads: no subscription, no index in memory",
    )
    kv.add_argument(
        "--kv-index-redis-shard",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="several replicas writing the shared index (per-pod KV events): each subscribes "
        "only to its shard of the pods, by rendezvous hashing over the replicas it hears on "
        "the replica sync (--replica-sync-bind and its peers); a replica's pods move to the "
        "others within seconds of its last heartbeat (README: Several pickers)",
    )
    kv.add_argument(
        "--kv-index-redis-timeout",
        type=duration,
        default=0.05,
        help="a lookup's deadline in the shared index; past it the prompt scores no hits "
        "(default 50ms)",
    )
    kv.add_argument(
        "--kv-index-redis-ttl",
        type=duration,
        default=3600.0,
        help="how long a block stays in the shared index after its last write (default 1h)",
    )
    scheduling.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="MODEL=DIR",
        help="the tokenizer directory for a served model name (repeatable)",
    )
    # -v: the reference's (epp/reference_flags.py), not ours.
    logs.add_log_flags(p.add_argument_group("Logging"), verbose_flag=False)
    add_reference_flags(p)
    version.add_version_flag(p)
    return p


def parse_options(argv: list[str] | None = None) -> PickerOptions:
    p = build_parser()
    a = p.parse_args(argv)
    ref = read_reference_flags(p, a)
    try:
        staleness = duration(ref.staleness) if ref.staleness is not None else None
        if ref.drain is not None:
            a.grace_period = duration(ref.drain)
    except argparse.ArgumentTypeError as exc:
        p.error(f"--metrics-staleness-threshold / --drain-timeout: {exc}")
    log = logs.settings(a.log_format or ref.log_format, a.log_level or ref.log_level, ref.verbosity)
    if staleness is not None and staleness <= 0:
        p.error("--metrics-staleness-threshold must be > 0")
    if a.config_file and a.config_text:
        p.error("give --config or --config-text, not both")
    if a.provider == "file" and not a.pool_files:
        p.error("--provider file needs --pool-file (the pool and its pods as YAML)")
    if a.fallback_endpoints < 0:
        p.error("--fallback-endpoints must be >= 0")
    tokenizers = {}
    for item in a.tokenizer:
        model, sep, directory = item.partition("=")
        if not sep or not model or not directory:
            p.error(f"--tokenizer {item!r}: give it as MODEL=DIR")
        if not Path(directory, "tokenizer.json").is_file():
            p.error(
                f"--tokenizer {item!r}: no tokenizer.json in {directory} (infergate fetch "
                "tokenizer --source URI --dest DIR fetches a model's)"
            )
        tokenizers[model] = Path(directory)
    if a.kv_index_block_size < 1:
        p.error("--kv-index-block-size must be >= 1")
    engine_hashing = _engine_hashing(p, a)
    if a.kv_index_backend == "redis" and not a.kv_index_redis_url:
        p.error("--kv-index-backend redis needs --kv-index-redis-url")
    if a.kv_index_redis_shard and (
        a.kv_index_backend != "redis" or not a.kv_index_redis_write or a.kv_events_mode != "per-pod"
    ):
        p.error(
            "--kv-index-redis-shard needs --kv-index-backend redis, --kv-index-redis-write "
            "and --kv-events-mode per-pod (central mode has one subscriber already)"
        )
    if a.kv_index_redis_timeout <= 0 or a.kv_index_redis_ttl <= 0:
        p.error("--kv-index-redis-timeout and --kv-index-redis-ttl must be > 0")
    if a.share_scrapes and not a.replica_sync_bind:
        p.error("--share-scrapes needs --replica-sync-bind (the replicas share on it)")
    response_id_key = None
    if a.response_id_key_file is not None:
        try:
            response_id_key = load_key(a.response_id_key_file)
        except OSError as exc:
            p.error(f"--response-id-key-file: cannot read it ({exc.strerror}); give a readable one")
        except ValueError as exc:
            p.error(f"--response-id-key-file: {exc}")
    discovery = None
    if a.replica_sync_discovery is not None:
        if not a.replica_sync_bind:
            p.error("--replica-sync-discovery needs --replica-sync-bind")
        if a.replica_sync_peers.strip():
            p.error("give --replica-sync-peers or --replica-sync-discovery, not both")
        try:
            discovery = service_ref(a.replica_sync_discovery, a.pool_namespace)
        except ValueError as exc:
            p.error(f"--replica-sync-discovery {a.replica_sync_discovery!r}: {exc}")
    return PickerOptions(
        host=a.host,
        grpc_port=a.grpc_port,
        grpc_health_port=a.grpc_health_port,
        metrics_port=a.metrics_port,
        config_file=a.config_file,
        config_text=a.config_text,
        pool_name=a.pool_name,
        pool_namespace=a.pool_namespace,
        provider=a.provider,
        pool_files=a.pool_files,
        secure_serving=a.secure_serving,
        cert_path=a.cert_path,
        refresh_metrics_interval=a.refresh_metrics_interval,
        idle_metrics_interval=a.idle_metrics_interval,
        quiet_metrics_interval=a.quiet_metrics_interval,
        fallback_endpoints=a.fallback_endpoints,
        max_body_bytes=a.max_body_bytes,
        max_held_request_bytes=a.max_held_request_bytes,
        request_body_timeout=a.request_body_timeout,
        subset_filter=not a.disable_endpoint_subset_filter,
        log=log,
        grace_period=a.grace_period,
        kv_events_mode=a.kv_events_mode,
        kv_events_bind=a.kv_events_bind,
        kv_events_pub_port=a.kv_events_pub_port,
        kv_events_replay_port=a.kv_events_replay_port,
        kv_index_block_size=a.kv_index_block_size,
        kv_index_max_entries=a.kv_index_max_entries,
        replica_sync_bind=a.replica_sync_bind,
        replica_sync_peers=tuple(p.strip() for p in a.replica_sync_peers.split(",") if p.strip()),
        replica_sync_discovery=discovery,
        share_scrapes=bool(a.replica_sync_bind) and a.share_scrapes is not False,
        capacity_wait_ttl=a.capacity_wait_ttl,
        metrics_staleness_threshold=staleness,
        reference_warnings=ref.warnings,
        tracing=a.ref_tracing,
        response_id_key=response_id_key,
        tokenizers=tokenizers,
        trust_client_headers=a.trust_client_headers,
        response_headers_skipped=a.response_headers_skipped,
        trust_model_rewrite_header=a.trust_model_rewrite_header,
        enable_debug_endpoints=a.enable_debug_endpoints,
        kv_index_backend=a.kv_index_backend,
        kv_index_layout=a.kv_index_layout,
        kv_engine_hashing=engine_hashing,
        kv_index_redis_url=a.kv_index_redis_url,
        kv_index_redis_write=a.kv_index_redis_write,
        kv_index_redis_shard=a.kv_index_redis_shard,
        kv_index_redis_timeout=a.kv_index_redis_timeout,
        kv_index_redis_ttl=a.kv_index_redis_ttl,
    )


def _engine_hashing(p: argparse.ArgumentParser, a: argparse.Namespace) -> EngineHashing | None:
    """--kv-index-keys engine's settings, checked; None for token keys."""
    engine_flags = a.kv_engine_hash_seed is not None or a.kv_engine_lora_path
    if a.kv_index_keys != "engine":
        if engine_flags or a.kv_engine_hash_algo != "sha256":
            p.error("--kv-engine-* flags need --kv-index-keys engine")
        return None
    # Imported here: bbr parses these options too and may not import kvindex (tests/test_layout).
    from infergw.kvindex.engine_hashing import EngineHashing

    paths = {}
    for item in a.kv_engine_lora_path:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--kv-engine-lora-path {item!r}: give it as ADAPTER=PATH")
        paths[name] = path
    try:
        return EngineHashing(
            algo=a.kv_engine_hash_algo,
            seed=a.kv_engine_hash_seed,
            block_size=a.kv_index_block_size,
            lora_paths=paths,
        )
    except ValueError as exc:
        p.error(f"--kv-index-keys engine: {exc}")
