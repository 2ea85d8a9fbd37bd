"""Lead time: a connection leak replayed against the shipped rules at their real durations.

A real Prometheus (scrape and evaluation every 15 s, its defaults) loads alerts/*.yml unchanged and
sends to a real Alertmanager (group_wait 30 s, its default) whose webhook this script receives. The
application is the incident's: async SQLAlchemy engines (asyncpg, pool_size 20 + max_overflow 40,
pool_timeout 30 s) under light traffic, and a ``get_db()`` that never gives its connection back:

- fast: one leaked connection every 15 s from empty (2/3 -> full in 5 min, 0 -> full in 15 min);
- slow: 40 already leaked when monitoring starts, then one a minute (2/3 -> full in 20 min);
- late: 40 already leaked when monitoring starts, then one every 15 s (the issue's replay: 2/3 ->
  full in 5 min with no history for a trend to show).

It prints, per pool, when the first request failed with the pool's timeout, and when each alert was
firing in Prometheus and when Alertmanager delivered it (its webhook), before (+) or after (-) that
first error. Takes ~25 minutes:

    python bench/leadtime.py [--pools fast,slow,late] [--limit 1800]

Runs a throwaway PostgreSQL cluster (as user postgres), everything on 127.0.0.1, torn down at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dbpool_exporter import Exporter  # noqa: E402
from dbpool_exporter.throwaway import PgCluster, free_port  # noqa: E402
from promstack import PromStack, wait_until  # noqa: E402

POOL_SIZE, MAX_OVERFLOW, POOL_TIMEOUT = 20, 40, 30.0
# name -> (already leaked when monitoring starts, seconds between leaks)
SCENARIOS = {"fast": (0, 15.0), "slow": (40, 60.0), "late": (40, 15.0)}
TRAFFIC_WORKERS = 4  # light traffic: each holds a connection 50-300 ms, then pauses 0.5-2 s
AFTER_ERROR = 120.0  # keep a pool running this long after its first error, to see the late alerts


@dataclass
class Pool:
    name: str
    engine: Any
    prefill: int
    every: float
    leaked: list[Any] = field(default_factory=list)
    first_error: float | None = None
    error_text: str = ""
    requests: int = 0
    timeouts: int = 0


class Deliveries:
    """Alertmanager's webhook: the first delivery of each (alertname, pool), with its description."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, str], tuple[float, str]] = {}
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                now = time.monotonic() - outer.t0
                with outer.lock:
                    for alert in body.get("alerts", []):
                        if alert.get("status") != "firing":
                            continue
                        key = (alert["labels"].get("alertname", ""), alert["labels"].get("pool", ""))
                        if key not in outer.first:
                            outer.first[key] = (now, alert.get("annotations", {}).get("description", ""))
                            print(f"[{now:7.1f} s] delivered {key[0]} pool={key[1] or '-'}", flush=True)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def get_db(engine: Any) -> Any:
    """The seed's bug: a session whose connection is never given back (a skipped ``close()``)."""
    conn = await engine.connect()
    await conn.exec_driver_sql("SELECT 1")
    return conn


async def handle_request(pool: Pool, t0: float, stop: asyncio.Event) -> None:
    from sqlalchemy import exc

    while not stop.is_set():
        try:
            async with pool.engine.connect() as conn:
                await conn.exec_driver_sql(f"SELECT pg_sleep({random.uniform(0.05, 0.3):.3f})")
            pool.requests += 1
        except exc.TimeoutError as e:
            note_error(pool, t0, e)
        await asyncio.sleep(random.uniform(0.5, 2.0))


def note_error(pool: Pool, t0: float, error: Exception) -> None:
    pool.timeouts += 1
    if pool.first_error is None:
        pool.first_error = time.monotonic() - t0
        pool.error_text = str(error).splitlines()[0]
        print(f"[{pool.first_error:7.1f} s] first error pool={pool.name}: {pool.error_text}", flush=True)


async def leak(pool: Pool, t0: float, stop: asyncio.Event) -> None:
    from sqlalchemy import exc

    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), pool.every)
            return
        except asyncio.TimeoutError:
            pass
        try:
            pool.leaked.append(await get_db(pool.engine))
        except exc.TimeoutError as e:
            note_error(pool, t0, e)


