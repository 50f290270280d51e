"""Would compiling the picker's per-request Python (no rewrite) make it cheap enough?

An experiment for issue 15, not a way to build the picker: a commit of this repository is
extracted three times (`bench/checkout.py`); one copy stays Python, one has the modules on
the request path (REQUEST_PATH, found by py-spy on `bench/epp_pipeline.py`'s child) compiled
by Cython 3 in pure-Python mode (`cythonize -i -3`, the sources unchanged), one by mypyc. A
module a compiler rejects stays Python in that copy and is reported with the compiler's first
error lines; mypyc is retried without the rejected ones until the rest compiles. Build time is
the compilers' wall time with `--jobs` parallel compilations.

Then `bench/epp_pipeline.py`'s child (the picker's own work a request, no gRPC) runs each
copy in turns for R rounds, so drift on a shared machine falls on all alike; with
`--through-envoy` `bench/epp_vs_stub.py` also puts the copies' pickers beside the minimal
stub through one Envoy. The compilers come from another Python (`--tools-python`, the same
interpreter version: `python -m venv T && T/bin/pip install cython mypy`), so this project's
environment is left as it is.

python -m infergw.bench.compiled_probe --tools-python /tmp/tools/bin/python \
    --requests 1500 --rounds 5 --concurrency 32 [--through-envoy --envoy-rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infergw.bench import checkout, epp_pipeline, epp_vs_stub

# The request path, as the package lays it out (`infergw.epp` is `epp/`): what the loop thread
# runs per request in the pipeline's py-spy samples, and what those modules call per request.
# Package `__init__` files stay Python (compiling them gains nothing and breaks the layout).
REQUEST_PATH = (
    "api/log_context.py",
    "api/tracing.py",
    "epp/body_budget.py",
    "epp/bodyless.py",
    "epp/capacity_wait.py",
    "epp/context.py",
    "epp/datastore.py",
    "epp/director.py",
    "epp/eligibility.py",
    "epp/errors.py",
    "epp/extproc.py",
    "epp/gatekeeper.py",
    "epp/json_splice.py",
    "epp/metric_values.py",
    "epp/metrics.py",
    "epp/model_catalog.py",
    "epp/protocol.py",
    "epp/request.py",
    "epp/request_body.py",
    "epp/request_trace.py",
    "epp/response_ids.py",
    "epp/stored_responses.py",
    "epp/tokenizing.py",
    "epp/trust.py",
    "epp/worker_lane.py",
    "epp/response/chain.py",
    "epp/response/ids.py",
    "epp/response/lines.py",
    "epp/response/rewrite.py",
    "epp/response/strip_usage.py",
    "epp/response/usage.py",
    "epp/routing/table.py",
    "epp/scheduling/framework.py",
    "epp/scheduling/plugins/_load_bound.py",
    "epp/scheduling/plugins/_normalize.py",
    "epp/scheduling/plugins/kv_cache_utilization.py",
    "epp/scheduling/plugins/least_request.py",
    "epp/scheduling/plugins/pickers.py",
    "epp/scheduling/plugins/precise_prefix_cache.py",
    "epp/scheduling/plugins/profile_handlers.py",
    "epp/scheduling/plugins/queue.py",
    "kvindex/cache.py",
    "kvindex/dict_index.py",
    "kvindex/index.py",
    "kvindex/keys.py",
    "kvindex/tokenize.py",
)
COMPILERS = ("cython", "mypyc")
BUILDS = "builds.json"  # in the work folder: what was built there
# mypyc stops at the first module with type errors; each retry drops the rejected ones.
MYPYC_RETRIES = 6
# What mypyc (2.4) accepts but cannot build or import, found from gcc's errors and tracebacks
# (build_mypyc also finds import failures itself, at the cost of a rebuild each).
MYPYC_BREAKS = {
    "epp/worker_lane.py": "mypyc names the C field of the attribute `_thread` `__thread`, "
    "a C keyword (gcc: expected identifier before '__thread')",
    "epp/context.py": "KeyError: 'PromptTokenizer' at import: a dataclass field annotated "
    "with a class imported only under TYPE_CHECKING",
    "epp/response/usage.py": "TypeError: mypyc classes can't have a metaclass (msgspec.Struct)",
    "epp/scheduling/plugins/least_request.py": "TypeError: mypyc classes can't have a "
    "metaclass (its parameters are a PluginParams, a msgspec.Struct)",
    "epp/scheduling/plugins/pickers.py": "the same (SeedParams, a PluginParams)",
    "epp/scheduling/framework.py": "interpreted classes cannot inherit from compiled: the "
    "plugins mypyc rejects subclass its Scorer, Filter, Picker",
    **{
        f"epp/scheduling/plugins/{m}.py": "subclasses the framework's classes, which stay Python"
        for m in ("kv_cache_utilization", "profile_handlers", "queue")
    },
    "epp/metric_values.py": "SystemError (dictobject.c: bad argument to internal function) "
    "when the picker starts: its FastCounter/FastHistogram subclass prometheus_client's "
    "classes, whose __init__ sets attributes a native class has no __dict__ for",
}


@dataclass(slots=True)
class Build:
    name: str  # "pure", "cython" or "mypyc"
    path: str  # the folder to put first on PYTHONPATH
    seconds: float = 0.0  # the compiler's wall time
    compiled: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # module file → first errors


def _module_files(path: Path, modules: tuple[str, ...]) -> list[str]:
    """The modules as paths under the copy's `infergw/` (its subpackages are links)."""
    return [f"infergw/{m}" for m in modules if (path / "infergw" / m).exists()]


