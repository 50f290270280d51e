"""Move every import of our top-level packages under one namespace (issue #20 part 4).

The repository keeps its folders (`epp/`, `kvindex/`, ...); the installed distribution maps each
under `NS.` (`NS.epp` -> `epp/`, `NS` -> `infergate/`, the launcher). This script rewrites
what names a module path, so the bare names stop being imported anywhere:

1. `import` / `from ... import` of a mapped package, in every `*.py` (function-local ones too);
2. string literals that are a module path and sit after `"-m"`, are `BENCHMARKS` values, or the
   first argument of `find_spec`/`import_module`/`patch`/`setattr`; strings that read
   `-m <module>` or are Python source (`import ...`, after `"-c"`);
3. the text files (Dockerfile, Makefile, kind.sh, manifests, Markdown): `-m <module>`,
   `find_spec("<module>")`, `from <module> import`, the Dockerfile's `COPY` lines;
4. pyproject.toml: the distribution name, the console script's target, the package map;
5. with `--move-tests`, the TEST_MOVES table (`git mv`, and `tests.test_x` imports follow);
6. `ruff check --fix --select I` and `ruff format` over the rewritten Python files;
7. prints the strings still naming a bare package for a human to judge (logger names, file names).

Dry run by default (prints what it would change); `--apply` writes. Kept for one release.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst

DEFAULT_NS = "infergw"
# Folders that become `NS.<folder>`; the launcher folder becomes `NS` itself.
SUBPACKAGES = (
    "api",
    "cluster",
    "kvindex",
    "simulator",
    "epp",
    "bbr",
    "connector",
    "controllers",
    "stack",
    "bench",
    "fetch",
    "runtime",
)
LAUNCHER = "infergate"
CONSOLE_SCRIPT = "infergate"
SKIP_DIRS = {".venv", ".git", "build", "dist", "node_modules", "__pycache__"}
# The script and its test hold bare names on purpose (the test feeds them to the script).
SKIP_PATHS = ("tests/fixtures", "tools/rename_namespace.py", "tests/test_rename_namespace.py")
# Call names whose first string argument is a module path.
MODULE_ARG_CALLS = {"find_spec", "import_module", "patch", "setattr"}
TEXT_GLOBS = (
    "Dockerfile",
    "Makefile",
    "tests/e2e/kind.sh",
    "gateway-manifests/**/*.yaml",
    "README.md",
    "docs/**/*.md",
)

# Plan §6: test file -> its folder mirroring the package it tests. Files not listed stay where
# they are (helpers, cross-cutting suites, tests/e2e/); the script lists unlisted test files.
TEST_MOVES = {
    "tests/test_api_autoscaling_defaults.py": "tests/api/test_autoscaling_defaults.py",
    "tests/test_api_logs.py": "tests/api/test_logs.py",
    "tests/test_api_names.py": "tests/api/test_names.py",
    "tests/test_auth.py": "tests/stack/test_auth.py",
    "tests/test_bench_fairness.py": "tests/bench/test_fairness.py",
    "tests/test_bench_pd.py": "tests/bench/test_pd.py",
    "tests/test_bench_routing.py": "tests/bench/test_routing.py",
    "tests/test_bench_soak.py": "tests/bench/test_soak.py",
    "tests/test_block_pool.py": "tests/simulator/test_block_pool.py",
    "tests/test_cluster_certs.py": "tests/cluster/test_certs.py",
    "tests/test_cluster_informer.py": "tests/cluster/test_informer.py",
    "tests/test_cluster_pool.py": "tests/cluster/test_pool.py",
    "tests/test_connector.py": "tests/connector/test_sidecar.py",
    "tests/test_controllers_admission_fuzz.py": "tests/controllers/test_admission_fuzz.py",
    "tests/test_controllers_address_locks.py": "tests/controllers/test_address_locks.py",
    "tests/test_controllers_autoscaler.py": "tests/controllers/test_autoscaler.py",
    "tests/test_controllers_autoscaling.py": "tests/controllers/test_autoscaling.py",
    "tests/test_controllers_cli_kubernetes.py": "tests/controllers/test_cli_kubernetes.py",
    "tests/test_controllers_deploy.py": "tests/controllers/test_deploy.py",
    "tests/test_controllers_engine_command.py": "tests/controllers/test_engine_command.py",
    "tests/test_controllers_envoy_eds.py": "tests/controllers/test_envoy_eds.py",
    "tests/test_controllers_kube.py": "tests/cluster/test_kube_store.py",
    "tests/test_controllers_leader.py": "tests/controllers/test_leader.py",
    "tests/test_controllers_local_runtime.py": "tests/controllers/test_local_runtime.py",
    "tests/test_controllers_manifests.py": "tests/controllers/test_manifests.py",
    "tests/test_controllers_model.py": "tests/controllers/test_model.py",
    "tests/test_controllers_modelinfer.py": "tests/controllers/test_modelinfer.py",
    "tests/test_controllers_store.py": "tests/cluster/test_store.py",
    "tests/test_controllers_webhook.py": "tests/controllers/test_webhook.py",
    "tests/test_crds.py": "tests/api/test_crds.py",
    "tests/test_engine.py": "tests/simulator/test_engine.py",
    "tests/test_epp_app_steps.py": "tests/epp/test_app_steps.py",
    "tests/test_epp_config_file.py": "tests/epp/scheduling/test_config_file.py",
    "tests/test_epp_config_fuzz.py": "tests/epp/scheduling/test_config_fuzz.py",
    "tests/test_epp_drain.py": "tests/epp/test_drain.py",
    "tests/test_epp_file_provider.py": "tests/epp/test_file_provider.py",
    "tests/test_epp_flowcontrol_config.py": "tests/epp/flowcontrol/test_config.py",
    "tests/test_epp_flowcontrol_controller.py": "tests/epp/flowcontrol/test_admission_queue.py",
    "tests/test_epp_flowcontrol_fairness.py": "tests/epp/flowcontrol/test_fairness.py",
    "tests/test_epp_flowcontrol_saturation.py": "tests/epp/flowcontrol/test_saturation.py",
    "tests/test_epp_flowcontrol_vtc.py": "tests/epp/flowcontrol/test_vtc.py",
    "tests/test_epp_fuzz_extproc.py": "tests/epp/test_extproc_fuzz.py",
    "tests/test_epp_hostile_bodies.py": "tests/epp/test_hostile_bodies.py",
    "tests/test_epp_json_splice.py": "tests/epp/test_json_splice.py",
    "tests/test_epp_kubernetes.py": "tests/epp/test_kubernetes.py",
    "tests/test_epp_model_series.py": "tests/epp/test_model_series.py",
    "tests/test_epp_plugin_handle.py": "tests/epp/scheduling/test_plugin_handle.py",
    "tests/test_epp_plugin_params.py": "tests/epp/scheduling/test_plugin_params.py",
    "tests/test_epp_protocol.py": "tests/epp/test_protocol.py",
    "tests/test_epp_ratelimit_buckets.py": "tests/epp/ratelimit/test_buckets.py",
    "tests/test_epp_ratelimit_limiter.py": "tests/epp/ratelimit/test_limiter.py",
    "tests/test_epp_ratelimit_redis.py": "tests/epp/ratelimit/test_redis.py",
    "tests/test_epp_ratelimit_replies.py": "tests/epp/ratelimit/test_replies.py",
    "tests/test_epp_response_chain.py": "tests/epp/response/test_chain.py",
    "tests/test_epp_response_usage.py": "tests/epp/response/test_usage.py",
    "tests/test_epp_routing.py": "tests/epp/test_routing.py",
    "tests/test_epp_scrape.py": "tests/epp/test_scrape.py",
    "tests/test_epp_scrape_fuzz.py": "tests/epp/test_scrape_fuzz.py",
    "tests/test_epp_trust.py": "tests/epp/test_trust.py",
    "tests/test_epp_unit_datastore.py": "tests/epp/test_datastore.py",
    "tests/test_epp_unit_director.py": "tests/epp/test_director.py",
    "tests/test_epp_unit_engine_metrics.py": "tests/epp/test_engine_metrics.py",
    "tests/test_epp_unit_gate.py": "tests/epp/test_gate.py",
    "tests/test_epp_unit_pd.py": "tests/epp/scheduling/test_pd.py",
    "tests/test_epp_unit_pickers.py": "tests/epp/scheduling/test_pickers.py",
    "tests/test_epp_unit_prefix_cache.py": "tests/epp/scheduling/test_prefix_cache.py",
    "tests/test_epp_unit_request.py": "tests/epp/test_request.py",
    "tests/test_epp_unit_scheduling.py": "tests/epp/scheduling/test_scheduling.py",
    "tests/test_epp_unit_scorers.py": "tests/epp/scheduling/test_scorers.py",
    "tests/test_epp_unit_session_affinity.py": "tests/epp/scheduling/test_session_affinity.py",
    "tests/test_examples.py": "tests/stack/test_examples.py",
    "tests/test_kubernetes_provider.py": "tests/epp/test_kubernetes_provider.py",
    "tests/test_kv_event_decoder.py": "tests/kvindex/test_event_decoder.py",
    "tests/test_kv_fuzz.py": "tests/kvindex/test_fuzz.py",
    "tests/test_kv_hostile.py": "tests/kvindex/test_hostile.py",
    "tests/test_kvindex_cache.py": "tests/kvindex/test_cache.py",
    "tests/test_kvindex_index.py": "tests/kvindex/test_index.py",
    "tests/test_kvindex_keys.py": "tests/kvindex/test_keys.py",
    "tests/test_kvindex_prompt_tokens.py": "tests/kvindex/test_prompt_tokens.py",
    "tests/test_kvindex_subscriber.py": "tests/kvindex/test_subscriber.py",
    "tests/test_kvindex_vllm_keys.py": "tests/kvindex/test_vllm_keys.py",
    "tests/test_simulator_api.py": "tests/simulator/test_api.py",
    "tests/test_simulator_kv_events.py": "tests/simulator/test_kv_events.py",
    "tests/test_simulator_parity.py": "tests/simulator/test_parity.py",
    "tests/test_simulator_pd.py": "tests/simulator/test_pd.py",
    "tests/test_simulator_served_models.py": "tests/simulator/test_served_models.py",
    "tests/test_stack_pods.py": "tests/stack/test_pods.py",
    "tests/test_stack_ports.py": "tests/stack/test_ports.py",
    "tests/test_tokenization.py": "tests/simulator/test_tokenization.py",
    "tests/test_up.py": "tests/stack/test_up.py",
    "tests/test_up_supervision.py": "tests/stack/test_up_supervision.py",
}
# Test modules that stay at tests/ on purpose: they test the repository as a whole.
TEST_STAYS = {
    "tests/test_kubeapi.py",
    "tests/test_manifests.py",
    "tests/test_layout.py",
    "tests/test_rename_namespace.py",
    "tests/test_image_packages.py",
    "tests/test_stack_layering.py",
    "tests/test_tests_movable.py",
    "tests/test_tests_swallow_nothing.py",
    "tests/test_yaml_bombs.py",
    "tests/test_real_engine_gate.py",
}


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


@dataclass(frozen=True)
class Names:
    """The mapping from today's module names to the namespaced ones."""

    ns: str
    packages: dict[str, str]  # bare top-level name -> namespaced name
    test_modules: dict[str, str] = field(default_factory=dict)  # tests.test_x -> tests.y.test_x

    def module(self, name: str) -> str | None:
        """The new dotted name for `name`, or None when it is not ours."""
        if name in self.test_modules:
            return self.test_modules[name]
        head, dot, rest = name.partition(".")
        if head not in self.packages:
            return None
        return self.packages[head] + dot + rest

    def pattern(self) -> str:
        return "|".join(sorted(self.packages, key=len, reverse=True))


