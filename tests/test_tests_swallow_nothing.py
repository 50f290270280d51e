"""No test helper swallows every error: a handler that catches all exceptions and carries on
would hide the fault a test exists to show. Tests catch the errors they expect by name."""

from __future__ import annotations

import ast

from tests.paths import ROOT

TESTS = ROOT / "tests"
CATCH_ALL = {"Exception", "BaseException"}
CARRY_ON = (ast.Pass, ast.Continue)


def _swallows_everything(handler: ast.ExceptHandler) -> bool:
    catches_all = handler.type is None or (
        isinstance(handler.type, ast.Name) and handler.type.id in CATCH_ALL
    )
    return catches_all and all(isinstance(statement, CARRY_ON) for statement in handler.body)


def test_no_test_module_catches_every_exception_and_carries_on() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{node.lineno}"
        for path in sorted(TESTS.rglob("*.py"))
        if "fixtures" not in path.parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ExceptHandler) and _swallows_everything(node)
    ]
    assert found == [], "catch the errors you expect by name"
