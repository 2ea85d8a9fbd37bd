"""`dbpool-exporter demo` as a user runs it: a subprocess, scraped while it runs, stopped by signals."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from dbpool_exporter import budget, demo
from dbpool_exporter.redact import from_conninfo
from dbpool_exporter.throwaway import free_port
from demoproc import APP, CHECKPOINTER, Demo, assert_cleaned_up, throwaway_dir

QUEUEPOOL_ERROR = ("sqlalchemy.exc.TimeoutError: QueuePool limit of size 4 overflow 8 reached, "
                   "connection timed out, timeout 5.00")


def _key(base: tuple[tuple[str, str], ...], **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((*base, *extra.items())))


@pytest.fixture
def run_demo() -> Iterator[type[Demo]]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        d = Demo(*args)
        started.append(d)
        return d

    yield start  # type: ignore[misc]
    for d in started:
        d.kill()


def test_demo_serves_moving_pool_metrics_and_stops_after_duration(run_demo: type[Demo]) -> None:
    d = run_demo("--duration", "15")
    base = throwaway_dir(d)
    assert "max_connections=40" in d.output
    d.wait_line(rf"metrics: http://127\.0\.0\.1:{d.port}/metrics", timeout=30)
    first = d.scrape()
    assert first["dbpool_max_connections"][APP] == 12
    assert first["dbpool_max_connections"][CHECKPOINTER] == 3
    info = [dict(k) for k in first["dbpool_pool_info"]]
    assert {i["pool"]: i["pool_class"] for i in info} == {"app": "AsyncAdaptedQueuePool",
                                                          "checkpointer": "AsyncConnectionPool"}
    for name in ("dbpool_usage_ratio", "dbpool_pending_acquires", "dbpool_acquire_wait_seconds_count"):
        assert APP in first[name] and CHECKPOINTER in first[name], name
    # The pools move: acquires keep happening on both, and checked_out is not frozen.
    checked_out = {first["dbpool_connections"][_key(APP, state="checked_out")]}
    latest = first
    for _ in range(20):
        time.sleep(0.5)
        latest = d.scrape()
        checked_out.add(latest["dbpool_connections"][_key(APP, state="checked_out")])
        waits = latest["dbpool_acquire_wait_seconds_count"]
        if (len(checked_out) > 1 and waits[APP] > first["dbpool_acquire_wait_seconds_count"][APP]
                and waits[CHECKPOINTER] > first["dbpool_acquire_wait_seconds_count"][CHECKPOINTER]):
            break
    else:
        pytest.fail(f"pool metrics did not move: checked_out values {checked_out}, latest {latest}")
    assert latest["dbpool_acquire_timeouts_total"][APP] == 0

    assert d.finish() == 0, d.output
    assert "summary:" in d.output and "Traceback" not in d.output
    assert_cleaned_up(d, base)


def test_demo_incident_exhausts_the_pool_not_the_server(run_demo: type[Demo]) -> None:
    d = run_demo("--incident", "--duration", "120")  # the duration is only a safety net
    base = throwaway_dir(d)
    d.wait_line(r"metrics: http://", timeout=30)
    for _ in range(120):
        samples = d.scrape()
        if (samples["dbpool_acquire_timeouts_total"][APP] > 0
                and samples["dbpool_checked_out_peak"][APP] == samples["dbpool_max_connections"][APP]):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the incident never exhausted the app pool:\n" + d.output)
    d.wait_line("request failed: " + re.escape(QUEUEPOOL_ERROR), timeout=10)
    assert samples["dbpool_pending_acquires_peak"][APP] > 0
    buckets = samples["dbpool_acquire_wait_seconds_bucket"]
    over_5s = buckets[_key(APP, le="+Inf")] - buckets[_key(APP, le="5.0")]
    assert over_5s > 0, "the timed-out waits (5 s) should land above the 5 s bucket"

    d.proc.send_signal(signal.SIGINT)
    assert d.finish() == 0, d.output
    assert "Traceback" not in d.output
    timeouts = int(d.wait_line(r"summary: \d+ requests ok, (\d+) failed with the QueuePool timeout", 1).group(1))
    assert timeouts > 0
    assert f"first QueuePool failure: {QUEUEPOOL_ERROR}" in d.output
    peaks = d.wait_line(r"peaks: app pool (\d+)/(\d+) checked out .*; server (\d+)/(\d+) connections", 1)
    app_peak, app_max, server_peak, server_max = map(int, peaks.groups())
    assert app_peak == app_max == 12
    assert server_max == 40 and 0 < server_peak < server_max * 0.8, "the server should stay well below its limit"
    assert_cleaned_up(d, base)


def test_demo_on_a_given_server_stops_on_sigterm(run_demo: type[Demo], pg_dsn: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = run_demo("--dsn", pg_dsn)
    d.wait_line(r"metrics: http://", timeout=30)
    assert "your PostgreSQL" in d.output
    assert d.scrape()["dbpool_max_connections"][APP] == 12
    # The budget command the banner suggests works as printed: this one process fits the server.
    suggested = d.wait_line(r"\(see: dbpool-exporter budget (.+)\)$", timeout=1).group(1).split()
    assert budget.main(suggested) == 0
    server = from_conninfo(pg_dsn)[0]
    assert re.search(rf"^{re.escape(server)} +2 +15 +\d+ \((exporter|--server-max)\) +\d+ +ok$",
                     capsys.readouterr().out, re.M)
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0, d.output
    assert "summary:" in d.output and "Traceback" not in d.output


def _one_line_failure(d: Demo) -> str:
    rc = d.finish()
    lines = d.output.splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in d.output, d.output
    return lines[0]


def test_demo_port_in_use_is_one_line(run_demo: type[Demo], pg_dsn: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        d = run_demo("--dsn", pg_dsn, "--port", str(busy.getsockname()[1]))  # the last --port wins
        line = _one_line_failure(d)
    assert line.startswith("dbpool-exporter demo: cannot serve /metrics on 127.0.0.1:")


def test_demo_bad_dsn_is_one_line_without_the_password(run_demo: type[Demo], tmp_path: Path) -> None:
    closed = free_port()
    dsn_file = tmp_path / "dsn"  # a password never goes in --dsn: process arguments are public
    dsn_file.write_text(f"postgresql://postgres:s3cret@127.0.0.1:{closed}/postgres\n")
    line = _one_line_failure(run_demo("--dsn-file", str(dsn_file)))
    assert "cannot connect to postgresql://postgres:***@127.0.0.1" in line
    assert "s3cret" not in line
    dsn_file.write_text("host=127.0.0.1 password=s3cret port=notaport")
    line = _one_line_failure(run_demo("--dsn-file", str(dsn_file)))
    assert "s3cret" not in line


def test_demo_without_postgresql_binaries_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # test_fresh.py hides every binary, the wheel's too (as root); this is the override pointing nowhere.
    monkeypatch.delenv("DBPOOL_DEMO_DSN", raising=False)
    monkeypatch.setenv("DBPOOL_PG_BINDIR", str(tmp_path))
    assert demo.main(["--port", str(free_port()), "--duration", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dbpool-exporter demo: $DBPOOL_PG_BINDIR={tmp_path} has no initdb, pg_ctl and postgres, "
                   "or pass --dsn"]
