"""The `neoray` command's help: plain text, and every option explained."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from neoray.cli import COMMANDS, build_parser, main


def test_top_level_help_is_plain_text_and_lists_every_command():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    text = out.getvalue()
    assert "``" not in text and ":class:" not in text
    for name in COMMANDS:
        assert name in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_has_help(command):
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), (
            f"neoray {command}: {action.option_strings or action.dest} has no help"
        )
