"""The YAML an operator writes, written carelessly or by an attacker: a "billion laughs"
document (anchors that each list the previous one ten times), an alias inside its own
anchor, and a FIFO, /dev/zero or a directory where a pool file should be. Each is refused
with a message saying what is wrong, at once; the picker exits at start on a bad config,
the pool file watcher keeps the last good pool, the controllers' manifest directory
applies the other files. Before, the first walk of such a document (an error message
quoting the value, str(), pruning nulls) expanded it to 10**9 values and never returned,
and a FIFO blocked the picker's event loop for good."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from infergw.api import yaml_files
from infergw.cluster.store import AUTOSCALING_POLICY, MODEL_INFER
from infergw.controllers.manifests import ManifestDirectory
from infergw.controllers.memory_store import MemoryStore
from infergw.epp.scheduling.config import ConfigError, load_config
from tests.conftest import free_port
from tests.paths import CRD_EXAMPLES
from tests.picker_fixtures import Picker
from tests.pool_files import POOL, errors, only_the_first_pod, pod, watched_pool, write
from tests.waiting import wait_for_async

# In-process cases: without the fix they never return, so pytest-timeout ends them.
pytestmark = pytest.mark.timeout(60)


def laughs(depth: int = 9) -> str:
    """A top-level key `laughs` whose anchors end in &l<depth>, 10**depth strings."""
    lines = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, depth + 1):
        lines.append(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "laughs:\n" + "\n".join(lines) + "\n"


BOMB = "*l9"  # the last anchor of laughs()


def config_with(body: str) -> str:
    return laughs() + textwrap.dedent(body)


PICKER_CONFIGS = [
    pytest.param(
        """\
        kind: *l9
        apiVersion: infergate.io/v1alpha1
        """,
        id="kind",
    ),
    pytest.param(
        """\
        kind: EndpointPickerConfig
        apiVersion: infergate.io/v1alpha1
        plugins:
        - type: prefix-cache-scorer
          parameters: {blockSizeTokens: *l9}
        schedulingProfiles:
        - name: default
          plugins: [{pluginRef: prefix-cache-scorer}]
        """,
        id="plugin-parameter",
    ),
    pytest.param(
        """\
        kind: EndpointPickerConfig
        apiVersion: infergate.io/v1alpha1
        plugins: [{type: prefix-cache-scorer}]
        schedulingProfiles:
        - name: default
          plugins: [{pluginRef: prefix-cache-scorer, weight: *l9}]
        """,
        id="weight",
    ),
    pytest.param(
        """\
        kind: EndpointPickerConfig
        apiVersion: infergate.io/v1alpha1
        featureGates: *l9
        plugins: [{type: prefix-cache-scorer}]
        schedulingProfiles:
        - name: default
          plugins: [{pluginRef: prefix-cache-scorer}]
        """,
        id="feature-gates",
    ),
]


@pytest.mark.parametrize("body", PICKER_CONFIGS)
def test_a_billion_laughs_picker_config_is_refused(body):
    with pytest.raises(ConfigError, match=r"expands through its aliases .* more than"):
        load_config(config_with(body))


def test_an_alias_inside_its_own_anchor_is_refused():
    with pytest.raises(ConfigError, match="alias inside its own anchor"):
        load_config("kind: &k [EndpointPickerConfig, *k]\napiVersion: infergate.io/v1alpha1\n")


def test_anchors_that_expand_little_still_load():
    doc = yaml_files.safe_load("a: &x {b: [1, 2]}\nc: *x\nd: [*x, *x]\n")
    assert doc == {"a": {"b": [1, 2]}, "c": {"b": [1, 2]}, "d": [{"b": [1, 2]}] * 2}


def picker_refusing_its_config(tmp_path: Path, place_config) -> str:
    """Start the real `python -m infergw.epp` after `place_config(path)` put its config file in
    place; it must exit with status 2 at once. Its stderr."""
    picker = Picker(tmp_path, [free_port()])
    config = tmp_path / "config.yaml"
    config.unlink()
    place_config(config)
    try:
        done = subprocess.run(picker.cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the picker did not exit on {place_config.__name__}")
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_the_picker_exits_at_start_on_a_billion_laughs_config(tmp_path):
    def billion_laughs(path: Path) -> None:
        path.write_text(config_with(PICKER_CONFIGS[0].values[0]))

    assert "expands through its aliases" in picker_refusing_its_config(tmp_path, billion_laughs)


def test_the_picker_exits_at_start_on_a_config_that_is_a_fifo(tmp_path):
    assert "not a regular file" in picker_refusing_its_config(tmp_path, os.mkfifo)


def replace_with(path: Path, how: str) -> None:
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dev-zero":
        path.symlink_to("/dev/zero")
    elif how == "directory":
        path.mkdir()
    elif how == "huge":
        with path.open("wb") as f:
            f.truncate(yaml_files.MAX_FILE_BYTES + 1)  # sparse: no disk is spent


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("fifo", "unreadable"),
        ("dev-zero", "unreadable"),
        ("huge", "unreadable"),
        ("directory", "invalid"),  # a directory is read as one, here with no pool in it
    ],
)
async def test_a_pool_file_replaced_by_a_non_file_keeps_the_pool(tmp_path, how, reason):
    async with watched_pool(tmp_path) as (path, ds, metrics):
        replace_with(path, how)
        await wait_for_async(lambda: errors(metrics, reason) >= 1)
        assert only_the_first_pod(ds)
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
        write(path, POOL, pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))
        await wait_for_async(lambda: len(ds.endpoints()) == 2)


async def test_a_billion_laughs_pool_file_keeps_the_pool(tmp_path):
    async with watched_pool(tmp_path) as (path, ds, metrics):
        bomb = {**pod("b", "10.0.0.2"), "metadata": {"name": "b", "labels": "BOMB"}}
        text = laughs() + "---\n" + yaml.safe_dump_all([POOL, bomb])
        path.write_text(text.replace("BOMB", BOMB))
        await wait_for_async(lambda: errors(metrics, "invalid") == 1)
        assert only_the_first_pod(ds)


async def problems_beside_a_good_policy(tmp_path: Path, files: dict[str, str]) -> list[str]:
    """Apply a directory with a valid AutoScalingPolicy and these files: the policy applies
    whatever they hold; the problems found."""
    policy = yaml.safe_load((CRD_EXAMPLES / "autoscalingpolicy.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    store = MemoryStore()
    md = ManifestDirectory(store, tmp_path)
    await md.apply_once()
    assert await store.get(AUTOSCALING_POLICY, "default", policy["metadata"]["name"])
    assert (await store.list(MODEL_INFER))[0] == []
    return md.problems


async def test_a_billion_laughs_manifest_is_a_problem_and_the_rest_applies(tmp_path):
    infer = yaml.safe_load((CRD_EXAMPLES / "modelinfer.yaml").read_text())
    infer["spec"]["laughs"] = "BOMB"
    text = laughs() + "---\n" + yaml.safe_dump(infer)
    problems = await problems_beside_a_good_policy(
        tmp_path, {"infer.yaml": text.replace("BOMB", BOMB), "deep.yaml": "a: " + "[" * 100_000}
    )
    assert any("infer.yaml" in p and "expands through its aliases" in p for p in problems)
    assert any("deep.yaml" in p and "nested too deeply" in p for p in problems)


# PyYAML raises ValueError, not a YAMLError, on values it cannot construct.
UNCONSTRUCTABLE = {"5000-digit int": "9" * 5000, "13th month": "2001-13-45"}


@pytest.mark.parametrize("value", UNCONSTRUCTABLE.values(), ids=UNCONSTRUCTABLE.keys())
def test_a_value_yaml_cannot_construct_is_a_config_error(value):
    with pytest.raises(ConfigError, match="a value the reader cannot hold"):
        load_config(f"kind: EndpointPickerConfig\napiVersion: {value}\n")


@pytest.mark.parametrize("value", UNCONSTRUCTABLE.values(), ids=UNCONSTRUCTABLE.keys())
async def test_a_value_yaml_cannot_construct_keeps_the_pool(tmp_path, value):
    async with watched_pool(tmp_path) as (path, ds, metrics):
        path.write_text(yaml.safe_dump_all([POOL, pod("b", "PODIP")]).replace("PODIP", value))
        # Counted before as "internal", a bug of ours.
        await wait_for_async(lambda: errors(metrics, "invalid") == 1)
        assert only_the_first_pod(ds)


async def test_a_value_yaml_cannot_construct_is_a_problem_and_the_rest_applies(tmp_path):
    problems = await problems_beside_a_good_policy(
        tmp_path, {"digits.yaml": "kind: Model\nreplicas: " + "9" * 5000 + "\n"}
    )
    assert any("digits.yaml" in p and "cannot hold" in p for p in problems)
