"""The daemon against throwaway servers that fail: down at start, wrong password, restart, a query past its timeout.

In each, /metrics keeps answering, the source's up gauge goes 0 then 1 again, the log reports each change
of state once (not once per poll), and no password shows up in any log line, metric or page.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import psycopg
import pytest

from daemonproc import DaemonProcess
from dbpool_exporter.throwaway import PgCluster

RIGHT = "R1ght-pa55word-0f-app"
WRONG = "Wr0ng-pa55word-0f-app"
FAILED = re.compile(r"source poll failed source=pg\b")
RECOVERED = re.compile(r"source recovered source=pg\b")


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    c = PgCluster()
    try:
        yield c
    finally:
        c.destroy()


def _start(daemons: list[DaemonProcess], tmp_path: Path, dsn: str, *, statement_timeout: float = 5.0) -> DaemonProcess:
    config = (f"servers:\n  - name: pg\n    dsn: '{dsn}'\n    interval: 0.2\n    backoff_max: 0.5\n"
              f"    connect_timeout: 2\n    statement_timeout: {statement_timeout}\n")
    d = DaemonProcess(tmp_path, config)
    daemons.append(d)
    return d


def _up(d: DaemonProcess) -> float | None:
    return d.value("dbpool_source_up", source="pg", kind="postgres")


def _assert_no_secrets(d: DaemonProcess, *secrets: str) -> None:
    captured = {"log": d.log(), "metrics": d.metrics(), "landing page": d.get("/")[1]}
    for where, text in captured.items():
        for secret in secrets:
            assert secret not in text, f"password in the {where}"
        assert "Traceback" not in text, where


def _assert_logged_per_change(d: DaemonProcess, *, recoveries: int) -> None:
    log = d.log()
    print(log)  # shown with -s, and on failure
    failures = len(FAILED.findall(log))
    errors = d.value("dbpool_source_errors_total", source="pg") or 0
    # Not one line per failed poll (a single failed poll has its single line).
    assert 1 <= failures <= max(1, errors - 1), (failures, errors, log)
    assert len(RECOVERED.findall(log)) == recoveries, log
    assert "maximum number of running instances" not in log  # skipped runs are by design, not news


def test_server_unreachable_at_start(tmp_path: Path, cluster: PgCluster, daemons: list[DaemonProcess]) -> None:
    d = _start(daemons, tmp_path, f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
    d.wait_ready()  # ready after the first round, even though it failed
    d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) >= 3, "a few failed polls")
    assert _up(d) == 0
    assert "dbpool_server_max_connections" not in d.metrics()  # no stale or invented server figures
    assert "cannot connect to 127.0.0.1" in d.get("/")[1]
    cluster.start()
    d.wait_for(lambda: _up(d) == 1, "up after the server started")
    assert d.value("dbpool_server_max_connections") == 50
    _assert_logged_per_change(d, recoveries=1)
    _assert_no_secrets(d)
    assert d.stop()[0] == 0


def test_wrong_password(tmp_path: Path, cluster: PgCluster, daemons: list[DaemonProcess]) -> None:
    cluster.require_passwords()
    cluster.start()
    cluster.set_password("app", RIGHT, create=True)
    # The daemon is given the wrong one.
    d = _start(daemons, tmp_path, f"postgresql://app:{quote(WRONG)}@127.0.0.1:{cluster.port}/postgres")
    d.wait_ready()
    d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) >= 3, "a few failed polls")
    assert _up(d) == 0
    assert "password authentication failed for user" in d.get("/")[1]
    assert "password authentication failed for user" in d.log()
    cluster.set_password("app", WRONG)  # now the daemon's password is the right one
    d.wait_for(lambda: _up(d) == 1, "up once the password matches")
    _assert_logged_per_change(d, recoveries=1)
    _assert_no_secrets(d, RIGHT, WRONG, quote(WRONG))
    assert d.stop()[0] == 0


def test_server_restarted_while_running(tmp_path: Path, cluster: PgCluster, daemons: list[DaemonProcess]) -> None:
    cluster.start()
    d = _start(daemons, tmp_path, f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
    d.wait_for(lambda: _up(d) == 1, "up")
    cluster.stop("fast")
    d.wait_for(lambda: _up(d) == 0, "down after the server stopped")
    d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) >= 4, "a few failed polls")
    assert d.get("/-/healthy")[0] == 200
    cluster.start()
    d.wait_for(lambda: _up(d) == 1, "up after the server came back")
    _assert_logged_per_change(d, recoveries=1)
    _assert_no_secrets(d)
    assert d.stop()[0] == 0


def test_query_slower_than_statement_timeout(tmp_path: Path, cluster: PgCluster,
                                             daemons: list[DaemonProcess]) -> None:
    cluster.start()
    d = _start(daemons, tmp_path, f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", statement_timeout=0.5)
    d.wait_for(lambda: _up(d) == 1, "up")
    # A real lock, not a sleep: pg_stat_activity joins pg_database, so the poll waits behind this
    # transaction until the server's statement_timeout cancels it.
    with psycopg.connect(cluster.dsn) as locker:
        locker.execute("LOCK TABLE pg_catalog.pg_database IN ACCESS EXCLUSIVE MODE")
        d.wait_for(lambda: _up(d) == 0, "down while the catalog is locked")
        d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) >= 3, "a few timed-out polls")
        assert "canceling statement due to statement timeout" in d.get("/")[1]
        locker.rollback()
    d.wait_for(lambda: _up(d) == 1, "up after the lock was released")
    # The connection itself stayed healthy: one failure line, one recovery, and no reconnect.
    assert len(FAILED.findall(d.log())) == 1, d.log()
    _assert_logged_per_change(d, recoveries=1)
    _assert_no_secrets(d)
    assert d.stop()[0] == 0


def test_server_stops_answering(tmp_path: Path, cluster: PgCluster, daemons: list[DaemonProcess]) -> None:
    """A backend that hangs (SIGSTOP: no reply, not even to a cancel) trips the client-side timeout."""
    cluster.start()
    d = _start(daemons, tmp_path, f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", statement_timeout=0.3)
    d.wait_for(lambda: _up(d) == 1, "up")
    with psycopg.connect(cluster.dsn, autocommit=True) as admin:
        pids = [r[0] for r in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbpool-exporter'")]
    assert len(pids) == 1, "one persistent connection per server"
    os.kill(pids[0], signal.SIGSTOP)
    try:
        errors = d.value("dbpool_source_errors_total", source="pg") or 0
        d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) > errors, "a timed-out poll")
        assert d.get("/-/healthy")[0] == 200
        # The hung connection is dropped and a new one opened: up again without the old backend's help.
        d.wait_for(lambda: _up(d) == 1, "up on a fresh connection")
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert "query failed on 127.0.0.1" in d.log() and "client-side timeout" in d.log(), d.log()
    _assert_logged_per_change(d, recoveries=1)
    _assert_no_secrets(d)
    assert d.stop()[0] == 0


def test_hung_server_does_not_block_other_sources(tmp_path: Path, pg_dsn: str, daemons: list[DaemonProcess]) -> None:
    """A server that accepts TCP but never answers: its connect waits out connect_timeout, alone."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)  # the kernel completes handshakes; nobody ever reads or replies
        port = blackhole.getsockname()[1]
        config = ("defaults: {interval: 0.2, connect_timeout: 4, backoff_max: 0.5}\nservers:\n"
                  f"  - name: good\n    dsn: '{pg_dsn}'\n"
                  f"  - name: pg\n    dsn: 'postgresql://postgres:{RIGHT}@127.0.0.1:{port}/postgres'\n")
        d = DaemonProcess(tmp_path, config)
        daemons.append(d)
        d.wait_for(lambda: d.value("dbpool_source_up", source="good") == 1, "good up")
        start = d.value("dbpool_source_polls_total", source="good") or 0
        d.wait_for(lambda: (d.value("dbpool_source_polls_total", source="good") or 0) >= start + 3,
                   "good keeps polling")
        # ... while the hung server's first connect is still waiting (its poll has not completed once).
        assert d.value("dbpool_source_polls_total", source="pg") == 0
        d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) >= 1, "connect timeout")
        assert _up(d) == 0 and d.value("dbpool_source_up", source="good") == 1
        assert "no reply within 4 s (connect_timeout)" in d.get("/")[1]
        _assert_no_secrets(d, RIGHT)
        assert d.stop()[0] == 0