def report(pools: list[Pool], deliveries: Deliveries, firing: dict[tuple[str, str], float]) -> None:
    print()
    print("| leak | first pool error | alert | firing in Prometheus | delivered (group_wait 30 s) "
          "| delivered before the first error | top holder named in the alert |")
    print("|---|---:|---|---:|---:|---:|---|")
    for pool in pools:
        leaked, every = SCENARIOS[pool.name]
        shape = f"{pool.name}: {leaked} leaked at start, +1 every {every:g} s"
        error = f"{pool.first_error:.0f} s" if pool.first_error is not None else "none"
        rows = sorted(((t, name, text) for (name, p), (t, text) in deliveries.first.items()
                       if p == pool.name), key=lambda r: r[0])
        if not rows:
            print(f"| {shape} | {error} | (none) | | | | |")
        for i, (t, name, text) in enumerate(rows):
            lead = f"{pool.first_error - t:+.0f} s" if pool.first_error is not None else "—"
            top = text.split("Top holder: ", 1)[1].rstrip(".") if "Top holder: " in text else ""
            fired = firing.get((name, pool.name))
            fired_at = f"{fired:.0f} s" if fired is not None else "—"
            print(f"| {shape if i == 0 else ''} | {error if i == 0 else ''} | {name} | {fired_at} | {t:.0f} s "
                  f"| {lead} | {top} |")
    print()
    for pool in pools:
        print(f"# {pool.name}: {pool.requests} requests served, {pool.timeouts} pool timeouts, "
              f"{len(pool.leaked)} connections leaked; first error: {pool.error_text or 'none'}")


async def run(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    names = [n for n in args.pools.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        print(f"leadtime.py: unknown pool scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    rules = {p.name: p.read_text() for p in sorted((ROOT / "alerts").glob("dbpool-*.yml"))}
    deliveries = Deliveries()
    cluster = PgCluster(max_connections=str(80 * len(names) + 20)).start()
    exporter = Exporter()
    stack: PromStack | None = None
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    pools: list[Pool] = []
    try:
        url = cluster.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        for name in names:
            engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW,
                                         pool_timeout=POOL_TIMEOUT)
            prefill, every = SCENARIOS[name]
            pools.append(Pool(name, engine, prefill, every))
            exporter.register(name, engine)
        port = free_port()
        exporter.start_http_server(port)
        # The leak so far, before monitoring starts: one a second, so the exporter's own site capture
        # sees it the way it sees a real leak (from the first connection held for 10 s on).
        for pool in pools:
            for _ in range(pool.prefill):
                pool.leaked.append(await get_db(pool.engine))
                await asyncio.sleep(1.0)
        stack = PromStack([f"127.0.0.1:{port}"], rules, job="api", interval="15s", group_wait="30s",
                          webhook=deliveries.url).start()
        await asyncio.to_thread(wait_until, stack.targets_up, timeout=60, what="Prometheus scraping the app")
        t0 = deliveries.t0 = time.monotonic()
        print(f"# monitoring from now (t=0); pools {names}; rules from alerts/ at their real for: durations; "
              f"scrape/eval 15 s; Alertmanager group_wait 30 s", flush=True)
        for pool in pools:
            tasks += [asyncio.create_task(handle_request(pool, t0, stop)) for _ in range(TRAFFIC_WORKERS)]
            tasks.append(asyncio.create_task(leak(pool, t0, stop)))
        firing: dict[tuple[str, str], float] = {}
        while time.monotonic() - t0 < args.limit:
            await asyncio.sleep(2)
            for alert in await asyncio.to_thread(stack.prometheus_alerts):
                key = (alert["labels"].get("alertname", ""), alert["labels"].get("pool", ""))
                if alert["state"] == "firing" and key not in firing:
                    firing[key] = time.monotonic() - t0
            done = [p.first_error for p in pools]
            if all(e is not None for e in done) and time.monotonic() - t0 > max(done) + AFTER_ERROR:  # type: ignore[type-var]
                break
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        report(pools, deliveries, firing)
        return 0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for pool in pools:
            for conn in pool.leaked:
                with contextlib.suppress(Exception):  # the cluster is going away anyway
                    await conn.close()
        if stack is not None:
            stack.stop()
        await exporter.astop()
        for pool in pools:
            await pool.engine.dispose()
        deliveries.server.shutdown()
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pools", default="fast,slow,late", help="scenarios to run side by side (default: all)")
    parser.add_argument("--limit", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    parser.add_argument("--smoke", action="store_true", help="a 1-minute wiring check: pool 4+0, timeout 5 s")
    args = parser.parse_args(argv)
    if args.smoke:
        global POOL_SIZE, MAX_OVERFLOW, POOL_TIMEOUT, AFTER_ERROR
        POOL_SIZE, MAX_OVERFLOW, POOL_TIMEOUT, AFTER_ERROR = 4, 0, 5.0, 30.0
        SCENARIOS.update({name: (2, 5.0) for name in SCENARIOS})
    os.chdir(ROOT)  # sites are named relative to the working directory: bench/leadtime.py
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
