"""Smoke test: the benchmark runs end to end and prints every variant; no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from dbpool_exporter.throwaway import PgCluster

SCRIPT = Path(__file__).with_name("checkout.py")


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """Like tests/conftest.py's: $DBPOOL_TEST_DSN or the local server, else a throwaway cluster."""
    dsn = os.environ.get("DBPOOL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error:
        with PgCluster() as cluster:
            yield cluster.dsn
        return
    yield dsn


def test_runs_and_prints_every_variant(pg_dsn: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "-n", "50", "-r", "1", "--warmup", "10"],
                          env=dict(os.environ, DBPOOL_TEST_DSN=pg_dsn), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    variants = [line.split("|")[2].strip() for line in rows[2:]]
    assert variants == ["bare", "dbpool", "dbpool+sites", "dbpool+leaks", "otel"] * 5
    assert sum("n/a" in line for line in rows) == 2  # psycopg pools: OpenTelemetry has no pool hooks


def test_bad_server_is_one_line() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--dsn", "postgresql://u:s3cret@127.0.0.1:1/x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "s3cret" not in done.stderr
