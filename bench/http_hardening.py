"""The HTTP server under crowds, each figure beside a baseline measured in the same run.

    python bench/http_hardening.py            # both parts
    python bench/http_hardening.py --part backlog|slow

backlog: ``ab -n 2000 -c 100`` against the server with the old listen backlog (64) and the current one.
slow:    a child process under RLIMIT_NOFILE=256 serves /metrics while 600 clients each send a header line
         every 2 s; scrapes are timed and the child's CPU measured, without a connection bound (the old
         server) and with the default one. Figures to read, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from dbpool_exporter import httpserver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from procs import cpu_seconds, slow_clients  # noqa: E402


def _app() -> object:
    registry = CollectorRegistry()
    gauge = Gauge("bench_value", "A value.", ["i"], registry=registry)
    for i in range(200):
        gauge.labels(str(i)).set(i)
    return make_wsgi_app(registry)


def _ab(url: str) -> str:
    out = subprocess.run(["ab", "-q", "-n", "2000", "-c", "100", "-s", "30", url], capture_output=True, text=True,
                         timeout=300).stdout
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", out, re.M))
    return (f"failed {failed.group(1) if failed else '?'}, {rate.group(1) if rate else '?'} req/s, "
            f"p50 {pct.get('50', '?')} ms, p99 {pct.get('99', '?')} ms, max {pct.get('100', '?')} ms")


def backlog() -> None:
    if shutil.which("ab") is None:
        print("backlog: ab (apache2-utils) not installed")
        return
    for label, size in (("backlog 64 (before)", 64), (f"backlog {httpserver._Server.request_queue_size} (now)",
                                                      httpserver._Server.request_queue_size)):
        saved = httpserver._Server.request_queue_size
        httpserver._Server.request_queue_size = size
        try:
            server = httpserver.serve_wsgi(_app(), "127.0.0.1", 0)  # type: ignore[arg-type]
        finally:
            httpserver._Server.request_queue_size = saved
        try:
            print(f"ab -n 2000 -c 100, {label}: {_ab(server.url + '/metrics')}", flush=True)
        finally:
            server.shutdown()


_CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
sys.path.insert(0, {here!r})
from http_hardening import _app
from dbpool_exporter.httpserver import serve_wsgi
server = serve_wsgi(_app(), "127.0.0.1", 0, max_connections={limit})
print(server.port, flush=True)
time.sleep(120)
"""


def slow() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for label, limit in (("no connection bound (before)", "10**6"), ("default bound (now)", "None")):
        child = subprocess.Popen([sys.executable, "-c", _CHILD.format(here=here, limit=limit)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert child.stdout is not None
        port = int(child.stdout.readline())
        stop, opened = threading.Event(), []

        thread = threading.Thread(target=slow_clients, args=(port, 600, stop, opened), daemon=True)
        thread.start()
        time.sleep(5)
        cpu0, t0 = cpu_seconds(child.pid), time.monotonic()
        times, failures = [], 0
        for _ in range(10):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
                times.append((time.monotonic() - started) * 1000)
            except OSError:
                failures += 1
            time.sleep(0.3)
        cpu = (cpu_seconds(child.pid) - cpu0) / (time.monotonic() - t0)
        stop.set()
        thread.join(timeout=10)
        for s in opened:
            s.close()
        child.kill()
        child.wait()
        times.sort()
        shown = f"median {times[len(times) // 2]:.1f} ms, max {times[-1]:.1f} ms" if times else "none answered"
        print(f"600 slow clients, RLIMIT_NOFILE=256, {label}: {10 - failures}/10 scrapes answered ({shown}), "
              f"server CPU {cpu:.0%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["backlog", "slow"])
    args = parser.parse_args()
    if args.part in (None, "backlog"):
        backlog()
    if args.part in (None, "slow"):
        slow()


if __name__ == "__main__":
    main()