def names_for(root: Path, ns: str, move_tests: bool) -> Names:
    """Map only the folders that exist (api/, cluster/, ... appear as #20's parts land)."""
    packages = {LAUNCHER: ns}
    for folder in SUBPACKAGES:
        if (root / folder / "__init__.py").is_file():
            packages[folder] = f"{ns}.{folder}"
    tests = {module_of(old): module_of(new) for old, new in TEST_MOVES.items()}
    return Names(ns, packages, tests if move_tests else {})


# --- Python source -------------------------------------------------------------------------

MODULE_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*")


def dotted(node: cst.BaseExpression) -> str:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{dotted(node.value)}.{node.attr.value}"
    raise TypeError(node)


def as_dotted(name: str) -> cst.Attribute | cst.Name:
    return cst.parse_expression(name)  # type: ignore[return-value]


def string_value(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")  # binary data matches no module path
        return value
    return None


def with_value(node: cst.SimpleString, value: str) -> cst.SimpleString:
    prefix = node.prefix
    quote = node.quote
    return node.with_changes(value=f"{prefix}{quote}{value}{quote}")


class TextRewriter:
    """Regex rewrites shared by string literals, comments and text files."""

    def __init__(self, names: Names) -> None:
        self.names = names
        keys = names.pattern()
        tests = "|".join(re.escape(m) for m in names.test_modules) or "(?!)"
        mod = rf"(?:(?:{tests})\b|(?:{keys})(?:\.\w+)*)"
        self.dash_m = re.compile(rf"(?<![\w-])(-m\s+)({mod})(?![\w-])")
        self.find_spec = re.compile(rf"""(find_spec\(\s*["'])({mod})(["'])""")
        self.from_import = re.compile(rf"(\bfrom\s+)({mod})(\s+import\b)")
        self.plain_import = re.compile(r"(\bimport\s+)([\w.]+(?:\s*,\s*[\w.]+)*)")

    def _swap(self, m: re.Match[str]) -> str:
        new = self.names.module(m.group(2))
        return m.group(1) + (new or m.group(2)) + (m.group(3) if m.lastindex == 3 else "")

    def prose(self, text: str) -> str:
        """`python -m epp`, `find_spec("simulator")`, `from controllers.certs import ...`."""
        text = self.dash_m.sub(self._swap, text)
        text = self.find_spec.sub(self._swap, text)
        return self.from_import.sub(self._swap, text)

    def code(self, text: str) -> str:
        """Python source inside a string (`-c` arguments): its import statements too."""

        def imports(m: re.Match[str]) -> str:
            parts = [p.strip() for p in m.group(2).split(",")]
            return m.group(1) + ", ".join(self.names.module(p) or p for p in parts)

        return self.plain_import.sub(imports, self.prose(text))


class Rewriter(cst.CSTTransformer):
    def __init__(self, names: Names, text: TextRewriter) -> None:
        self.names = names
        self.text = text
        self.problems: list[str] = []

    # 1. imports
    def leave_Import(self, original: cst.Import, updated: cst.Import) -> cst.BaseSmallStatement:
        aliases = []
        for alias in updated.names:
            name = dotted(alias.name)
            new = self.names.module(name)
            if new is None:
                aliases.append(alias)
            elif alias.asname is not None:
                aliases.append(alias.with_changes(name=as_dotted(new)))
            elif "." not in name and name != LAUNCHER and len(updated.names) == 1:
                # `import controllers` -> `from infergw import controllers`: same bound name.
                parent, _, child = new.rpartition(".")
                return cst.ImportFrom(
                    module=as_dotted(parent), names=[cst.ImportAlias(name=cst.Name(child))]
                )
            else:
                self.problems.append(
                    f"`import {name}` binds a name the rename changes: edit by hand"
                )
                aliases.append(alias)
        return updated.with_changes(names=aliases)

    def leave_ImportFrom(
        self, original: cst.ImportFrom, updated: cst.ImportFrom
    ) -> cst.BaseSmallStatement:
        if updated.relative or updated.module is None:
            return updated
        new = self.names.module(dotted(updated.module))
        return updated if new is None else updated.with_changes(module=as_dotted(new))

    # 2. strings that are module paths by position
    def _module_string(self, node: cst.BaseExpression) -> cst.BaseExpression:
        value = string_value(node)
        if value is None or not MODULE_PATH.fullmatch(value):
            return node
        new = self.names.module(value)
        return node if new is None else with_value(node, new)  # type: ignore[arg-type]

    def _code_string(self, node: cst.BaseExpression) -> cst.BaseExpression:
        value = string_value(node)
        if value is None:
            return node
        new = self.text.code(value)
        return node if new == value else with_value(node, new)  # type: ignore[arg-type]

    def _sequence(self, values: Sequence[cst.BaseExpression]) -> list[cst.BaseExpression]:
        out = list(values)
        for i in range(1, len(out)):
            flag = string_value(out[i - 1])
            if flag == "-m":
                out[i] = self._module_string(out[i])
            elif flag == "-c":
                out[i] = self._code_string(out[i])
        return out

    def _elements(self, node: cst.List | cst.Tuple) -> cst.List | cst.Tuple:
        values = self._sequence([e.value for e in node.elements])
        elements = [e.with_changes(value=v) for e, v in zip(node.elements, values, strict=True)]
        return node.with_changes(elements=elements)

    def leave_List(self, original: cst.List, updated: cst.List) -> cst.BaseExpression:
        return self._elements(updated)

    def leave_Tuple(self, original: cst.Tuple, updated: cst.Tuple) -> cst.BaseExpression:
        return self._elements(updated)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        values = self._sequence([a.value for a in updated.args])
        func = updated.func
        name = func.attr.value if isinstance(func, cst.Attribute) else getattr(func, "value", "")
        if name in MODULE_ARG_CALLS and values:
            values[0] = self._module_string(values[0])
        args = [a.with_changes(value=v) for a, v in zip(updated.args, values, strict=True)]
        return updated.with_changes(args=args)

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.BaseSmallStatement:
        targets = [t.target for t in updated.targets]
        if not (
            isinstance(updated.value, cst.Dict)
            and any(isinstance(t, cst.Name) and t.value == "BENCHMARKS" for t in targets)
        ):
            return updated
        elements = [
            e.with_changes(value=self._module_string(e.value))
            if isinstance(e, cst.DictElement)
            else e
            for e in updated.value.elements
        ]
        return updated.with_changes(value=updated.value.with_changes(elements=elements))

    # `-m epp` in docstrings and matchers, Python source in strings, comments
    def leave_SimpleString(
        self, original: cst.SimpleString, updated: cst.SimpleString
    ) -> cst.BaseExpression:
        value = string_value(updated)
        if value is None:
            return updated
        is_code = re.match(r"\s*(import|from)\s+[\w.]+", value)
        new = self.text.code(value) if is_code else self.text.prose(value)
        if new == value:
            return updated
        if "\\" in updated.value:  # keep escapes as written: rewrite the source text instead
            return updated.with_changes(value=self.text.prose(updated.value))
        return with_value(updated, new)

    def leave_FormattedStringText(
        self, original: cst.FormattedStringText, updated: cst.FormattedStringText
    ) -> cst.FormattedStringText:
        return updated.with_changes(value=self.text.prose(updated.value))

    def leave_Comment(self, original: cst.Comment, updated: cst.Comment) -> cst.Comment:
        return updated.with_changes(value=self.text.prose(updated.value))


# --- files -------------------------------------------------------------------------------------


def python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts) or str(rel).startswith(SKIP_PATHS):
            continue
        yield path


