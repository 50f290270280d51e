"""How our commands' `--help` reads: options in named groups (argparse argument groups, as
users look for them: "Pool and pods", "Scheduling", "KV cache", "TLS", "Logging"…) and each
option's default after its help. Here, on the floor every command stands on, as a shared
convention like logs.py; stdlib only. The simulator and `fetch` stand on no floor: their
help texts say `(default: %(default)s)` themselves.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (paragraphs, lists); `(default: X)` after an option's help,
    unless there is nothing to show (no default, an off switch, an empty list) or the help
    already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == [] or default == ()
        if nothing or default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)
