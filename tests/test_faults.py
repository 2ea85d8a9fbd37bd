"""Fault tests on throwaway clusters: 100 crash/restart cycles, a server out of slots, a poll query stuck on a lock.

Each test scrapes the daemon continuously from a thread and checks every answer; the daemon connects with
a scram password, and no form of it may appear in anything the daemon or ``check-config`` ever printed.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemonproc import SECRET, SECRET_FORMS, DaemonProcess, assert_no_secret, clean_env, exporter_command
from dbpool_exporter.throwaway import PgCluster

MONITOR = "monitor"
CYCLES = 100
DWELL = 0.1  # seconds each state is held after the scraper saw it


# --- helpers ------------------------------------------------------------------------------------
def scram_cluster(**settings: str) -> PgCluster:
    """A started throwaway cluster where role ``monitor`` (superuser) must log in over TCP with SECRET."""
    cluster = PgCluster(**settings)
    try:
        cluster.require_passwords()
        cluster.start()
        cluster.set_password(MONITOR, SECRET, create=True, superuser=True)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def secret_dsn(cluster: PgCluster) -> str:
    return f"postgresql://{MONITOR}:{quote(SECRET, safe='')}@127.0.0.1:{cluster.port}/postgres"


def check_config_output(tmp_path: Path, config: str) -> str:
    """What ``check-config`` prints for ``config`` with a typo added (a real process: its whole output)."""
    path = tmp_path / "typo.yml"
    path.write_text(config + "    intervall: 1\n")
    result = subprocess.run([*exporter_command(), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60, env=clean_env())
    assert result.returncode == 2 and "intervall: unknown key" in result.stderr, result
    return result.stdout + result.stderr


@dataclass
class Scrape:
    started: float
    ended: float
    status: int
    up: dict[str, float] = field(default_factory=dict)  # source -> dbpool_source_up
    max_connections: dict[str, float] = field(default_factory=dict)  # server label -> value


class Scraper(threading.Thread):
    """Scrapes ``/metrics`` back to back until stopped (or ``limit`` scrapes), keeping what each one said."""

    def __init__(self, port: int, *, pause: float = 0.01, limit: int = 100_000) -> None:
        super().__init__(name="scraper", daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pause, self.limit = pause, limit
        self.scrapes: list[Scrape] = []
        self.failures: list[str] = []
        self.leaks: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set() and len(self.scrapes) + len(self.failures) < self.limit:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    status, body = response.status, response.read().decode()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read().decode(errors="replace")
            except Exception as e:  # refused, reset, timed out: an unanswered scrape
                self.failures.append(f"{type(e).__name__}: {e}")
                time.sleep(self.pause)
                continue
            scrape = Scrape(started, time.monotonic(), status)
            if any(form in body for form in SECRET_FORMS):
                self.leaks.append(body)
            if status == 200:
                for family in text_string_to_metric_families(body):
                    for s in family.samples:
                        if s.name == "dbpool_source_up":
                            scrape.up[s.labels["source"]] = s.value
                        elif s.name == "dbpool_server_max_connections":
                            scrape.max_connections[s.labels["server"]] = s.value
            self.scrapes.append(scrape)
            time.sleep(self.pause)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the scraper did not stop"

    def first_after(self, since: float, check: Callable[[Scrape], bool], what: str, daemon: DaemonProcess,
                    timeout: float = 15.0) -> Scrape:
        """The first scrape started after ``since`` that satisfies ``check``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            assert daemon.proc.poll() is None, f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}"
            scrapes = self.scrapes
            for scrape in scrapes[seen:]:
                if scrape.started > since and check(scrape):
                    return scrape
            seen = len(scrapes)
            time.sleep(0.01)
        pytest.fail(f"timed out waiting for {what}; failures={self.failures[-3:]}; log:\n{daemon.log()[-4000:]}")

    def summary(self) -> str:
        took = sorted(s.ended - s.started for s in self.scrapes)
        if not took:
            return "no scrapes"
        p = lambda q: took[min(len(took) - 1, int(q * len(took)))]  # noqa: E731
        return (f"{len(self.scrapes)} scrapes answered, {len(self.failures)} failed; latency "
                f"p50 {p(0.5) * 1000:.1f} ms, p99 {p(0.99) * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms")


