"""Load: ``ab -n 1000 -c 50`` against /metrics while real pools are busy (0 errors), the host's own request
latency with and without that load (printed, never asserted), and a short memory soak of the daemon.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psycopg_pool
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from conftest import sa_url
from daemonproc import DaemonProcess
from dbpool_exporter import Exporter

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, CONCURRENCY = 1000, 50


@pytest.fixture(scope="module")
def ab() -> str:
    path = shutil.which("ab")
    if path is None:
        pytest.fail("ab not found: install Debian's 'apache2-utils' (scripts/test does)")
    return path


def run_ab(ab: str, url: str) -> dict[str, str]:
    """``ab -l`` (the exposition's length varies between scrapes); its summary as a dict."""
    result = subprocess.run([ab, "-n", str(REQUESTS), "-c", str(CONCURRENCY), "-l", "-s", "30", url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    fields = dict(re.findall(r"^([A-Za-z][\w \-]*?):\s+(.+)$", result.stdout, re.M))
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", result.stdout, re.M))
    fields["p50 ms"], fields["p99 ms"] = percentiles.get("50", "?"), percentiles.get("99", "?")
    fields["raw"] = result.stdout
    return fields


def assert_no_errors(fields: dict[str, str]) -> None:
    raw = fields["raw"]
    assert fields.get("Complete requests") == str(REQUESTS), raw
    assert fields.get("Failed requests") == "0", raw
    assert "Non-2xx responses" not in fields, raw  # ab prints the line only when there are some


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return f"p50 {statistics.median(values) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


class Busy:
    """Worker threads that keep pools checked out and waiting, bounded by count and a stop flag."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.done = 0
        self.errors: list[str] = []

    def add(self, work: Callable[[], None], count: int) -> None:
        def loop() -> None:
            for _ in range(100_000):
                if self.stop.is_set():
                    return
                try:
                    work()
                    self.done += 1
                except Exception as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
        for _ in range(count):
            t = threading.Thread(target=loop, daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture
def engines(pg_dsn: str) -> Iterator[dict[str, Engine]]:
    url = sa_url(pg_dsn, "psycopg")
    made = {
        # More workers than connections: checkouts wait, overflow is used.
        "busy": create_engine(url, pool_size=4, max_overflow=2, pool_timeout=30),
        # The host's request path, measured: one instrumented, one the exporter never sees.
        "host": create_engine(url, pool_size=2, max_overflow=0),
        "bare": create_engine(url, pool_size=2, max_overflow=0),
    }
    yield made
    for engine in made.values():
        engine.dispose()


def _request(engine: Engine) -> float:
    """One host 'request': check a connection out, run a query, give it back."""
    started = time.perf_counter()
    with engine.connect() as conn:
        conn.execute(text("SELECT 1")).scalar_one()
    return time.perf_counter() - started


def _paired(host: Engine, bare: Engine, rounds: int, until: Callable[[], bool] = lambda: False
            ) -> tuple[list[float], list[float]]:
    """Alternate instrumented and bare requests, so both see the same machine at the same moment."""
    timed: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        timed[0].append(_request(host))
        timed[1].append(_request(bare))
        if until():
            break
    return timed


def test_ab_against_the_library_while_pools_are_busy(pg_dsn: str, ab: str, engines: dict[str, Engine]) -> None:
    pool = psycopg_pool.ConnectionPool(pg_dsn, min_size=2, max_size=4, open=True, timeout=30)
    exporter = Exporter()
    busy = Busy()
    try:
        exporter.register("busy", engines["busy"], interval=0.2).register("psycopg", pool, interval=0.2)
        exporter.register("host", engines["host"], interval=0.2)
        exporter.start_http_server(0)
        url = f"http://127.0.0.1:{exporter.http_port}/metrics"

        def sa_work() -> None:
            with engines["busy"].connect() as conn:
                conn.execute(text("SELECT pg_sleep(0.003)"))

        def pg_work() -> None:
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(0.003)")

        for engine in (engines["host"], engines["bare"]):
            _request(engine)  # connect outside the measurement
        quiet = _paired(engines["host"], engines["bare"], 300)
        busy.add(sa_work, 8)
        busy.add(pg_work, 6)
        time.sleep(0.5)
        busy_only = _paired(engines["host"], engines["bare"], 300)
        # Scraped ten times a second: still 150 times what one Prometheus at 15 s asks.
        scraping = threading.Event()

        def scrape_steadily() -> None:
            for _ in range(10_000):
                if scraping.wait(0.1):
                    return
                _scrape(url)

        steady = threading.Thread(target=scrape_steadily, daemon=True)
        steady.start()
        try:
            scraped = _paired(engines["host"], engines["bare"], 300)
        finally:
            scraping.set()
            steady.join(timeout=30)

        result: dict[str, dict[str, str]] = {}
        runner = threading.Thread(target=lambda: result.setdefault("ab", run_ab(ab, url)), daemon=True)
        runner.start()
        under_ab = _paired(engines["host"], engines["bare"], 5000, until=lambda: not runner.is_alive())
        runner.join(timeout=300)
        done_during = busy.done
        busy.finish()
        assert "ab" in result, "ab did not finish"
        fields = result["ab"]
        print(f"\nab -n {REQUESTS} -c {CONCURRENCY} on the library's /metrics with busy pools: "
              f"{fields.get('Complete requests')} complete, {fields.get('Failed requests')} failed, "
              f"{fields.get('Requests per second')}, p50 {fields['p50 ms']} ms, p99 {fields['p99 ms']} ms")
        print(f"busy workers finished {done_during} checkouts, {len(busy.errors)} errors")
        print("host request (checkout + SELECT 1), instrumented vs bare engine:")
        for label, (host, bare) in (("idle machine", quiet), ("pools busy", busy_only),
                                    ("busy + 10 scrapes/s", scraped), ("busy + ab -c 50", under_ab)):
            cost = (statistics.median(host) - statistics.median(bare)) * 1e6
            print(f"  {label:20s} instrumented {_ms(host)} | bare {_ms(bare)} | median cost {cost:+.0f} us "
                  f"({len(host)} pairs)")
        assert_no_errors(fields)
        assert not busy.errors, busy.errors[:3]
        assert len(under_ab[0]) >= 1
        # The load changed nothing in what is reported.
        families = {f.name for f in text_string_to_metric_families(_scrape(url))}
        assert {"dbpool_connections", "dbpool_acquire_wait_seconds", "dbpool_source_up"} <= families
    finally:
        busy.finish()
        exporter.stop()
        pool.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def test_ab_against_the_daemon(tmp_path: Path, pg_dsn: str, ab: str) -> None:
    d = DaemonProcess(tmp_path, f"servers:\n  - name: pg\n    dsn: '{pg_dsn}'\n    interval: 0.2\n")
    try:
        d.wait_ready()
        fields = run_ab(ab, f"http://127.0.0.1:{d.port}/metrics")
        print(f"\nab -n {REQUESTS} -c {CONCURRENCY} on the daemon: {fields.get('Failed requests')} failed, "
              f"{fields.get('Requests per second')}, p50 {fields['p50 ms']} ms, p99 {fields['p99 ms']} ms")
        assert_no_errors(fields)
        assert d.proc.poll() is None and d.value("dbpool_source_up", source="pg") == 1
        assert "Traceback" not in d.log()
        assert d.stop()[0] == 0
    finally:
        if d.proc.poll() is None:
            d.stop()


def test_short_soak(pg_dsn: str) -> None:
    """bench/soak.py for 15 s: the daemon stays up and answers every scrape; the figures are printed."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "15", "--warmup", "3",
                             "--sample-every", "1", "--dsn", pg_dsn, "--json"],
                            capture_output=True, text=True, timeout=120)
    print(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["alive_at_end"] and figures["exit_code"] == 0
    assert figures["scrapes_answered"] > 0 and figures["scrape_errors"] == 0
    assert figures["polls"] and figures["poll_errors"] == 0 and figures["rss_samples"] >= 5
