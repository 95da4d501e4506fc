"""`product-match COMMAND`: one installed command for everything, each subcommand's help its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.__main__ import COMMANDS, main
from tests.conftest import ROOT

SCRIPT = Path(sys.executable).parent / "product-match"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_installed_command_lists_and_runs_its_subcommands() -> None:
    listed = run("--help")
    assert listed.returncode == 0 and all(name in listed.stdout for name in COMMANDS), listed.stdout
    ingest = run("ingest", "--help")
    assert ingest.returncode == 0 and "--photo-root" in ingest.stdout and "--prune" in ingest.stdout
    calibrate = run("calibrate", "--help")
    assert calibrate.returncode == 0 and "--target-precision" in calibrate.stdout
    bench = run("bench", "--help")
    assert bench.returncode == 0 and "quality" in bench.stdout
    unknown = run("nope")
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr


@pytest.mark.parametrize("command", ["ingest", "calibrate", "match", "adapt", "train", "serve"])
def test_each_subcommand_has_its_own_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and f"usage: product-match {command} " in capsys.readouterr().out
