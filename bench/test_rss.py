"""Smoke test: bench/rss.py runs end to end (a few connections, one poll) and prints its rows; no figure asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("rss.py")


def test_layers() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--layers"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "asyncpg" in done.stdout and "apscheduler (poll jobs)" in done.stdout


def test_runs_and_prints_a_row_per_process() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--connections", "5", "--polls", "1", "--variants", "plain"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.split("process", 1)[1].splitlines()[1:]
    assert rows[0].startswith("dbpool-exporter run (plain)")
    assert rows[0].split()[-1] not in ("?", "0")  # it saw the server's connections
    if len(rows) > 1:  # postgres_exporter, where it is installed
        assert rows[1].startswith("postgres_exporter")
