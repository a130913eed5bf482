"""The console script and `python -m pdserve` start and dispatch."""

from __future__ import annotations

import subprocess
import sys

from pdserve.cli import build_parser, main


def test_help_lists_version_and_exits_cleanly(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "pdserve" in out


def test_python_dash_m_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pdserve ")


def test_parser_builds():
    parser = build_parser()
    assert parser.prog == "pdserve"
