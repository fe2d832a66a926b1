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


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_params_counts_a_preset():
    result = run_cli("params", "--preset", "forge-nano")
    assert result.returncode == 0, result.stderr
    assert "125.85M" in result.stdout


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_config_errors_are_one_line_without_traceback():
    result = run_cli("params", "--preset", "tiny-cpu", "train.lrr=1")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("darkhorse: error: unknown config key 'train.lrr'")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_prompt_without_runs_says_how_to_get_a_model(tmp_path):
    result = run_cli("--prompt", "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "darkhorse demo" in result.stderr and "Traceback" not in result.stderr
