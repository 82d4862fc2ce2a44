"""The command line a bench report records is the one that re-runs it, however the CLI was launched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import vipalloc.cli
from vipalloc.bench.cli import _command

ARGS = ["bench", "lm", "--parts", "league,variance", "--seeds", "3", "--out", "reports/lm run"]
WANT = "vipalloc bench lm --parts league,variance --seeds 3 --out 'reports/lm run'"


def test_command_is_the_full_line_for_the_script_and_for_python_m() -> None:
    assert _command(["/venv/bin/vipalloc", *ARGS]) == WANT
    assert _command(["vipalloc", *ARGS]) == WANT
    # python -m vipalloc.cli: argv[0] is the module's path
    assert _command([str(Path(vipalloc.cli.__file__)), *ARGS]) == WANT
    assert _command(["/site-packages/vipalloc/cli.py", *ARGS]) == WANT
    # in-process, under another program's argv: the arguments are unknown
    assert _command(["/usr/bin/pytest", "-q", "tests"]) == "vipalloc bench"
    assert _command([]) == "vipalloc bench"


def test_python_m_records_every_argument(tmp_path: Path) -> None:
    """End to end under ``python -m vipalloc.cli`` (the cheapest bench command that records its command line)."""
    out = tmp_path / "a b"
    args = ["bench", "budget", "--seeds", "1", "--strategies", "uniform", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "vipalloc.cli", *args], check=True, capture_output=True, env=env)
    text = (out / "budget.md").read_text()
    assert f"Command: `vipalloc bench budget --seeds 1 --strategies uniform --out '{out}'`" in text