def assert_every_scrape_answered(scraper: Scraper) -> None:
    assert not scraper.failures, f"{len(scraper.failures)} unanswered scrapes, e.g. {scraper.failures[:3]}"
    bad = [s.status for s in scraper.scrapes if s.status != 200]
    assert not bad, f"{len(bad)} scrapes answered {sorted(set(bad))}"
    assert not scraper.leaks, f"the password shows in {len(scraper.leaks)} scrapes"
    assert scraper.scrapes, "no scrape happened"


def assert_nothing_leaked(d: DaemonProcess, tmp_path: Path, config: str) -> None:
    """Every place the daemon prints to, and check-config's problem text for the same config."""
    assert_no_secret("daemon log", d.log())
    assert_no_secret("landing page", d.get("/")[1])
    assert_no_secret("metrics", d.get("/metrics")[1])
    assert_no_secret("check-config output", check_config_output(tmp_path, config))


# --- 1. a hundred crash/restart cycles ----------------------------------------------------------------
def test_hundred_restarts_while_scraped(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    cluster = scram_cluster()
    try:
        config = (f"servers:\n  - name: pg\n    dsn: '{secret_dsn(cluster)}'\n    interval: 0.2\n"
                  f"    backoff_max: 0.2\n    connect_timeout: 2\n    statement_timeout: 2\n")
        d = DaemonProcess(tmp_path, config)
        daemons.append(d)
        d.wait_for(lambda: d.value("dbpool_source_up", source="pg") == 1, "up")
        server = f"127.0.0.1:{cluster.port}"
        scraper = Scraper(d.port)
        scraper.start()
        # Windows in which the truth is known and cannot change: from the first scrape that saw the change
        # until the test changes the server again.
        down_windows: list[tuple[float, float]] = []
        up_windows: list[tuple[float, float]] = []
        began = time.monotonic()
        try:
            up_since = time.monotonic()
            for cycle in range(CYCLES):
                stopping = time.monotonic()
                up_windows.append((up_since, stopping))
                cluster.stop("immediate")  # a crash: no goodbye to the exporter's connection
                seen = scraper.first_after(stopping, lambda s: s.up.get("pg") == 0, f"up 0 in cycle {cycle}", d)
                time.sleep(DWELL)  # so that a few scrapes fall inside each window
                starting = time.monotonic()
                down_windows.append((seen.ended, starting))
                cluster.start()
                seen = scraper.first_after(starting, lambda s: s.up.get("pg") == 1, f"up 1 in cycle {cycle}", d)
                up_since = seen.ended
                time.sleep(DWELL)
            time.sleep(0.5)  # a few more scrapes after the last restart
            up_windows.append((up_since, time.monotonic()))
        finally:
            scraper.stop()
        took = time.monotonic() - began
        print(f"{CYCLES} crash/restart cycles in {took:.1f} s ({took / CYCLES:.2f} s each); {scraper.summary()}")

        assert_every_scrape_answered(scraper)
        assert d.proc.poll() is None, d.log()

        def within(windows: list[tuple[float, float]]) -> list[Scrape]:
            return [s for s in scraper.scrapes if any(a <= s.started and s.ended <= b for a, b in windows)]

        while_down, while_up = within(down_windows), within(up_windows)
        print(f"checked against the truth: {len(while_down)} scrapes while down, {len(while_up)} while up")
        assert len(while_down) >= CYCLES and len(while_up) >= CYCLES, (len(while_down), len(while_up))
        # While the server is down: up 0, and no stale server figures served as current.
        wrong = [s for s in while_down if s.up.get("pg") != 0 or s.max_connections]
        assert not wrong, f"{len(wrong)} scrapes while down said otherwise, e.g. {wrong[:2]}"
        wrong = [s for s in while_up if s.up.get("pg") != 1 or s.max_connections.get(server) != 50]
        assert not wrong, f"{len(wrong)} scrapes while up said otherwise, e.g. {wrong[:2]}"

        log = d.log()
        # One recovery line per outage, not one per poll.
        assert log.count("source recovered source=pg") == CYCLES, log[-4000:]
        assert (d.value("dbpool_source_errors_total", source="pg") or 0) >= CYCLES
        assert d.value("dbpool_source_up", source="pg") == 1
        assert_nothing_leaked(d, tmp_path, config)
        assert d.stop()[0] == 0
    finally:
        cluster.destroy()


# --- 2. the server out of connection slots ------------------------------------------------------------
def test_server_at_max_connections_exporter_keeps_reporting(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    cluster = scram_cluster(max_connections="10", superuser_reserved_connections="3")
    holders: list[psycopg.Connection] = []
    sleeper: threading.Thread | None = None
    try:
        config = (f"servers:\n  - name: pg\n    dsn: '{secret_dsn(cluster)}'\n    interval: 0.2\n"
                  f"    backoff_max: 0.5\n    connect_timeout: 2\n")
        d = DaemonProcess(tmp_path, config)
        daemons.append(d)
        d.wait_for(lambda: d.value("dbpool_source_up", source="pg") == 1, "up")
        # Other clients, superusers too (so the reserved slots go as well), take every remaining slot.
        refused = ""
        for _ in range(20):  # bounded: 10 slots
            try:
                holders.append(psycopg.connect(cluster.dsn, autocommit=True, connect_timeout=5))
            except psycopg.OperationalError as e:
                refused = str(e)
                break
        assert "too many clients already" in refused, refused
        assert len(holders) == 9, "10 slots, one is the exporter's"
        with pytest.raises(psycopg.OperationalError, match="too many clients already"):
            psycopg.connect(cluster.dsn, connect_timeout=5)
        # Known states: 1 active, 3 idle in transaction, the other 5 idle.
        sleeper = threading.Thread(target=lambda: _ignore_cancel(holders[0]), daemon=True)
        sleeper.start()
        for conn in holders[1:4]:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        scraper = Scraper(d.port)
        scraper.start()
        try:
            def counted(state: str) -> float:
                return d.value("dbpool_server_connections", user="postgres", state=state) or 0

            d.wait_for(lambda: (counted("active"), counted("idle in transaction"), counted("idle")) == (1, 3, 5),
                       "the held connections counted by state")
            polls, errors = d.require("dbpool_source_polls_total", source="pg"), \
                d.require("dbpool_source_errors_total", source="pg")
            d.wait_for(lambda: d.require("dbpool_source_polls_total", source="pg") >= polls + 10,
                       "more polls while the server is full")
        finally:
            scraper.stop()
        print(f"server full: {scraper.summary()}")
        assert_every_scrape_answered(scraper)
        assert d.require("dbpool_source_errors_total", source="pg") == errors, d.get("/")[1]
        assert d.value("dbpool_source_up", source="pg") == 1
        assert all(s.up.get("pg") == 1 for s in scraper.scrapes), "up dropped while the server was full"
        assert d.value("dbpool_server_max_connections") == 10
        assert d.value("dbpool_server_reserved_connections") == 3
        assert d.value("dbpool_server_usable_connections") == 7
        # Still true: nobody could get in meanwhile.
        with pytest.raises(psycopg.OperationalError, match="too many clients already"):
            psycopg.connect(cluster.dsn, connect_timeout=5)
        assert_nothing_leaked(d, tmp_path, config)
        assert d.stop()[0] == 0
    finally:
        for conn in holders:
            with contextlib.suppress(psycopg.Error):
                conn.cancel()
        if sleeper is not None:
            sleeper.join(timeout=10)
        for conn in holders:
            conn.close()
        cluster.destroy()


def _ignore_cancel(conn: psycopg.Connection) -> None:
    with contextlib.suppress(psycopg.Error):  # cancelled at the end of the test
        conn.execute("SELECT pg_sleep(60)")


# --- 3. a poll query stuck behind a lock ----------------------------------------------------------------
def test_poll_stuck_on_lock_times_out_without_pile_up(tmp_path: Path, pg_dsn: str,
                                                      daemons: list[DaemonProcess]) -> None:
    cluster = scram_cluster()
    statement_timeout = 0.5
    try:
        config = ("defaults: {interval: 0.2, backoff_max: 0.5, connect_timeout: 2}\nservers:\n"
                  f"  - name: other\n    dsn: '{pg_dsn}'\n"
                  f"  - name: hung\n    dsn: '{secret_dsn(cluster)}'\n    statement_timeout: {statement_timeout}\n")
        d = DaemonProcess(tmp_path, config)
        daemons.append(d)
        d.wait_for(lambda: d.value("dbpool_source_up", source="hung") == 1
                   and d.value("dbpool_source_up", source="other") == 1, "both up")
        # Opened before the lock: a new connection would itself wait on pg_database to log in.
        sampler = psycopg.connect(cluster.dsn, autocommit=True)
        locker = psycopg.connect(cluster.dsn)
        scraper = Scraper(d.port)
        scraper.start()
        samples: list[tuple[int, int]] = []
        try:
            # pg_stat_activity joins pg_database, so the exporter's poll waits behind this lock until the
            # server's statement_timeout cancels it.
            locker.execute("LOCK TABLE pg_catalog.pg_database IN ACCESS EXCLUSIVE MODE")
            d.wait_for(lambda: d.value("dbpool_source_up", source="hung") == 0, "hung down")
            begin = {s: (d.require("dbpool_source_polls_total", source=s),
                         d.require("dbpool_source_errors_total", source=s)) for s in ("hung", "other")}
            window_start = time.monotonic()
            for _ in range(40):  # ~4 s of samples; the function, unlike the view, needs no pg_database
                row = sampler.execute(
                    "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock') "
                    "FROM pg_stat_get_activity(NULL) WHERE application_name = 'dbpool-exporter'").fetchone()
                assert row is not None
                samples.append((row[0], row[1]))
                time.sleep(0.1)
            window = time.monotonic() - window_start
            end = {s: (d.require("dbpool_source_polls_total", source=s),
                       d.require("dbpool_source_errors_total", source=s)) for s in ("hung", "other")}
            page = d.get("/")[1]
            locker.rollback()
            d.wait_for(lambda: d.value("dbpool_source_up", source="hung") == 1, "hung up after the lock went")
        finally:
            locker.rollback()
            scraper.stop()
            locker.close()
            sampler.close()
        hung_polls = end["hung"][0] - begin["hung"][0]
        print(f"lock held {window:.1f} s: hung source {hung_polls:g} polls, "
              f"{end['hung'][1] - begin['hung'][1]:g} errors; other source {end['other'][0] - begin['other'][0]:g} "
              f"polls; exporter backends on the locked server {sorted(set(samples))}; {scraper.summary()}")
        assert_every_scrape_answered(scraper)
        # No pile-up: one connection, at most one query waiting on the lock at any time.
        assert max(n for n, _ in samples) == 1 and max(w for _, w in samples) <= 1, samples
        assert any(w == 1 for _, w in samples), "the poll was never seen waiting on the lock"
        # Each poll of the hung server lasts a statement_timeout; runs that overlapped would make more.
        assert 2 <= hung_polls <= window / statement_timeout + 2, hung_polls
        assert end["hung"][1] - begin["hung"][1] == hung_polls, "every poll under the lock failed"
        assert "canceling statement due to statement timeout" in page
        assert "another operation is in progress" not in d.log()
        # The other server kept its interval's pace, without a single error.
        assert end["other"][0] - begin["other"][0] >= 3 and end["other"][1] == begin["other"][1]
        assert all(s.up.get("other") == 1 for s in scraper.scrapes)
        assert_nothing_leaked(d, tmp_path, config)
        assert d.stop()[0] == 0
    finally:
        cluster.destroy()
