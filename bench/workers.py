"""Several workers, one endpoint: scrape time and publishing cost, side by side with one process alone.

``python bench/workers.py`` starts N real worker processes (default 16), each with P real SQLAlchemy
pools (default 4) that have served some checkouts, publishing to one shared directory as under
gunicorn/uvicorn. It then times, in the same run:
- an HTTP scrape of one endpoint that serves all N workers (an exporter in the group, as any worker's
  ``start_http_server`` is), against a scrape of one lone process with the same P pools (the baseline);
- one worker's publication (render + JSON + atomic replace), as CPU per second at the 1 s interval.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sqlalchemy import create_engine, text

from dbpool_exporter import Exporter

DEFAULT_DSN = os.environ.get("DBPOOL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")

WORKER = """
import sys, time
from sqlalchemy import create_engine, text
from dbpool_exporter import Exporter
dsn, directory, pools = sys.argv[1], sys.argv[2], int(sys.argv[3])
exporter = Exporter(multiprocess_dir=directory)
engines = [create_engine(dsn, pool_size=5, max_overflow=10) for _ in range(pools)]
for i, engine in enumerate(engines):
    exporter.register(f"pool{i}", engine)
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
exporter.start()
print("ready", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
exporter.stop()
"""


def _url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


def _engines(dsn: str, pools: int, directory: str | None = None) -> Exporter:
    exporter = Exporter(multiprocess_dir=directory)
    for i in range(pools):
        engine = create_engine(_url(dsn), pool_size=5, max_overflow=10)
        exporter.register(f"pool{i}", engine)
        for _ in range(20):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    return exporter.start_http_server(0)


def _scrape(exporter: Exporter) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{exporter.http_port}/metrics", timeout=10) as response:
        return response.read()


def _time(func, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        out.append(time.perf_counter() - started)
    return out


def _cpu(func, repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        func()
    return (time.process_time() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--pools", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dbpool-bench-") as directory:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, _url(args.dsn), directory, str(args.pools)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(args.workers)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            time.sleep(1.5)  # every worker has published
            alone = _engines(args.dsn, args.pools)
            # The reader is one more worker of the group, as any worker answering a scrape is.
            reader = _engines(args.dsn, args.pools, directory)
            time.sleep(1.5)
            body = _scrape(reader)
            seen = len([line for line in body.decode().splitlines() if line.startswith("dbpool_worker_up{")])
            base = _time(lambda: _scrape(alone), args.repeat)
            many = _time(lambda: _scrape(reader), args.repeat)
            alone_size = len(_scrape(alone))
            publish = _cpu(reader._publish, args.repeat)
            size = max(f.stat().st_size for f in Path(directory).glob("*.json"))
            alone.stop()
            reader.stop()
        finally:
            for p in procs:
                if p.stdin:
                    p.stdin.close()
            for p in procs:
                p.wait(10)

    def ms(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1e3:6.2f} ms   p95 {sorted(xs)[int(len(xs) * .95)] * 1e3:6.2f} ms"

    print(f"{args.workers + 1} live workers x {args.pools} pools (one JSON file per worker, largest {size} bytes)")
    print(f"scrape, one process alone ({args.pools} pools):   {ms(base)}   {alone_size} B")
    print(f"scrape, every worker ({seen} seen):            {ms(many)}   {len(body)} B")
    print(f"publish, one worker:  {publish * 1e6:7.1f} us CPU each = {publish * 100:.3f} % of a core at 1 s")


if __name__ == "__main__":
    main()
