"""One log format and one --log-level flag for our processes (picker, controllers, connector),
so an operator reads and greps their logs the same way. Here, on the floor they all stand on,
because it is a shared convention like the names in names.py; stdlib only.

The simulator stands on no floor (it imports nothing of ours) and keeps its own copy.
"""

from __future__ import annotations

import argparse
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_name(text: str) -> str:
    """argparse `type` of --log-level: a level `logging` knows, in any case, as its upper-case
    name. Anything else is a usage error (exit 2) rather than a traceback at start."""
    name = text.upper()
    if name not in logging.getLevelNamesMapping():
        known = ", ".join(sorted(n.lower() for n in logging.getLevelNamesMapping()))
        raise argparse.ArgumentTypeError(f"unknown log level {text!r} (one of: {known})")
    return name


def configure(level: str) -> None:
    """Log to stderr from `level` (a name level_name accepts) up, in FORMAT."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=FORMAT)
