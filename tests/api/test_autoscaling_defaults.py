"""An AutoScalingPolicy means one thing wherever it is read: the autoscaler takes it through
api.autoscaling.effective_policy, whose defaults are the CRD's own. So a policy that leaves
fields out scales exactly like the same policy after the API server has written the CRD's
`default:` values into it (the CRD's defaults equal the DEFAULT_* constants:
tests/test_crds.py::test_python_defaults_match_the_crds)."""

from __future__ import annotations

import copy

import pytest
import yaml

from infergw import api
from infergw.api.autoscaling import AutoScalingPolicy, effective_policy
from infergw.controllers.autoscaler import policy_from
from tests.crd_eval import apply_defaults, crd_schema
from tests.paths import EXAMPLES

EXAMPLE = yaml.safe_load((EXAMPLES / "crds" / "autoscalingpolicy.yaml").read_text())


def sparse(**spec) -> dict:
    """The example policy's metrics, with only the given spec fields besides."""
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"] = {"metrics": doc["spec"]["metrics"], **spec}
    return doc


SPARSE = {
    "no behaviour": sparse(),
    "empty behaviour": sparse(behavior={}),
    "empty scale-up": sparse(behavior={"scaleUp": {}}),
    "empty panic and stable": sparse(behavior={"scaleUp": {"panicPolicy": {}, "stablePolicy": {}}}),
    "some fields": sparse(
        tolerancePercent=25,
        behavior={
            "scaleUp": {"panicPolicy": {"percent": 300}, "stablePolicy": {"period": "1m"}},
            "scaleDown": {"selectPolicy": "And"},
        },
    ),
    "explicit nulls": sparse(tolerancePercent=None, behavior={"scaleDown": {"percent": None}}),
    "the example": copy.deepcopy(EXAMPLE),
}


def defaulted(doc: dict) -> dict:
    """What the API server stores for `doc`: the CRD's defaults written in, nulls dropped."""
    return apply_defaults(crd_schema("AutoScalingPolicy"), api.prune_nulls(copy.deepcopy(doc)))


@pytest.mark.parametrize("doc", SPARSE.values(), ids=SPARSE.keys())
def test_a_sparse_policy_means_what_the_api_server_would_store(doc):
    assert api.validate_dict(doc) == []
    typed = api.from_dict(api.prune_nulls(doc))
    stored = api.from_dict(defaulted(doc))
    assert isinstance(typed, AutoScalingPolicy) and isinstance(stored, AutoScalingPolicy)
    assert effective_policy(typed) == effective_policy(stored)
    assert policy_from(doc) == policy_from(defaulted(doc))


def test_what_a_policy_sets_wins_over_the_defaults():
    doc = SPARSE["some fields"]
    effective = effective_policy(api.from_dict(doc))
    assert effective.tolerance_percent == 25
    assert effective.panic is not None and effective.panic.percent == 300
    assert effective.scale_up.period == 60.0
    assert effective.scale_down.select_policy == "And"


def test_a_policy_without_a_panic_policy_never_panics():
    assert effective_policy(api.from_dict(sparse())).panic is None
    assert policy_from(sparse()).panic is None