def text_files(root: Path) -> Iterator[Path]:
    seen: set[Path] = set()
    for pattern in TEXT_GLOBS:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and path not in seen:
                seen.add(path)
                yield path


def dockerfile_copies(text: str, root: Path) -> str:
    """One `COPY folder ./folder` per mapped folder, where the old block was."""
    lines = text.splitlines(keepends=True)
    folders = [LAUNCHER, *(f for f in SUBPACKAGES if (root / f / "__init__.py").is_file())]
    copy = re.compile(rf"COPY ({'|'.join(folders)}) \./\1\s*$")
    at = [i for i, line in enumerate(lines) if copy.match(line)]
    if not at:
        return text
    block = [f"COPY {f} ./{f}\n" for f in folders]
    return "".join(
        lines[: at[0]] + block + [x for i, x in enumerate(lines) if i > at[0] and i not in at]
    )


PACKAGES_FIND = re.compile(r"\[tool\.setuptools\.packages\.find\]\ninclude = \[[^\]]*\]\n")
PACKAGE_DATA = re.compile(r"(\[tool\.setuptools\.package-data\]\n)(\w+) = ")


def package_list(root: Path, names: Names) -> list[str]:
    found = []
    for bare, new in names.packages.items():
        base = root / bare
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            if SKIP_DIRS.intersection(rel.parts):
                continue
            found.append(".".join([new, *rel.parts]))
    return found


