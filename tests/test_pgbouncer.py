"""PgBouncer source against a real PgBouncer (Debian's) in front of a throwaway PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from bouncer import Bouncer
from conftest import check_metrics
from daemonproc import DaemonProcess, clean_env
from dbpool_exporter import Exporter
from dbpool_exporter.families import Families
from dbpool_exporter.sources.pgbouncer import PgBouncerSource, build_snapshot
from dbpool_exporter.throwaway import PgCluster
from samples import sample_value

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
        self.families = list(out)

    def value(self, name: str, /, **labels: str) -> float | None:
        return sample_value(self.families, name, **labels)


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




def test_console_down_is_up_0_and_recovers(bouncers: Callable[..., Bouncer], caplog) -> None:  # type: ignore[no-untyped-def]
    b = bouncers()
    exporter = Exporter(CollectorRegistry())
    source = PgBouncerSource("pgb", b.dsn("stats"), interval=0.1, backoff_max=0.2, connect_timeout=2)
    exporter.register("pgb", source)
    state = exporter.poller.states["pgb"]
    up = {"source": "pgb", "kind": "pgbouncer"}
    try:
        exporter.poll_now()
        assert exporter.registry.get_sample_value("dbpool_source_up", up) == 1
        b.stop()
        for _ in range(2):  # the broken connection, then a refused reconnect
            exporter.poll_now()
            assert exporter.registry.get_sample_value("dbpool_source_up", up) == 0
            # No stale pool series while the source is down.
            assert exporter.registry.get_sample_value("dbpool_pgbouncer_info",
                                                      {"pgbouncer": b.address}) is None
        assert f"PgBouncer {b.address}" in state.last_error
        b.start()

        def recovered() -> bool:
            exporter.poll_now()
            return exporter.registry.get_sample_value("dbpool_source_up", up) == 1
        wait_until(recovered, "the source to reconnect after PgBouncer came back")
    finally:
        exporter.stop()
    assert USERS["stats"] not in caplog.text and USERS["stats"] not in state.last_error


def test_nothing_listening_is_up_0(caplog) -> None:  # type: ignore[no-untyped-def]
    from dbpool_exporter.throwaway import free_port

    exporter = Exporter(CollectorRegistry())
    exporter.register("pgb", PgBouncerSource("pgb", f"postgresql://stats:{USERS['stats']}@127.0.0.1:{free_port()}/",
                                             connect_timeout=2))
    try:
        exporter.poll_now()
        assert exporter.registry.get_sample_value("dbpool_source_up", {"source": "pgb", "kind": "pgbouncer"}) == 0
        assert "cannot connect to PgBouncer 127.0.0.1:" in exporter.poller.states["pgb"].last_error
    finally:
        exporter.stop()
    assert USERS["stats"] not in caplog.text


@pytest.mark.parametrize(("user", "password", "needle"), [
    ("stats", "Wrong-Password-9", "authentication failed"),
    # A role PgBouncer knows, but in neither admin_users nor stats_users: the console refuses it.
    ("app", None, "not allowed"),
])
def test_wrong_credentials_are_up_0_without_the_password(bouncers: Callable[..., Bouncer], caplog,  # type: ignore[no-untyped-def]
                                                        user: str, password: str | None, needle: str) -> None:
    b = bouncers()
    dsn = b.dsn(user, password=password)
    exporter = Exporter(CollectorRegistry())
    exporter.register("pgb", PgBouncerSource("pgb", dsn, connect_timeout=2))
    try:
        exporter.poll_now()
        assert exporter.registry.get_sample_value("dbpool_source_up", {"source": "pgb", "kind": "pgbouncer"}) == 0
        error = exporter.poller.states["pgb"].last_error
    finally:
        exporter.stop()
    assert needle in error
    secret = password or USERS[user]
    assert secret not in error and secret not in caplog.text and dsn not in caplog.text


def test_pause_queues_clients_and_reload_changes_limits(bouncers: Callable[..., Bouncer], cluster: PgCluster,  # type: ignore[no-untyped-def]
                                                         watch) -> None:
    b = bouncers()
    poll = watch(PgBouncerSource("pgb", b.dsn("stats"), interval=1))
    pool = {"pool": "pgb/appdb/app", "kind": "pgbouncer"}
    db = {"pgbouncer": b.address, "database": "appdb"}
    clients = Clients()
    with psycopg.connect(b.dsn("admin"), autocommit=True) as admin:
        try:
            with psycopg.connect(b.dsn("app", "appdb"), autocommit=True) as warm:
                warm.execute("SELECT 1")  # the pool exists from now on
            admin.execute("PAUSE appdb")
            assert poll().get_sample_value("dbpool_pgbouncer_database_paused", db) == 1
            clients.queue(b.dsn("app", "appdb"))
            wait_until(lambda: poll().get_sample_value("dbpool_pending_acquires", pool) == 1,
                       "a client queued behind PAUSE")
            admin.execute("RESUME appdb")
        finally:
            clients.release()
        assert not clients.errors
        registry = poll()
        assert registry.get_sample_value("dbpool_pgbouncer_database_paused", db) == 0
        assert registry.get_sample_value("dbpool_pending_acquires", pool) == 0
        assert registry.get_sample_value("dbpool_max_connections", pool) == 2

        b.databases["appdb"] = f"host=127.0.0.1 port={cluster.port} dbname=postgres pool_size=5"
        b.settings["max_client_conn"] = "77"
        b.write()
        admin.execute("RELOAD")
        registry = poll()
        assert registry.get_sample_value("dbpool_pgbouncer_database_pool_size", db) == 5
        assert registry.get_sample_value("dbpool_max_connections", pool) == 5
        assert registry.get_sample_value("dbpool_pgbouncer_max_client_connections", {"pgbouncer": b.address}) == 77

        # RELOAD, PAUSE and RESUME racing the polls: the console answers through all of them.
        stop, done, failed = threading.Event(), [], []

        def churn() -> None:
            # prepare_threshold=None: psycopg would prepare a command run 5 times, and the console refuses that.
            try:
                with psycopg.connect(b.dsn("admin"), autocommit=True, prepare_threshold=None) as other:
                    for _ in range(30):
                        if stop.is_set():
                            return
                        for command in ("RELOAD", "PAUSE appdb", "RESUME appdb"):
                            other.execute(command)
                            done.append(command)
            except BaseException as e:
                failed.append(e)
        thread = threading.Thread(target=churn, daemon=True)
        thread.start()
        try:
            for _ in range(30):
                registry = poll()
                assert registry.get_sample_value("dbpool_source_up", {"source": "pgb", "kind": "pgbouncer"}) == 1
        finally:
            stop.set()
            thread.join(timeout=10)
        assert not failed and done


def test_label_caps_fold_databases_and_users(bouncers: Callable[..., Bouncer], cluster: PgCluster, watch) -> None:  # type: ignore[no-untyped-def]
    target = f"host=127.0.0.1 port={cluster.port} dbname=postgres"
    b = bouncers({f"db{i}": target for i in (1, 2, 3)})
    poll = watch(PgBouncerSource("pgb", b.dsn("stats"), max_label_values=2))
    clients = Clients()
    try:
        for user, database in (("u1", "db1"), ("app", "db1"), ("u2", "db2"), ("u3", "db3")):
            clients.hold(b.dsn(user, database))
        registry = poll()
    finally:
        clients.release()
    pools = {s.labels["pool"] for family in registry.collect() for s in family.samples
             if s.name == "dbpool_pending_acquires"}
    # db1 is busiest; db2 and db3 tie and db2 wins on its name; likewise app and u1 among the users.
    assert pools == {"pgb/db1/app", "pgb/db1/u1", "pgb/db2/other", "pgb/other/other"}
    me = {"pgbouncer": b.address}
    assert registry.get_sample_value("dbpool_pgbouncer_folded_values", {**me, "label": "database"}) == 1
    assert registry.get_sample_value("dbpool_pgbouncer_folded_values", {**me, "label": "user"}) == 2
    assert registry.get_sample_value("dbpool_pgbouncer_database_pool_size", {**me, "database": "other"}) is not None
    assert registry.get_sample_value("dbpool_pgbouncer_database_pool_size", {**me, "database": "db3"}) is None
    assert registry.get_sample_value("dbpool_pgbouncer_pool_clients",
                                     {"pool": "pgb/other/other", "kind": "pgbouncer", "state": "active"}) == 1


def test_an_app_pool_through_pgbouncer_joins_on_its_address(bouncers: Callable[..., Bouncer], cluster: PgCluster,  # type: ignore[no-untyped-def]
                                                            watch) -> None:
    from sqlalchemy import create_engine, text

    b = bouncers()
    engine = create_engine(b.dsn("app", "appdb").replace("postgresql://", "postgresql+psycopg://"),
                           pool_size=3, max_overflow=0)
    exporter = Exporter(CollectorRegistry())
    exporter.register("app", engine)
    exporter.register("pgb", PgBouncerSource("pgb", b.dsn("stats")))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        exporter.poll_now()
        value = exporter.registry.get_sample_value
        # Tier 1: the app pool names PgBouncer, which carries the same address as its own identity ...
        assert value("dbpool_pool_info", {"pool": "app", "kind": "sqlalchemy", "pool_class": "QueuePool",
                                          "server": b.address, "database": "appdb"}) == 1
        assert value("dbpool_pgbouncer_client_connections", {"pgbouncer": b.address}) is not None
        # ... tier 2: PgBouncer's pool names the real server, as a postgres source watching it would.
        assert value("dbpool_pool_info", {"pool": "pgb/appdb/app", "kind": "pgbouncer", "pool_class": "PgBouncer",
                                          "server": f"127.0.0.1:{cluster.port}", "database": "postgres"}) == 1
    finally:
        exporter.stop()
        engine.dispose()


def test_daemon_serves_servers_and_pgbouncers(bouncers: Callable[..., Bouncer], cluster: PgCluster,  # type: ignore[no-untyped-def]
                                              tmp_path, promtool: str) -> None:
    b = bouncers()
    config = ("defaults: {interval: 0.3, backoff_max: 1}\n"
              f"servers:\n  - name: pg\n    dsn: 'postgresql://postgres@127.0.0.1:{cluster.port}/postgres'\n"
              "pgbouncers:\n  - name: pgb\n    dsn_env: PGB_DSN\n")
    d = DaemonProcess(tmp_path, config, env=clean_env(PGB_DSN=b.dsn("stats")))
    try:
        d.wait_ready()
        d.wait_for(lambda: d.value("dbpool_source_up", source="pgb", kind="pgbouncer") == 1, "the pgbouncer source")
        text = d.metrics()
        check_metrics(promtool, text)
        assert d.value("dbpool_source_up", source="pg", kind="postgres") == 1
        assert d.value("dbpool_pgbouncer_database_info", pgbouncer=b.address, database="appdb",
                       server=f"127.0.0.1:{cluster.port}") == 1
        assert d.value("dbpool_server_max_connections", server=f"127.0.0.1:{cluster.port}") == 40
        assert "1 pgbouncer(s) (pgb)" in d.log()
    finally:
        code, _ = d.stop()
    assert code == 0
    assert USERS["stats"] not in d.log() and USERS["stats"] not in text
    assert "Traceback" not in d.log()


def test_config_pgbouncers_section(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dbpool_exporter.config import ConfigError, PgBouncerConfig, parse

    secret = "Config-Secret-77"
    ok = parse({"defaults": {"interval": "2s"},
                "pgbouncers": [{"name": "pgb", "dsn": f"postgresql://stats:{secret}@10.0.0.5:6432/pgbouncer",
                                "max_label_values": 5},
                               {"name": "pgb2", "dsn": f"host=10.0.0.6 port=6432 user=stats password={secret}"}]},
               env={})
    assert not ok.servers and [type(p) for p in ok.sources] == [PgBouncerConfig, PgBouncerConfig]
    first = ok.pgbouncers[0]
    assert (first.interval, first.max_label_values) == (2.0, 5)
    source = first.source()
    assert isinstance(source, PgBouncerSource) and source.pgbouncer == "10.0.0.5:6432"
    assert secret not in repr(ok)

    with pytest.raises(ConfigError) as e:
        parse({"servers": [{"name": "x", "dsn": "postgresql://postgres@db:5432/app"}],
               "pgbouncers": [{"name": "x", "dsn": f"postgresql://stats:{secret}@pgb:6432/app"},
                              {"name": "y", "dsn": f"postgresql://stats:{secret}@pgb2:6432/pgbouncer"},
                              {"name": "z", "dsn": f"postgresql://stats:{secret}@pgb2:6432/pgbouncer"},
                              {"name": "w", "dsn_env": "NOPE", "bogus": 1}]}, env={})
    problems = e.value.problems
    assert "pgbouncers[0].name: duplicate source name 'x' (servers and pgbouncers share names)" in problems
    assert ("pgbouncers[0].dsn: dbname must be 'pgbouncer' (PgBouncer's admin console), got 'app'" in problems)
    assert any(p.startswith("pgbouncers[2].dsn: same PgBouncer (pgb2:6432) as pgbouncers[1]") for p in problems)
    assert "pgbouncers[3].dsn_env: environment variable NOPE is not set" in problems
    assert any(p.startswith("pgbouncers[3].bogus: unknown key") for p in problems)
    assert secret not in str(e.value)
    with pytest.raises(ConfigError, match="servers: required"):
        parse({"pgbouncers": []}, env={})


def test_columns_that_differ_by_version() -> None:
    """1.24+ spells reserve_pool as reserve_pool_size, adds per-user pool sizes (1.23+) and more stats
    columns; 1.18 lacks them. Rows shaped as each prints them (the real 1.18 is covered above)."""
    base_db = {"name": "app", "host": "db", "port": 5432, "database": "app", "force_user": None, "pool_size": 10,
               "min_pool_size": 0, "pool_mode": None, "max_connections": 0, "current_connections": 1,
               "paused": 0, "disabled": 0}
    pool = {"database": "app", "user": "web", "cl_active": 1, "cl_waiting": 2, "sv_active": 1, "sv_idle": 0,
            "sv_used": 0, "sv_tested": 0, "sv_login": 0, "maxwait": 3, "maxwait_us": 500000, "pool_mode": "session"}
    config = [{"key": "pool_mode", "value": "session"}, {"key": "max_client_conn", "value": "100"},
              {"key": "query_wait_timeout", "value": "0"}]
    old = build_snapshot("pgb:6432", version="1.18.0", pools=[pool], databases=[{**base_db, "reserve_pool": 2}],
                         stats=[{"database": "app", "total_xact_count": 5}], config=config, lists=[],
                         users=[{"name": "web", "pool_mode": None}])
    new = build_snapshot("pgb:6432", version="1.24.1", pools=[pool],
                         databases=[{**base_db, "reserve_pool_size": 3, "max_connections": 12,
                                     "max_client_connections": 0, "current_client_connections": 3}],
                         stats=[{"database": "app", "total_xact_count": 5, "total_server_assignment_count": 9,
                                 "total_bind_count": 4}],
                         config=config, lists=[],
                         users=[{"name": "web", "pool_size": 20, "reserve_pool_size": 1, "pool_mode": None}])
    old_out, new_out = Rendered(old, "pgb"), Rendered(new, "pgb")
    labels = {"pool": "pgb/app/web"}
    assert old_out.value("dbpool_max_connections", **labels) == 12  # pool_size 10 + reserve_pool 2
    # The user's own pool_size 20 + reserve 1, capped by the database's max_db_connections of 12.
    assert new_out.value("dbpool_max_connections", **labels) == 12
    assert new_out.value("dbpool_pgbouncer_database_reserve_pool_size", database="app") == 3
    assert old_out.value("dbpool_pgbouncer_database_reserve_pool_size", database="app") == 2
    assert old_out.value("dbpool_oldest_pending_acquire_age_seconds", **labels) == 3.5
    assert old_out.value("dbpool_acquire_timeout_seconds", **labels) is None  # query_wait_timeout 0: no limit
    assert new_out.value("dbpool_pgbouncer_server_assignments_total", database="app") == 9
    assert old_out.value("dbpool_pgbouncer_server_assignments_total", database="app") is None
    assert new_out.value("dbpool_pgbouncer_binds_total", database="app") == 4


# The PromQL README gives for the three tiers, as recording rules, so promtool proves it against the
# shipped rules (tier 2 needs no new rule: PgBouncer pools are pools with a server).
PROPOSED_RULES = """\
groups:
- name: pgbouncer.proposed
  rules:
  - record: dbpool:pgbouncer_client_capacity:max
    expr: max by (server) (label_replace(dbpool_pgbouncer_max_client_connections, "server", "$1", "pgbouncer", "(.*)"))
  - record: dbpool:pgbouncer_client_budget:ratio
    expr: |-
      sum by (server) (dbpool:pool_max_connections:with_server{kind!="pgbouncer"})
      / on (server)
      (dbpool:pgbouncer_client_capacity:max > 0)
  - record: dbpool:pool_backend:info
    expr: |-
      dbpool_pool_info{kind!="pgbouncer"}
      * on (server, database) group_left (backend)
      label_replace(label_replace(dbpool_pgbouncer_database_info, "backend", "$1", "server", "(.*)"),
                    "server", "$1", "pgbouncer", "(.*)")
