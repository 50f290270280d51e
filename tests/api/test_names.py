"""api/names.py is the one spelling of the labels and headers several parts share: no other
module of ours writes one of them as a string of its own (docstrings, comments and help texts
that mention a name inside a sentence are not copies)."""

from __future__ import annotations

import ast

from infergw.api import names
from tests.paths import ROOT

SHARED = {
    value
    for key, value in vars(names).items()
    if key.endswith(("_LABEL", "_HEADER")) and isinstance(value, str)
}
NAMES_FILE = ROOT / "api" / "names.py"


def code_files() -> list:
    packages = [p.parent for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"]
    return [f for pkg in packages for f in pkg.rglob("*.py") if f != NAMES_FILE]


def string_literals(tree: ast.AST) -> list[ast.Constant]:
    """Every string constant except docstrings (a bare string expression statement)."""
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_the_shared_names_are_many():
    # The labels the controllers write and the picker, sidecar and stack read, and the headers
    # the gateway, picker and sidecar pass between them.
    assert {
        "inference.networking.k8s.io/engine-type",
        "infergate.io/role",
        "infergate.io/group",
        "x-infergate-user",
        "x-prefiller-host-port",
        "x-gateway-destination-endpoint",
        "x-gateway-model-name-rewrite",
    } <= SHARED


def test_no_module_spells_a_shared_name_itself():
    copies = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
        for path in code_files()
        for node in string_literals(ast.parse(path.read_text()))
        if node.value in SHARED
    ]
    assert copies == []
