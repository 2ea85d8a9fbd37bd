"""Memory soak: the daemon polls a churning server and is scraped back to back; its RSS is sampled throughout.

    python bench/soak.py                      # 60 s against $DBPOOL_TEST_DSN (or a throwaway cluster)
    python bench/soak.py --duration 600       # a longer soak
    python bench/soak.py --json               # the figures as one JSON line too (for tests)

Prints scrapes answered, errors, scrape latency, polls, and RSS at start (after warm-up), max and end, with the
slope of a least-squares line through the samples. Exits 1 if the daemon died or any scrape went unanswered.
Timings are figures to read, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from dbpool_exporter.throwaway import PgCluster, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import stop_process  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (KiB) over time, in KiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (r - mean_r) for t, r in samples) / var * 60


class Churn(threading.Thread):
    """Opens and closes connections under ever new application_names, some left idle in transaction."""

    def __init__(self, dsn: str, stop: threading.Event, *, width: int = 8) -> None:
        super().__init__(name="churn", daemon=True)
        self.dsn, self.stop_event, self.width = dsn, stop, width
        self.opened = 0
        self.errors = 0

    def run(self) -> None:
        held: list[psycopg.Connection] = []
        rng = random.Random(1)
        while not self.stop_event.is_set():
            try:
                # A new name each time: the exporter's label cap and folding are exercised for the whole run.
                conn = psycopg.connect(self.dsn, connect_timeout=5, application_name=f"soak-{self.opened % 500}")
                self.opened += 1
                if rng.random() < 0.3:
                    conn.execute("SELECT 1")  # leaves it idle in transaction
                held.append(conn)
            except psycopg.Error:
                self.errors += 1
            while len(held) > self.width:
                held.pop(rng.randrange(len(held))).close()
            self.stop_event.wait(0.02)
        for conn in held:
            conn.close()


class Scraper(threading.Thread):
    """Scrapes /metrics back to back; keeps latencies, failures and the last body."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(name="scraper", daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.stop_event = stop
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.last = ""

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    body = response.read().decode()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                self.stop_event.wait(0.05)
                continue
            self.latencies.append(time.perf_counter() - started)
            self.last = body
            self.stop_event.wait(0.005)


def _answers(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def soak(dsn: str, duration: float, sample_every: float, warmup: float, interval: float) -> dict[str, Any]:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dbpool-soak-"))
    config = workdir / "dbpool.yml"
    # max_label_values small so the churn's 500 names keep the folding busy.
    config.write_text(f"servers:\n  - name: soak\n    dsn: '{dsn}'\n    interval: {interval}\n"
                      f"    max_label_values: 20\n")
    log_path = workdir / "daemon.log"
    exe = Path(sys.executable).with_name("dbpool-exporter")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dbpool_exporter.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_SOURCE_NAME")}
    stop = threading.Event()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, "run", "--config.file", str(config), "--web.listen-address",
                                 f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, env=env)
        churn, scraper = Churn(dsn, stop), Scraper(port, stop)
        samples: list[tuple[float, int]] = []
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None:
                        break
                    time.sleep(0.1)
            churn.start()
            scraper.start()
            began = time.monotonic()
            end = began + duration
            while time.monotonic() < end and proc.poll() is None:
                now = time.monotonic()
                if now - began >= warmup:
                    samples.append((now - began, rss_kib(proc.pid)))
                time.sleep(min(sample_every, max(0.0, end - time.monotonic())))
            if proc.poll() is None:
                samples.append((time.monotonic() - began, rss_kib(proc.pid)))
        finally:
            stop.set()
            churn.join(timeout=10)
            scraper.join(timeout=15)
            alive = proc.poll() is None
            code = stop_process(proc, grace=15)
    lat = sorted(scraper.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    log_text = log_path.read_text(errors="replace")
    return {
        "duration_s": round(duration, 1),
        "alive_at_end": alive,
        "exit_code": code,
        "scrapes_answered": len(lat),
        "scrape_errors": len(scraper.failures),
        "first_errors": scraper.failures[:3],
        "scrape_p50_ms": round(pct(0.5), 2),
        "scrape_p99_ms": round(pct(0.99), 2),
        "scrape_max_ms": round(lat[-1] * 1000, 2) if lat else None,
        "polls": _value(scraper.last, "dbpool_source_polls_total"),
        "poll_errors": _value(scraper.last, "dbpool_source_errors_total"),
        "connections_churned": churn.opened,
        "rss_samples": len(samples),
        "rss_start_kib": samples[0][1] if samples else None,
        "rss_max_kib": max(r for _, r in samples) if samples else None,
        "rss_end_kib": samples[-1][1] if samples else None,
        "rss_slope_kib_per_min": round(slope_per_minute(samples), 1),
        # About ten points spread over the run, so the shape (a climb that levels off, or a steady leak) shows.
        "rss_trace": [(round(t), r) for t, r in [*samples[:: max(1, len(samples) // 10)], *samples[-1:]]],
        "traceback_in_log": "Traceback" in log_text,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to soak (default %(default)s)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the first RSS sample")
    parser.add_argument("--interval", type=float, default=0.2, help="the daemon's poll interval")
    parser.add_argument("--dsn", default=os.environ.get("DBPOOL_TEST_DSN", DEFAULT_DSN),
                        help="server to watch (a throwaway cluster when it does not answer)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    cluster = None
    dsn = args.dsn
    if not _answers(dsn):
        cluster = PgCluster(max_connections="100").start()
        dsn = cluster.dsn
    try:
        figures = soak(dsn, args.duration, args.sample_every, min(args.warmup, args.duration / 4), args.interval)
    finally:
        if cluster is not None:
            cluster.destroy()
    mib = lambda kib: f"{kib / 1024:.1f} MiB" if kib is not None else "-"  # noqa: E731
    print(f"soak {figures['duration_s']:g} s: {figures['scrapes_answered']} scrapes answered, "
          f"{figures['scrape_errors']} errors; latency p50 {figures['scrape_p50_ms']} ms, "
          f"p99 {figures['scrape_p99_ms']} ms, max {figures['scrape_max_ms']} ms")
    print(f"polls {figures['polls']}, poll errors {figures['poll_errors']}, "
          f"connections churned {figures['connections_churned']}")
    print(f"RSS start {mib(figures['rss_start_kib'])}, max {mib(figures['rss_max_kib'])}, "
          f"end {mib(figures['rss_end_kib'])}, slope {figures['rss_slope_kib_per_min']} KiB/min "
          f"({figures['rss_samples']} samples)")
    trace = figures["rss_trace"]
    print("RSS over time: " + ", ".join(f"{t:.0f} s {mib(r)}" for t, r in trace))
    if args.json:
        print(json.dumps(figures))
    ok = figures["alive_at_end"] and figures["scrape_errors"] == 0 and figures["exit_code"] == 0 \
        and not figures["traceback_in_log"] and figures["scrapes_answered"] > 0
    if not ok:
        print(f"FAILED: alive={figures['alive_at_end']} exit={figures['exit_code']} "
              f"errors={figures['first_errors']} traceback={figures['traceback_in_log']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
