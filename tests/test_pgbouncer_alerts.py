"""The shipped rules and the dashboard's PgBouncer row against a real PgBouncer, two daemons watching it, a real
app pool through it and a real Prometheus: clients queued in PgBouncer page, the budget counts PgBouncer once."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

from bouncersetup import Setup
from daemonproc import DaemonProcess, clean_env
from dbpool_exporter.throwaway import PgCluster
from promstack import PromStack, wait_until

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `dashboards` is a package at the repository root, not installed

from dashboards import generate as dashboards  # noqa: E402

PAGES = {"DbpoolPgBouncerPoolSaturated", "DbpoolPoolExhausted", "DbpoolAcquireWaitNearTimeout"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster(max_connections="40") as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE ROLE app LOGIN")
        yield pg


def _value(result: list[Any]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_queued_clients_page_and_the_budget_counts_pgbouncer_once(cluster: PgCluster, tmp_path: Path) -> None:
    setup = Setup(cluster, tmp_path)
    holders: list[psycopg.Connection[Any]] = []
    second: DaemonProcess | None = None
    waiter: threading.Thread | None = None
    try:
        # 2 server connections per pool, 10 clients at most; a queued client is dropped after 60 s.
        # reports: session pooling with a single server connection.
        bouncer = setup.start({"app": "", "reports": "pool_mode=session pool_size=1"}, default_pool_size="2",
                              reserve_pool_size="0", max_client_conn="10", query_wait_timeout="60")
        # A second daemon watches the same PgBouncer under another source name.
        (tmp_path / "second").mkdir()
        second = DaemonProcess(tmp_path / "second", "defaults: {interval: 0.3}\npgbouncers:\n  - name: pgb2\n"
                               "    dsn_env: PGB_DSN\n", env=clean_env(PGB_DSN=bouncer.dsn("stats")))
        second.wait_ready()
        # The app: one replica whose pool may open 8 + 4 = 12 client connections, 120% of max_client_conn.
        # Its reports pool wants 2 connections of a session-mode database that has 1 server connection.
        app = setup.serve(app=setup.engine("app", "app", pool_size=8, max_overflow=4),
                          reports=setup.engine("app", "reports", pool_size=2, max_overflow=0))
        targets = [url.removeprefix("http://").removesuffix("/metrics")
                   for url in (setup.daemon_url, f"http://127.0.0.1:{second.port}/metrics", app)]
        rules = {p.name: p.read_text() for p in (ROOT / "alerts").glob("dbpool-*.yml")}
        with PromStack(targets, rules) as stack:
            wait_until(lambda: len(stack.query('up{job="dbpool"} == 1')) == 3, timeout=30, what="3 targets up")
            # Transaction pooling: an open transaction keeps its server connection. Two fill the pool...
            for _ in range(2):
                conn = psycopg.connect(bouncer.dsn("app", "app"), prepare_threshold=None)
                conn.execute("SELECT 1")
                holders.append(conn)

            def queued() -> None:  # ...and the next client queues inside PgBouncer until one ends
                with psycopg.connect(bouncer.dsn("app", "app"), prepare_threshold=None, autocommit=True) as c:
                    c.execute("SELECT 1")

            waiter = threading.Thread(target=queued, daemon=True)
            waiter.start()

            def firing() -> set[tuple[str, str]] | None:
                seen = {(a["labels"]["alertname"], a["labels"]["pool"]) for a in stack.prometheus_alerts()
                        if a["state"] == "firing" and a["labels"].get("kind") == "pgbouncer"}
                return seen if wanted <= seen else None

            # Each daemon reports the pool under its own source name, and each pages for it.
            wanted = {(name, pool) for name in PAGES for pool in ("pgb/app/app", "pgb2/app/app")}
            seen = wait_until(firing, timeout=75, what=f"{PAGES} firing for both daemons' view of the pool")
            assert {pool for _, pool in seen} == {"pgb/app/app", "pgb2/app/app"}, seen

            # Tier 2: two exporters see PgBouncer's server pools (app 2, reports 1); PostgreSQL is asked for
            # 3, not 6.
            postgres, pgbouncer = setup.postgres, bouncer.address
            assert len(stack.query(f'dbpool:pool_max_connections:with_server{{server="{postgres}"}}')) == 4
            assert _value(stack.query(f'dbpool:server_pool_max:sum{{server="{postgres}"}}')) == 3
            # Tier 1: the app pools (12 + 2) against max_client_conn; the reports pool against the session-mode
            # database's one server connection. Both pending their 15m.
            assert _value(stack.query(f'dbpool:pgbouncer_client_budget:ratio{{server="{pgbouncer}"}}')) == 1.4
            assert _value(stack.query(f'dbpool:pgbouncer_session_budget:ratio{{server="{pgbouncer}"}}')) == 2
            pending = stack.query('ALERTS{alertname="DbpoolPgBouncerClientOvercommit", alertstate="pending"}')
            assert {r["metric"].get("database", "") for r in pending} == {"", "reports"}, pending
            assert not stack.query('ALERTS{alertname="DbpoolPoolOvercommit"}')

            # Every query of the dashboard's PgBouncer row returns data from these real series.
            row = [(title, expr) for title, expr in dashboards.panel_queries() if " / PgBouncer " in title]
            assert len(row) >= 10
            for title, expr in row:
                resolved = expr.replace("$__rate_interval", "1m")
                for name in ("pgbouncer", "server", "job", "instance", "pool"):
                    resolved = resolved.replace(f"${name}", ".*")
                assert stack.query(resolved), f"{title}: no data for {resolved}"
    finally:
        for conn in holders:
            conn.close()
        if waiter is not None:
            waiter.join(15)
        if second is not None:
            second.stop()
        setup.close()
