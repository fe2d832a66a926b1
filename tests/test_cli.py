"""Smoke tests through the installed console script, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from darkhorse.cli import SUBCOMMANDS

DARKHORSE = [sys.executable, "-m", "darkhorse"]  # this checkout (conftest puts its src/ on PYTHONPATH)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DARKHORSE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_each_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: darkhorse" in result.stdout


def test_params_counts_a_preset():
    result = run_cli("params", "--preset", "forge-nano")
    assert result.returncode == 0, result.stderr
    assert "125.85M" in result.stdout


def test_config_errors_are_one_line_without_traceback():
    result = run_cli("params", "--preset", "tiny-cpu", "train.lrr=1")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("darkhorse: error: unknown config key 'train.lrr'")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_prompt_without_runs_says_how_to_get_a_model(tmp_path):
    result = run_cli("--prompt", "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "darkhorse demo" in result.stderr and "Traceback" not in result.stderr


def _help_texts() -> dict[str, tuple[str, list]]:
    """Each command's full --help text and its parser's actions, from the parser the CLI builds."""
    import argparse

    from darkhorse.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: (command.format_help(), command._actions) for name, command in commands.items()}


def test_help_defaults_are_the_code_defaults():
    """Every `(default X)` an option's help quotes is the default the code uses (None defaults are filled
    in by library code; tests/data/test_cli.py checks prepare's)."""
    import re

    checked = 0
    for name, (_, actions) in _help_texts().items():
        for action in actions:
            quoted = re.search(r"\(default ([^):;,]+)\)", action.help or "")
            if quoted is None or action.default is None or isinstance(action.default, list):  # list: per item
                continue
            value, default = quoted.group(1).strip(), action.default
            same = float(value) == default if isinstance(default, (int, float)) else value == str(default)
            assert same, f"{name} {action.option_strings}: help says default {value}, the code uses {default!r}"
            checked += 1
    assert checked >= 8  # chat --max-new-tokens (256, not generate's 128) among them


def test_help_names_only_commands_that_exist():
    import re

    for name, (text, _) in _help_texts().items():
        for mentioned in re.findall(r"(?:`|^\s*)darkhorse ([a-z][a-z_-]*)", text, re.MULTILINE):
            assert mentioned in SUBCOMMANDS, f"`{name} --help` names `darkhorse {mentioned}`, which is not a command"
