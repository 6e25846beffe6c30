"""The `neoray` command's help: plain text, and every option explained."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
from cli_output import one_line

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


# For each command, an input it cannot use: it must exit 1 with one line on stderr (README, "Exit status").
UNUSABLE = {
    "synth": lambda tmp: ["synth", str(tmp / "out"), "--size", "16x9"],
    "prepare": lambda tmp: ["prepare", "--coco", str(tmp / "missing.json"), "--images", str(tmp), "--out",
                            str(tmp / "shards"), "--size", "320x180"],
    "check": lambda tmp: ["check", str(tmp / "missing")],
    "train": lambda tmp: ["train", str(tmp / "missing.yaml")],
    "eval": lambda tmp: ["eval", str(tmp / "missing"), "--data", str(tmp / "missing")],
    "predict": lambda tmp: ["predict", str(tmp / "missing"), str(tmp / "image.png"), "--out", str(tmp / "out")],
    "sweep": lambda tmp: ["sweep", "--config", str(tmp / "missing.yaml"), "--output", str(tmp / "sweeps")],
    "report": lambda tmp: ["report", str(tmp / "missing")],
    "export": lambda tmp: ["export", str(tmp / "missing"), "--out", str(tmp / "model.onnx")],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_exits_1_with_one_line_for_input_it_cannot_use(command, tmp_path, capsys):
    assert command in UNUSABLE, f"add an unusable input for `neoray {command}` to UNUSABLE"
    code = main(UNUSABLE[command](tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    one_line(err)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_wrong_command_line_exits_2_as_argparse_does(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--no-such-option"])
    assert exited.value.code == 2


def test_the_one_line_check_ignores_what_ray_forwards_from_its_own_processes_and_nothing_else():
    # What a sweep printed on a CI machine whose disk was over 95% full: Ray's raylet warned around
    # neoray's one-line error.
    raylet = ("\x1b[33m(raylet)\x1b[0m [2026-12-07 08:10:39,787 E 14621 14631] (raylet) file_system_monitor.cc:116: "
              "/tmp/ray/session_x is over 95% full, available space: 11.4654 GB")
    error = "neoray sweep: error: data.train: /data/train is a local path that the node at 192.0.2.2 does not see"
    worker = "(RayTrainWorker pid=4242, ip=192.0.2.2) a warning from a training worker"
    assert one_line(f"{raylet}\n{error}\n{raylet} [repeated 2x across cluster]\n{worker}\n") == error
    with pytest.raises(AssertionError):
        one_line(f"{error}\nneoray sweep: error: (second) line\n")
    with pytest.raises(AssertionError):
        one_line(f"Traceback (most recent call last):\n{raylet}\n{error}\n")
