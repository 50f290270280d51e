"""The test suite can move into folders by `git mv` alone (plan #20 §6): no test module finds
the repository by its own depth, and no test module imports another test module (shared
helpers live in helper modules)."""

from __future__ import annotations

import re

from tests.paths import ROOT

TESTS = ROOT / "tests"
DEPTH = re.compile(r"__file__\)[^\n]*(\.parent\.parent|\.parents\[|\.parent / \"fixtures\")")
TEST_IMPORT = re.compile(r"^\s*from (tests\.(?:\w+\.)*test_\w+) import", re.M)

# Files a pending branch still edits keep their own lines until it lands.
PENDING_DEPTH = {
    "test_controllers_deploy.py",  # h12-ctrl
    "test_controllers_manifests.py",  # h12-ctrl
    "test_controllers_webhook.py",  # h12-ctrl
    "test_kv_event_decoder.py",  # h12-kv
}
# (importer, imported test module) pairs left for later: free_stack_ports / make_stack move
# with WP-STACK's stack/ports.py; test_epp_protocol and test_epp_unit_director are h12-body's,
# test_controllers_deploy is h12-ctrl's.
PENDING_IMPORTS = {
    ("e2e/test_auth.py", "tests.e2e.test_gateway"),
    ("e2e/test_model_routing.py", "tests.e2e.test_gateway"),
    ("e2e/test_pd.py", "tests.e2e.test_gateway"),
    ("e2e/test_pd_picking.py", "tests.e2e.test_gateway"),
    ("e2e/test_precise_prefix.py", "tests.e2e.test_gateway"),
    ("e2e/test_priorities.py", "tests.e2e.test_gateway"),
    ("e2e/test_rate_limits.py", "tests.e2e.test_gateway"),
    ("e2e/test_trust.py", "tests.e2e.test_gateway"),
    ("e2e/test_up_from_manifests.py", "tests.e2e.test_gateway"),
    ("e2e/test_gateway_trust.py", "tests.e2e.test_auth"),
    ("test_controllers_cli_kubernetes.py", "tests.test_controllers_deploy"),
    ("test_epp_drain.py", "tests.test_epp_protocol"),
    ("test_epp_plugin_params.py", "tests.test_epp_protocol"),
    ("test_epp_trust.py", "tests.test_epp_protocol"),
    ("test_epp_trust.py", "tests.test_epp_unit_director"),
    ("test_epp_unit_gate.py", "tests.test_epp_unit_director"),
}


def _modules() -> dict[str, str]:
    return {
        path.relative_to(TESTS).as_posix(): path.read_text()
        for path in sorted(TESTS.rglob("*.py"))
        if "fixtures" not in path.parts
    }


def test_no_test_module_finds_the_repository_by_its_depth() -> None:
    climbing = {name for name, text in _modules().items() if DEPTH.search(text)}
    assert climbing - {"paths.py"} == PENDING_DEPTH, "use tests/paths.py (ROOT, TINY, ...)"


def test_no_test_module_imports_another_test_module() -> None:
    found = {(name, m) for name, text in _modules().items() for m in TEST_IMPORT.findall(text)}
    # Exactly the pending pairs: a new one is a helper to move, a gone one leaves this list.
    assert found == PENDING_IMPORTS