def _built(path: Path, files: list[str]) -> list[str]:
    """The files that now have an extension module beside them (imported before the .py)."""
    return [f for f in files if list((path / f).parent.glob(Path(f).stem + ".*.so"))]


def _remove_built(path: Path, files: list[str]) -> None:
    """Drop the extension modules of `files` (and mypyc's shared one): the .py is imported."""
    for f in files:
        for so in (path / f).parent.glob(Path(f).stem + ".*.so"):
            so.unlink()
    for so in path.glob("*__mypyc.*.so"):
        so.unlink()
    # setuptools would copy the last build's module shims, still naming its shared module.
    shutil.rmtree(path / "build", ignore_errors=True)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["nice", "-n", "19", *cmd], cwd=cwd, capture_output=True, text=True)


def build_cython(path: Path, tools: str, jobs: int, modules: tuple[str, ...]) -> Build:
    files = _module_files(path, modules)
    t0 = time.monotonic()
    # -k: a module Cython rejects does not stop the others.
    out = _run(
        [tools, "-m", "Cython.Build.Cythonize", "-i", "-3", "-k", "-j", str(jobs), *files], path
    )
    result = Build("cython", str(path), time.monotonic() - t0, _built(path, files))
    # Each Cython module is its own extension: one that fails to import goes back to Python.
    for f, why in import_failures(path, result.compiled).items():
        result.rejected[f] = why
        _remove_built(path, [f])
    result.compiled = _built(path, files)
    for f in set(files) - set(result.compiled) - set(result.rejected):
        lines = [x for x in (out.stdout + out.stderr).splitlines() if Path(f).name in x]
        result.rejected[f] = "\n".join(lines[:4]) or (out.stderr or out.stdout)[-800:]
    return result


def _mypy_errors(text: str) -> dict[str, list[str]]:
    """mypy's `file:line: error: …` lines by file."""
    errors: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"(\S+\.py):\d+: error:", line)
        if m:
            errors.setdefault(m.group(1), []).append(line)
    return errors


def import_failures(path: Path, files: list[str]) -> dict[str, str]:
    """Each compiled module imported in a fresh interpreter: file → the module whose import
    raised (the last `infergw/…` frame of the traceback) and the error."""
    failures: dict[str, str] = {}
    for f in files:
        name = f.removesuffix(".py").replace("/", ".")
        out = subprocess.run(
            [sys.executable, "-c", f"import {name}"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(path)},
        )
        if out.returncode != 0:
            where = re.findall(r'File "(infergw/[^"]+\.py)"', out.stderr)
            failures[where[-1] if where else f] = out.stderr.strip().splitlines()[-1]
    return failures


def build_mypyc(path: Path, tools: str, jobs: int, modules: tuple[str, ...]) -> Build:
    result = Build("mypyc", str(path))
    result.rejected = {f"infergw/{m}": why for m, why in MYPYC_BREAKS.items() if m in modules}
    files = [f for f in _module_files(path, modules) if f not in result.rejected]
    env = {**os.environ, "MYPYC_OPT_LEVEL": "3"}
    t0 = time.monotonic()
    every = _module_files(path, modules)
    for _ in range(MYPYC_RETRIES):
        _remove_built(path, every)  # a rebuild must not leave the last one's modules behind
        # Imports outside `files` are read for their types but not checked or compiled.
        cmd = [tools, "-m", "mypyc", "--ignore-missing-imports", "--follow-imports=silent"]
        out = subprocess.run(
            ["nice", "-n", "19", *cmd, *files],
            cwd=path,
            capture_output=True,
            text=True,
            env={**env, "MAX_JOBS": str(jobs)},
        )
        errors = _mypy_errors(out.stdout + out.stderr)
        if out.returncode == 0:
            broken = import_failures(path, _built(path, files))
            errors = {f: [why] for f, why in broken.items()}
        if not errors:
            break
        for f, lines in errors.items():
            key = f if f in files else next((x for x in files if x.endswith(f)), f)
            result.rejected[key] = "\n".join(lines[:4])
        files = [f for f in files if f not in result.rejected]
    result.seconds = time.monotonic() - t0
    result.compiled = _built(path, files)
    if out.returncode != 0 and not result.compiled:
        result.rejected["(build)"] = (out.stdout + out.stderr)[-1500:]
    return result