def rewrite_pyproject(text: str, root: Path, names: Names) -> str:
    packages = package_list(root, names)
    rows = ",\n".join(f'    "{p}"' for p in packages)
    dirs = "\n".join(f'"{new}" = "{bare}"' for bare, new in names.packages.items())
    layout = (
        f"[tool.setuptools]\npackages = [\n{rows},\n]\n\n[tool.setuptools.package-dir]\n{dirs}\n"
    )
    if "[tool.setuptools.package-dir]" in text:
        return text  # mapped already: a second run changes nothing
    new, count = PACKAGES_FIND.subn(layout, text)
    if count != 1:
        raise SystemExit("pyproject.toml: no [tool.setuptools.packages.find] block to replace")
    new = re.sub(r'(?m)^name = "infergate"$', f'name = "{names.ns}"', new, count=1)
    new = new.replace(
        f'{CONSOLE_SCRIPT} = "{LAUNCHER}.cli:main"', f'{CONSOLE_SCRIPT} = "{names.ns}.cli:main"'
    )
    new = PACKAGE_DATA.sub(lambda m: f'{m.group(1)}"{names.module(m.group(2))}" = ', new)
    if "[tool.ruff.lint.isort]" not in new:
        isort = f'[tool.ruff.lint.isort]\nknown-first-party = ["{names.ns}", "tests"]\n\n'
        new = new.replace(
            "[tool.ruff.lint.per-file-ignores]", isort + "[tool.ruff.lint.per-file-ignores]"
        )
    tomllib.loads(new)  # still valid TOML
    return new


