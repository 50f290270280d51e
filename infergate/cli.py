"""`infergate`: one command for every part (`infergate epp`, `infergate simulate ...`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

USAGE = """\
usage: infergate <command> [args...]    (infergate <command> --help: its options)
       infergate --version              the version and the git commit it was built from

The commands that run a process take --log-format text|json, --log-level, -v/-vv and
--version (README: Logs and version).

Run the gateway on this machine:
  up           the local stack from an example directory: pods, pickers, Envoy
               (infergate up examples/quickstart)
  status       one screen of the local stack's pickers or a cluster namespace: pods, load,
               KV use, cached-token share, queue, errors (--once: plain text, for scripts)

Install in a cluster:
  install      print the cluster install for `kubectl apply -f -` (--namespace, --gateway;
               --upstream-crds: the upstream CRDs alone, to create where the cluster has none)
  controllers  reconcile Models, ModelInfers and autoscaling (python -m infergw.controllers)

The gateway's parts (each a process; the controllers start them):
  epp          the endpoint picker, an Envoy ext_proc server (python -m infergw.epp)
  bbr          body-based routing: the body's model -> the InferencePool's header, an ext_proc
               server in front of the pickers (python -m infergw.bbr)
  connector    the P/D sidecar: prefill remotely, decode locally (python -m infergw.connector)
  runtime      the sidecar beside an engine: loads and unloads the Model's LoRA adapters
               through the engine's API, its /ready the pod's readiness
               (python -m infergw.runtime)

Models and engines:
  simulate     a vLLM-compatible model server without GPUs (python -m infergw.simulator)
  download     a model's weights into the shared cache, resumable and verified, --dest a link
               to them (python -m infergw.fetch.download)
  fetch        fetch tokenizer: a model's tokenizer files from hf:// or s3://, for the picker
               (python -m infergw.fetch)

Measuring:
  bench        run a benchmark under bench/ (infergate bench --help lists them)
"""

# Benchmarks by name, as module paths: the launcher finds them, they never import it.
BENCHMARKS = {
    "simulator": "infergw.bench.simulator",
    "epp_overhead": "infergw.bench.epp_overhead",
    "kvindex": "infergw.bench.kvindex",
    "kvindex_redis": "infergw.bench.kvindex_redis",
    "kvindex_floor": "infergw.bench.kvindex_floor",
    "routing": "infergw.bench.routing.cli",
    "fairness": "infergw.bench.fairness.cli",
    "pd": "infergw.bench.pd.cli",
    "soak": "infergw.bench.soak",
    "scrape_cost": "infergw.bench.scrape_cost",
    "pickers": "infergw.bench.pickers",
}


# What the `bench` extra brings that benchmarks import (pyproject.toml): checked before a
# benchmark runs, since they import them late (plotting at the end of a long run).
BENCH_EXTRA_MODULES = ("matplotlib", "rich")
BENCH_EXTRA_MISSING = 3  # the exit status when they are not installed
# Benchmarks record into the checkout (bench/results, docs/benchmarks) and some replay its
# test recordings (tests/fixtures): from an installed wheel they refuse with this status.
BENCH_NEEDS_CHECKOUT = 4


def missing_bench_modules() -> list[str]:
    return [m for m in BENCH_EXTRA_MODULES if importlib.util.find_spec(m) is None]


BENCH_USAGE = """\
usage: infergate bench <benchmark> [flags]    (infergate bench <benchmark> --help: its flags)

  simulator      concurrent streams and output tokens/s one simulator process sustains
  epp_overhead   what the picker costs per request, beside a minimal ext_proc server
  routing        every router, workload and rate on the same fleet and seed
  fairness       tenants contending for one pod, with and without flow control
  pd             TTFT and TPOT, aggregated against prefill/decode disaggregated serving
  pickers        requests per second with 1, 2 and 4 pickers
  soak           steady load while pods, the picker, the pool file and Redis fail
  kvindex        the KV-cache index: ingestion, lookup latency, memory, tokenization
  kvindex_redis  the shared KV index in Redis against the in-memory one
  kvindex_floor  the one-table index's storage floor (a prototype that needs numba)
  scrape_cost    what scraping idle pods costs the pods and the picker
"""


def run_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(BENCH_USAGE)
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(
            f"infergate bench: no benchmark {argv[0]!r}; one of {', '.join(BENCHMARKS)} "
            "(infergate bench --help says what each measures)",
            file=sys.stderr,
        )
        return 2
    missing = missing_bench_modules()
    if missing:
        print(
            f"infergate bench needs the `bench` extra ({', '.join(missing)} not installed): "
            "pip install 'infergw[bench]' (or the wheel/checkout with [bench])",
            file=sys.stderr,
        )
        return BENCH_EXTRA_MISSING
    from infergw.bench.common import ROOT

    if not (ROOT / "pyproject.toml").is_file():
        print(
            "infergate bench runs from a checkout (git clone, then pip install -e '.[bench]'): "
            f"benchmarks write into its bench/results and read its tests/fixtures ({ROOT} is "
            "an installed package)",
            file=sys.stderr,
        )
        return BENCH_NEEDS_CHECKOUT
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        from infergw.api.version import describe

        print(describe())
        return 0
    command, rest = args[0], args[1:]
    if command == "up":
        from infergw.up import main as up

        return up(rest)
    if command == "status":
        from infergw.stack.status_screen import main as status

        return status(rest)
    if command == "install":
        from infergw.stack.install import main as install

        return install(rest)
    if command == "epp":
        from infergw.epp.app import main as epp

        return epp(rest)
    if command == "bbr":
        from infergw.bbr.app import main as bbr

        return bbr(rest)
    if command == "controllers":
        from infergw.controllers.app import main as controllers

        return controllers(rest)
    if command == "connector":
        from infergw.connector.app import main as connector

        return connector(rest)
    if command == "simulate":
        from infergw.simulator.app import main as simulate

        return simulate(rest)
    if command == "fetch":
        from infergw.fetch.tokenizer import main as fetch

        return fetch(rest)
    if command == "runtime":
        from infergw.runtime.sidecar import main as runtime

        return runtime(rest)
    if command == "download":
        from infergw.fetch.download import main as download

        return download(rest)
    if command == "bench":
        return run_bench(rest)
    print(
        f"infergate: unknown command {command!r}; see the commands below\n\n{USAGE}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
