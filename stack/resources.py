"""The files the commands read at run time, found as the installed package's data.

The wheel ships them inside `infergw` (pyproject.toml's package-data): the examples
(`infergw.examples`, the repository's examples/), the cluster manifests and the local Envoy
template (`infergw.gateway_manifests`, gateway-manifests/), the CRDs (`infergw.crds`, crds/)
and the simulator's tokenizer (`infergw.simulator`'s default_model/). A checkout, editable
install or not, finds the same files in its folders, so nothing here knows where the source
tree is.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path


def package_dir(package: str) -> Path:
    """The directory of an installed data package (wheels install as files, never zipped)."""
    found = files(package)
    if not isinstance(found, Path):
        raise RuntimeError(f"{package} is not installed as a directory ({found!r})")
    return found


def _code_package_dir(package: str) -> Path:
    """A code package's directory, found without importing it (the stack stands below the
    simulator: docs/architecture.md)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


_SIMULATOR = _code_package_dir("infergw.simulator")
# Where an example's relative file:// paths start (file://simulator/default_model): the
# directory holding the simulator's folder — the repository's root in a checkout, the
# `infergw` package in a wheel. The controllers run from there.
FILE_URI_ROOT = _SIMULATOR.parent
EXAMPLES = package_dir("infergw.examples")
QUICKSTART = EXAMPLES / "quickstart"
GATEWAY_MANIFESTS = package_dir("infergw.gateway_manifests")
ENVOY_TEMPLATE = GATEWAY_MANIFESTS / "local" / "envoy.yaml.j2"
CRDS = package_dir("infergw.crds")
# The simulator's bundled tokenizer, which the picker needs to tokenize prompts as pods do.
DEFAULT_MODEL_DIR = _SIMULATOR / "default_model"
