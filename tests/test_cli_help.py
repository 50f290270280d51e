"""`--help` of every command reads as users look for options: each option under a named
heading (an argparse group, never the catch-all "options"), each default shown, and the
launcher's own help and errors say what to do next."""

from __future__ import annotations

import argparse
import importlib

import pytest

from infergw import cli

# Every command's parser, by how users call it.
PARSERS = {
    "up": "infergw.up",
    "status": "infergw.stack.status_screen",
    "install": "infergw.stack.install",
    "epp": "infergw.epp.options",
    "bbr": "infergw.bbr.options",
    "controllers": "infergw.controllers.app",
    "connector": "infergw.connector.options",
    "simulate": "infergw.simulator.config",
    "fetch tokenizer": "infergw.fetch.tokenizer",
    "runtime": "infergw.runtime.sidecar",
    "download": "infergw.fetch.download",
}
# Others add flags too; a group of theirs is as good as ours (the catch-all is not).
CATCH_ALL = ("options", "optional arguments")


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(PARSERS[command]).build_parser()


def shows_nothing(default: object) -> bool:
    return default is None or default is False or default == [] or default == ()


def loose_options(parser: argparse.ArgumentParser) -> list[str]:
    """Options in argparse's catch-all group (-h aside)."""
    return [
        a.option_strings[0]
        for group in parser._action_groups  # argparse keeps the groups only here
        if group.title in CATCH_ALL
        for a in group._group_actions
        # -h and --version stay at the top, where every command line tool has them.
        if a.option_strings
        and not isinstance(a, argparse._HelpAction)
        and "--version" not in a.option_strings
    ]


def hidden_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Options with a default worth showing whose help line does not show one."""
    hidden = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if shows_nothing(action.default) or action.default is argparse.SUPPRESS:
            continue
        # (argparse shows a default only beside help text: an option needs some.)
        shown = " ".join(parser._get_formatter()._format_action(action).split())
        if "default" not in shown:
            hidden.append(shown)
    return hidden


@pytest.mark.parametrize("command", PARSERS)
def test_every_option_is_under_a_named_heading(command):
    parser = parser_of(command)
    loose = loose_options(parser)
    assert loose == [], f"infergate {command}: options outside a named group: {loose}"
    named = [
        g for g in parser._action_groups if g.title not in (*CATCH_ALL, "positional arguments")
    ]
    assert all(g.title.strip() for g in named)


@pytest.mark.parametrize("command", PARSERS)
def test_help_renders_with_every_default(command):
    parser = parser_of(command)
    text = parser.format_help()
    assert text.startswith("usage: ")
    assert hidden_defaults(parser) == [], f"infergate {command}"


def test_the_formatter_shows_defaults_worth_showing_once():
    from infergw.api.cli_help import HelpFormatter

    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    g = p.add_argument_group("Things")
    g.add_argument("--port", type=int, default=8000, help="a port")
    g.add_argument("--flag", action="store_true", help="a switch")
    g.add_argument("--unset", default=None, help="a name")
    g.add_argument("--said", default=3, help="n (default 3)")
    text = " ".join(p.format_help().split())
    assert "a port (default: 8000)" in text
    assert "a switch --unset" in text and "a name --said" in text  # nothing to show
    assert text.count("default") == 2  # --said says its own, once


def test_the_launchers_help_lists_every_command_in_groups(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("up", "install", "controllers", "epp", "bbr", "connector", "runtime",
                    "simulate", "download", "fetch", "bench"):  # fmt: skip
        assert f"\n  {command} " in out, command
    assert "Run the gateway on this machine:" in out


def test_the_launchers_errors_say_what_to_do_next(capsys):
    assert cli.main(["serve"]) == 2
    assert "unknown command 'serve'; see the commands below" in capsys.readouterr().err
    assert cli.main(["bench", "--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"\n  {name} " in listing for name in cli.BENCHMARKS)
    assert cli.run_bench(["nope"]) == 2
    assert "infergate bench --help says what each measures" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["up", "install", "epp", "bbr", "controllers", "connector",
                                     "simulate", "runtime", "download"])  # fmt: skip
def test_each_commands_help_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: infergate ")


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a benchmark's main built."""


def bench_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `infergate bench NAME` builds (in its main), caught before it parses."""
    try:
        module = importlib.import_module(cli.BENCHMARKS[name])
    except ModuleNotFoundError as exc:  # the bench extra (matplotlib, numba) not installed
        pytest.skip(f"infergate bench {name} needs {exc.name}")

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    with pytest.raises(_Parsed) as info:
        module.main([])
    return info.value.args[0]


@pytest.mark.parametrize("name", sorted(cli.BENCHMARKS))
def test_every_benchmarks_options_are_under_a_named_heading_with_defaults(name, monkeypatch):
    parser = bench_parser(name, monkeypatch)
    assert parser.prog == f"infergate bench {name}"
    assert loose_options(parser) == []
    assert hidden_defaults(parser) == []
