"""PgBouncer source against a real PgBouncer (Debian's) in front of a throwaway PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

import psycopg
import pytest
from bouncer import Bouncer
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from conftest import check_metrics
from dbpool_exporter import Exporter
from dbpool_exporter.families import Families
from dbpool_exporter.sources.pgbouncer import PgBouncerSource
from dbpool_exporter.throwaway import PgCluster

USERS = {"admin": "admin-Secret-1", "stats": "stats-Secret-2", "app": "app-Secret-3",
         "u1": "u1-Secret-4", "u2": "u2-Secret-5", "u3": "u3-Secret-6"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster(max_connections="40") as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            for role in ("app", "u1", "u2", "u3"):
                conn.execute(f"CREATE ROLE {role} LOGIN")
        yield pg


@pytest.fixture
def bouncers(cluster: PgCluster) -> Iterator[Callable[..., Bouncer]]:
    started: list[Bouncer] = []

    def start(databases: dict[str, str] | None = None, **settings: str) -> Bouncer:
        databases = databases or {"appdb": f"host=127.0.0.1 port={cluster.port} dbname=postgres pool_size=2"}
        b = Bouncer(databases, USERS, **settings)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.destroy()


@pytest.fixture
def watch() -> Iterator[Callable[[PgBouncerSource], Callable[[], CollectorRegistry]]]:
    """Register a source with a real Exporter; the returned function polls it once and gives the registry."""
    exporters: list[Exporter] = []

    def register(source: PgBouncerSource) -> Callable[[], CollectorRegistry]:
        exporter = Exporter(CollectorRegistry())
        exporter.register(source.name, source)
        exporters.append(exporter)

        def poll() -> CollectorRegistry:
            exporter.poll_now()
            return exporter.registry
        return poll

    yield register
    for exporter in exporters:
        exporter.stop()  # closes the sources, then their loop


class Rendered:
    """Samples of one snapshot, without a poller: for tests that poll many times on their own loop."""

    def __init__(self, snapshot: object, name: str) -> None:
        out = Families()
        snapshot.emit(name, out)  # type: ignore[attr-defined]
        self.samples = [s for family in out for s in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None


class Clients:
    """Application connections through PgBouncer, each on its own thread; always closed."""

    def __init__(self) -> None:
        self.conns: list[psycopg.Connection] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def hold(self, dsn: str) -> psycopg.Connection:
        # An open transaction keeps its server connection in transaction pooling mode.
        conn = psycopg.connect(dsn, connect_timeout=5)
        conn.execute("SELECT 1")
        self.conns.append(conn)
        return conn

    def queue(self, dsn: str) -> None:
        def run() -> None:
            try:
                with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except BaseException as e:  # surfaced by the test
                self.errors.append(e)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def release(self) -> None:
        for conn in self.conns:
            conn.close()
        for thread in self.threads:
            thread.join(timeout=10)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_queueing_clients_show_as_pending(bouncers: Callable[..., Bouncer], cluster: PgCluster, watch,  # type: ignore[no-untyped-def]
                                          promtool: str) -> None:
    b = bouncers(max_client_conn="30", default_pool_size="7", query_wait_timeout="30")
    poll = watch(PgBouncerSource("pgb", b.dsn("stats"), interval=1))
    clients = Clients()
    pool = {"pool": "pgb/appdb/app", "kind": "pgbouncer"}
    try:
        for _ in range(2):
            clients.hold(b.dsn("app", "appdb"))
        for _ in range(3):
            clients.queue(b.dsn("app", "appdb"))

        def queued() -> bool:
            return poll().get_sample_value("dbpool_pending_acquires", pool) == 3
        wait_until(queued, "three clients waiting inside PgBouncer")
        registry = poll()
        value = registry.get_sample_value
        assert value("dbpool_source_up", {"source": "pgb", "kind": "pgbouncer"}) == 1
        assert value("dbpool_connections", {**pool, "state": "checked_out"}) == 2
        assert value("dbpool_max_connections", pool) == 2
        assert value("dbpool_usage_ratio", pool) == 1
        assert value("dbpool_acquire_timeout_seconds", pool) == 30
        assert value("dbpool_oldest_pending_acquire_age_seconds", pool) > 0
        assert value("dbpool_pgbouncer_pool_clients", {**pool, "state": "waiting"}) == 3
        assert value("dbpool_pgbouncer_pool_servers", {**pool, "state": "active"}) == 2
        assert value("dbpool_pool_info", {**pool, "pool_class": "PgBouncer", "server": f"127.0.0.1:{cluster.port}",
                                          "database": "postgres"}) == 1
        me = {"pgbouncer": b.address}
        assert value("dbpool_pgbouncer_max_client_connections", me) == 30
        assert value("dbpool_pgbouncer_default_pool_size", me) == 7
        # 5 application clients and our own console connection.
        assert value("dbpool_pgbouncer_client_connections", me) == 6
        assert value("dbpool_pgbouncer_database_info", {**me, "database": "appdb",
                                                        "server": f"127.0.0.1:{cluster.port}",
                                                        "server_database": "postgres", "pool_mode": "transaction"}) == 1
        assert value("dbpool_pgbouncer_database_pool_size", {**me, "database": "appdb"}) == 2
        assert value("dbpool_pgbouncer_info", {**me, "version": b.version, "pool_mode": "transaction"}) == 1
        check_metrics(promtool, generate_latest(registry).decode())
    finally:
        clients.release()
    assert not clients.errors
    registry = poll()
    assert registry.get_sample_value("dbpool_pending_acquires", pool) == 0
    assert registry.get_sample_value("dbpool_oldest_pending_acquire_age_seconds", pool) == 0
    # Five transactions went through, and the three that queued waited for a server.
    assert registry.get_sample_value("dbpool_pgbouncer_transactions_total",
                                     {"pgbouncer": b.address, "database": "appdb"}) >= 5
    assert registry.get_sample_value("dbpool_pgbouncer_client_wait_seconds_total",
                                     {"pgbouncer": b.address, "database": "appdb"}) > 0