def build_all(commit: str, work: Path, tools: str, jobs: int, compilers: list[str]) -> list[Build]:
    """The copies, built into `work`; a `work` that holds them already (its BUILDS file) is
    reused, so a quiet hour goes to measuring, not compiling."""
    if (work / BUILDS).exists():
        return [Build(**b) for b in json.loads((work / BUILDS).read_text())]
    builds = [Build("pure", str(checkout.importable(commit, work / "pure")))]
    makers = {"cython": build_cython, "mypyc": build_mypyc}
    for name in compilers:
        path = checkout.importable(commit, work / name)
        builds.append(makers[name](path, tools, jobs, REQUEST_PATH))
    (work / BUILDS).write_text(json.dumps([asdict(b) for b in builds]))
    return builds


def pipeline(builds: list[Build], requests: int, rounds: int, concurrency: int) -> dict:
    """epp_pipeline's child on each copy, the copies taking turns."""
    runs: dict[tuple[int, str], list[dict]] = {(0, b.name): [] for b in builds}
    for _ in range(rounds):
        for b in builds:
            child = epp_pipeline.run_child(Path(b.path), requests, concurrency=concurrency)
            runs[0, b.name].append(child)
    out = epp_pipeline._result(requests, rounds, (0,), [b.name for b in builds], runs)
    out["concurrency"] = concurrency
    return out


@contextmanager
def copies_as_commits(builds: list[Build]) -> Iterator[None]:
    """epp_vs_stub runs a `--baseline` commit from `checkout.importable`'s folder: here a
    copy's name stands for its already built folder."""
    real = checkout.importable
    folders = {b.name: Path(b.path) for b in builds}
    checkout.importable = lambda commit, dest, repo=None: folders[commit]
    try:
        yield
    finally:
        checkout.importable = real


def through_envoy(builds: list[Build], rounds: int, duration: float) -> dict:
    with copies_as_commits(builds):
        return epp_vs_stub.compare(
            rounds=rounds, duration=duration, baselines=[b.name for b in builds]
        )


def markdown(out: dict) -> str:
    lines = ["| copy | compiled modules | rejected | build s |", "|---|---|---|---|"]
    for b in out["builds"]:
        rejected = ", ".join(sorted(Path(f).stem for f in b["rejected"])) or "—"
        lines.append(f"| {b['name']} | {len(b['compiled'])} | {rejected} | {b['seconds']:.0f} |")
    lines += ["", epp_pipeline.markdown(out["pipeline"])]
    if "envoy" in out:
        lines += ["", epp_vs_stub.markdown(out["envoy"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infergw.bench.compiled_probe", description=__doc__)
    p.add_argument("--tools-python", required=True, help="a Python with cython and mypy")
    p.add_argument("--commit", default="HEAD", help="the commit to copy and compile")
    p.add_argument("--compiler", action="append", choices=COMPILERS, default=[])
    p.add_argument("--jobs", type=int, default=2, help="parallel C compilations")
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--through-envoy", action="store_true", help="also epp_vs_stub")
    p.add_argument("--envoy-rounds", type=int, default=4)
    p.add_argument("--envoy-duration", type=float, default=8.0)
    p.add_argument(
        "--keep",
        type=Path,
        help="build into this folder and keep it; a folder built before is reused",
    )
    args = p.parse_args(argv)
    if shutil.which(args.tools_python) is None and not Path(args.tools_python).exists():
        p.error(f"--tools-python {args.tools_python}: not found")
    if args.requests < 1 or args.rounds < 1 or args.concurrency < 1 or args.jobs < 1:
        p.error("--requests, --rounds, --concurrency and --jobs must be 1 or more")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-compiled-"))
    try:
        builds = build_all(
            args.commit, work, args.tools_python, args.jobs, args.compiler or list(COMPILERS)
        )
        out: dict = {"commit": args.commit, "builds": [asdict(b) for b in builds]}
        print(json.dumps(out["builds"]), file=sys.stderr, flush=True)
        out["pipeline"] = pipeline(builds, args.requests, args.rounds, args.concurrency)
        if args.through_envoy:
            out["envoy"] = through_envoy(builds, args.envoy_rounds, args.envoy_duration)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