def move_tests(root: Path, apply: bool) -> list[Path]:
    moved = []
    for old, new in TEST_MOVES.items():
        src, dst = root / old, root / new
        if not src.exists():
            print(f"TEST_MOVES: {old} is gone; drop it from the table")
            continue
        moved.append(dst)
        if "Path(__file__)" in src.read_text():
            print(f"TEST_MOVES: {old} finds files by its own depth: use tests.paths first")
        if not apply:
            continue
        for folder in reversed(dst.relative_to(root / "tests").parents[:-1]):
            init = root / "tests" / folder / "__init__.py"
            init.parent.mkdir(parents=True, exist_ok=True)
            if not init.exists():
                init.write_text("")
                subprocess.run(["git", "add", str(init)], cwd=root, check=False)
        git = subprocess.run(["git", "mv", old, new], cwd=root, capture_output=True)
        if git.returncode != 0:
            shutil.move(src, dst)
    listed = set(TEST_MOVES) | TEST_STAYS
    for path in sorted((root / "tests").glob("test_*.py")):
        rel = str(path.relative_to(root))
        if rel not in listed:
            print(f"TEST_MOVES: {rel} is not in the table; it stays in tests/")
    return moved


BARE_LEFT = re.compile(r"(?<![\w.])(epp|controllers|simulator|kvindex|bench)\.")


