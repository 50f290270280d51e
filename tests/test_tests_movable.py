"""The test suite can move into folders by `git mv` alone (plan #20 §6): no test module finds
the repository by its own depth, and no test module imports another test module (shared
helpers live in helper modules)."""

from __future__ import annotations

import ast
import re

from tests.paths import ROOT

TESTS = ROOT / "tests"
DEPTH = re.compile(r"__file__\)[^\n]*(\.parent\.parent|\.parents\[|\.parent / \"fixtures\")")


def _modules() -> dict[str, str]:
    return {
        path.relative_to(TESTS).as_posix(): path.read_text()
        for path in sorted(TESTS.rglob("*.py"))
        if "fixtures" not in path.parts
    }


def test_no_test_module_finds_the_repository_by_its_depth() -> None:
    climbing = {name for name, text in _modules().items() if DEPTH.search(text)}
    assert climbing == {"paths.py"}, "use tests/paths.py (ROOT, TINY, ...)"


def _imported_test_modules(text: str) -> set[str]:
    """Every `tests...test_*` module imported, in any spelling (`import tests.test_x`,
    `from tests.test_x import y`, `from tests import test_x`), at any nesting level."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("tests.") and m.rsplit(".", 1)[1].startswith("test_")}


def test_no_test_module_imports_another_test_module() -> None:
    found = {(name, m) for name, text in _modules().items() for m in _imported_test_modules(text)}
    assert found == set(), "move what they share into a helper module (a name without test_)"