"""


def _series(name: str, value: int, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": f"{value}x5"}


APP = {"job": "app", "kind": "sqlalchemy", "pool": "api"}
DAEMON = {"job": "dbpool", "instance": "d"}
PGB_POOL = {**DAEMON, "pool": "pgb/appdb/app", "kind": "pgbouncer"}
INPUT_SERIES = [
    # Two replicas of an app whose pool (60) talks to PgBouncer, one cron pool (10) straight to PostgreSQL.
    *(s for i in ("a1", "a2") for s in (
        _series("dbpool_max_connections", 60, **APP, instance=i),
        _series("dbpool_pool_info", 1, **APP, instance=i, pool_class="QueuePool", server="pgb:6432",
                database="appdb"))),
    _series("dbpool_max_connections", 10, job="cron", instance="c1", pool="jobs", kind="psycopg"),
    _series("dbpool_pool_info", 1, job="cron", instance="c1", pool="jobs", kind="psycopg",
            pool_class="ConnectionPool", server="db:5432", database="app"),
    # The daemon watching PgBouncer and PostgreSQL.
    _series("dbpool_pgbouncer_max_client_connections", 100, **DAEMON, pgbouncer="pgb:6432"),
    _series("dbpool_pgbouncer_database_info", 1, **DAEMON, pgbouncer="pgb:6432", database="appdb",
            server="db:5432", server_database="app", pool_mode="transaction"),
    _series("dbpool_max_connections", 20, **PGB_POOL),
    _series("dbpool_pool_info", 1, **PGB_POOL, pool_class="PgBouncer", server="db:5432", database="app"),
    _series("dbpool_server_usable_connections", 97, **DAEMON, server="db:5432"),
]
EXPECTED = [
    ("dbpool:pgbouncer_client_budget:ratio", 'dbpool:pgbouncer_client_budget:ratio{server="pgb:6432"}', 1.2),
    # Tier 2: the cron pool and PgBouncer's server pool, counted against PostgreSQL.
    ('dbpool:server_pool_max:sum{server="db:5432"}', 'dbpool:server_pool_max:sum{server="db:5432"}', 30),
    ("count by (backend) (dbpool:pool_backend:info)", '{backend="db:5432"}', 2),
]


def test_three_tier_promql_against_the_shipped_rules(tmp_path, promtool: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    shipped = Path(__file__).resolve().parents[1] / "alerts" / "dbpool-rules.yml"
    (tmp_path / "proposed.yml").write_text(PROPOSED_RULES)
    tests = {"rule_files": [str(shipped), "proposed.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": INPUT_SERIES,
        "promql_expr_test": [{"expr": expr, "eval_time": "2m", "exp_samples": [{"labels": labels, "value": value}]}
                             for expr, labels, value in EXPECTED]}]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_console_that_stops_answering_is_up_0(bouncers: Callable[..., Bouncer]) -> None:
    import os
    import signal

    b = bouncers()
    exporter = Exporter(CollectorRegistry())
    exporter.register("pgb", PgBouncerSource("pgb", b.dsn("stats"), interval=0.1, statement_timeout=1,
                                             connect_timeout=1, backoff_max=0.2))
    up = {"source": "pgb", "kind": "pgbouncer"}
    assert b.proc is not None
    try:
        exporter.poll_now()
        assert exporter.registry.get_sample_value("dbpool_source_up", up) == 1
        os.kill(b.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing: a hung PgBouncer
        try:
            exporter.poll_now()  # the open connection: bounded by statement_timeout
            assert exporter.registry.get_sample_value("dbpool_source_up", up) == 0
            assert "no reply within 1 s (statement_timeout)" in exporter.poller.states["pgb"].last_error
            print(f"hung PgBouncer: poll gave up after {exporter.poller.states['pgb'].duration:.2f} s")
            time.sleep(0.3)  # past the backoff, so the next poll really tries to connect
            exporter.poll_now()  # a new connection: bounded by connect_timeout
            assert exporter.registry.get_sample_value("dbpool_source_up", up) == 0
            assert "no reply within 1 s (connect_timeout)" in exporter.poller.states["pgb"].last_error
            print(f"hung PgBouncer: connect gave up after {exporter.poller.states['pgb'].duration:.2f} s")
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)

        def recovered() -> bool:
            exporter.poll_now()
            return exporter.registry.get_sample_value("dbpool_source_up", up) == 1
        wait_until(recovered, "the source to recover once PgBouncer answers again")
    finally:
        exporter.stop()