def leftovers(path: Path, source: str) -> Iterator[str]:
    """Strings still naming a bare package (logger names, file names: a human judges)."""
    module = cst.parse_module(source)
    for node in _strings(module):
        if BARE_LEFT.search(node):
            yield node


def _strings(module: cst.Module) -> Iterator[str]:
    found: list[str] = []

    class Collect(cst.CSTVisitor):
        def visit_SimpleString(self, node: cst.SimpleString) -> None:
            found.append(node.value)

    module.visit(Collect())
    return iter(found)


def run(root: Path, ns: str, apply: bool, with_tests: bool, ruff: str) -> int:
    names = names_for(root, ns, with_tests)
    text = TextRewriter(names)
    changed: list[Path] = []
    problems: list[str] = []

    moved = move_tests(root, apply) if with_tests else []
    for path in python_files(root):
        source = path.read_text()
        rewriter = Rewriter(names, text)
        new = cst.parse_module(source).visit(rewriter).code
        problems += [f"{path.relative_to(root)}: {p}" for p in rewriter.problems]
        if new != source:
            changed.append(path)
            if apply:
                path.write_text(new)
    for path in text_files(root):
        source = path.read_text()
        new = text.prose(source)
        if path.name == "Dockerfile":
            new = dockerfile_copies(new, root)
        if new != source:
            changed.append(path)
            if apply:
                path.write_text(new)
    pyproject = root / "pyproject.toml"
    pyproject_text = pyproject.read_text()
    new = rewrite_pyproject(pyproject_text, root, names)
    if new != pyproject_text:
        changed.append(pyproject)
        if apply:
            pyproject.write_text(new)

    python_changed = [str(p) for p in changed if p.suffix == ".py"]
    if apply and python_changed:
        subprocess.run([ruff, "check", "--fix", "--select", "I", "-q", *python_changed], cwd=root)
        subprocess.run([ruff, "format", "-q", *python_changed], cwd=root)

    mode = "rewrote" if apply else "would rewrite"
    print(f"{mode} {len(changed)} files; moved {len(moved)} test files; namespace {ns!r}")
    print("mapping: " + ", ".join(f"{k} -> {v}" for k, v in names.packages.items()))
    for path in changed:
        print(f"  {path.relative_to(root)}")
    for p in problems:
        print(f"PROBLEM {p}")
    for path in python_files(root):
        for s in leftovers(path, path.read_text()):
            print(f"left for a human: {path.relative_to(root)}: {s}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ns", default=DEFAULT_NS, help="the import namespace (default %(default)s)"
    )
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--apply", action="store_true", help="write the changes (default: dry run)")
    parser.add_argument(
        "--move-tests", action="store_true", help="also apply TEST_MOVES (git mv into folders)"
    )
    parser.add_argument(
        "--ruff", default=shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    )
    args = parser.parse_args(argv)
    return run(args.root.resolve(), args.ns, args.apply, args.move_tests, args.ruff)


if __name__ == "__main__":
    sys.exit(main())
