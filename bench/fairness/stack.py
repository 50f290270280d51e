"""examples/fairness as a running stack on free ports, with or without its flow control."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from infergw.stack.resources import EXAMPLES

EXAMPLE = EXAMPLES / "fairness"


def copy_example(into: Path, *, flow_control: bool = True) -> Example:
    """A copy of examples/fairness in `into`; without flow control its picker config loses
    the flowControl section (and nothing else), so requests go straight to the pod."""
    into.mkdir(parents=True, exist_ok=True)
    for path in EXAMPLE.glob("*.yaml"):
        shutil.copy(path, into / path.name)
    if not flow_control:
        config_path = into / "epp-config.yaml"
        config = yaml.safe_load(config_path.read_text())
        config.pop("flowControl", None)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Example.read(into)


def fairness_stack(workdir: Path, *, flow_control: bool = True) -> LocalStack:
    """Not started yet: use it as a context manager."""
    example = copy_example(workdir / "example", flow_control=flow_control)
    return LocalStack(StackConfig.from_example(example, workdir / "run", free_stack_ports()))
