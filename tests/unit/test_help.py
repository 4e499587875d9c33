"""`psgrid --help` and every subcommand's help: unchanged unless on purpose, and complete.

The expected texts under tests/unit/help/ were captured with COLUMNS=100 from
the command line as it stood; a change to a flag or its help text is a change
to these files, made on purpose. Every flag must say what it does.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib

import pytest

from psgrid.cli import build_parser

HELP = pathlib.Path(__file__).parent / "help"


def help_text(command: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*([command] if command != "psgrid" else []), "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", sorted(p.stem for p in HELP.glob("*.txt")))
def test_help_is_unchanged(command, monkeypatch):
    assert help_text(command, monkeypatch) == (HELP / f"{command}.txt").read_text()


def test_every_subcommand_has_its_expected_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert {p.stem for p in HELP.glob("*.txt")} == {"psgrid", *commands}
    assert os.path.isdir(HELP)


def flags_without_help(parser: argparse.ArgumentParser, path: str = "psgrid") -> list[str]:
    """Every argument of ``parser`` and of its subcommands, at any depth, that has no help text."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += flags_without_help(sub, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_of_every_subcommand_says_what_it_does():
    assert flags_without_help(build_parser()) == []


def test_the_description_is_plain_text():
    assert "``" not in build_parser().description
