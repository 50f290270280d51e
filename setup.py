"""The wheel's build hook: write infergw/api/_build_info.py with the commit it is built from,
so `infergate --version` and the picker's inference_extension_info name it where there is no
checkout (the image, a pip install). Everything else is in pyproject.toml.

The commit: $INFERGATE_COMMIT (the image's build argument: the Docker build has no .git),
else `git rev-parse HEAD` of this checkout; neither: no file, and api/version.py says
"unknown". An editable install reads the checkout's HEAD at run time instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
VERSION_PY = HERE / "api" / "version.py"
BUILD_INFO = Path("infergw", "api", "_build_info.py")
COMMIT_ENV = "INFERGATE_COMMIT"


def _version_module():
    """api/version.py, by its path: the package is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("_infergate_version", VERSION_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_commit() -> str | None:
    given = os.environ.get(COMMIT_ENV, "").strip().lower()
    if given:
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", given):
            raise SystemExit(f"{COMMIT_ENV}={given!r} is not a full git commit hash")
        return given
    return _version_module().checkout_commit(HERE)


class BuildPyWithCommit(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's HEAD is read at run time
        target = Path(self.build_lib, BUILD_INFO)
        commit = build_commit()
        if commit is None:
            target.unlink(missing_ok=True)  # an earlier build's, in a reused build/
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            f'"""Written by setup.py when the wheel was built."""\n\nCOMMIT = "{commit}"\n'
        )


if __name__ == "__main__":  # how setuptools' build backend runs it; tests import it
    setup(cmdclass={"build_py": BuildPyWithCommit})
