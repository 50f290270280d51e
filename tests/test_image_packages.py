"""Every top-level package of the repository ships: the distribution's package list names it
and the image's Dockerfile copies it, so a new folder (stack/, connector/, ...) that imports
in the editable install is not missing from `pip install .` or the image."""

from __future__ import annotations

import re
import tomllib

from tests.paths import ROOT

NOT_SHIPPED = {"tests"}


def top_level_packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in NOT_SHIPPED}


def test_the_distribution_includes_every_top_level_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.removesuffix("*") for pattern in include} == top_level_packages()


def test_the_image_copies_every_top_level_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE))
    assert copied == top_level_packages()
