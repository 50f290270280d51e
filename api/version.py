"""Which infergate this is: the distribution's version and the git commit it was built from,
for `infergate --version` and the picker's `inference_extension_info` metric.

The commit comes from, in order: `_build_info.py` beside this file, which the wheel build
writes (setup.py; in the image from the INFERGATE_COMMIT build argument, the image has no
.git); `git rev-parse HEAD` when this file sits in a git checkout (an editable install);
"unknown" when neither exists.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "infergw"
UNKNOWN = "unknown"
BUILD_INFO_MODULE = "infergw.api._build_info"
# The checkout this file is in, if it is one: api/ is a folder at the repository's top.
CHECKOUT = Path(__file__).resolve().parent.parent


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # imported from a bare tree, not installed
        return UNKNOWN


@functools.cache
def commit() -> str:
    """The full commit hash, or "unknown"."""
    try:
        built = importlib.import_module(BUILD_INFO_MODULE)
    except ImportError:
        built = None
    if built is not None and _is_commit(getattr(built, "COMMIT", "")):
        return built.COMMIT
    return checkout_commit(CHECKOUT) or UNKNOWN


def checkout_commit(root: Path) -> str | None:
    """HEAD of the git checkout at `root` (its own .git, never an enclosing repository's)."""
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git here, or it hung
        return None
    head = out.stdout.strip()
    return head if out.returncode == 0 and _is_commit(head) else None


def _is_commit(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def short_commit() -> str:
    full = commit()
    return full if full == UNKNOWN else full[:12]


def describe(program: str = "infergate") -> str:
    """`infergate 0.1.0 (commit 0123456789ab)`: what --version prints."""
    return f"{program} {version()} (commit {short_commit()})"


class VersionAction(argparse.Action):
    """`--version`: print describe() and exit; the commit is looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw):
        kw.setdefault("help", "print the version and commit, then exit")
        super().__init__(option_strings, dest=dest, default=default, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(describe(parser.prog))
        parser.exit()


def add_version_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action=VersionAction)
