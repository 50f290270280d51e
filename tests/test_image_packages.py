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


def test_the_distribution_includes_every_package():
    """Each folder is mapped under the namespace, and every package below it is listed."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    name_of = {folder: name for name, folder in setuptools["package-dir"].items()}
    assert set(name_of) == top_level_packages()
    folders = [
        init.parent.relative_to(ROOT).parts
        for init in ROOT.glob("*/**/__init__.py")
        if init.parent.relative_to(ROOT).parts[0] in name_of
    ]
    assert set(setuptools["packages"]) == {".".join([name_of[f[0]], *f[1:]]) for f in folders}


def test_the_image_copies_every_top_level_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY ([\w-]+) \./\1$", dockerfile, re.MULTILINE))
    assert copied == top_level_packages()
