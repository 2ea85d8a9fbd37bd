"""PostgresSource against real servers: counts by application_name, ages, the cardinality cap, capacity."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable, Iterator

import psycopg
import pytest
from prometheus_client import generate_latest

from conftest import check_metrics
from dbpool_exporter import Exporter, Source
from dbpool_exporter.redact import from_conninfo
from dbpool_exporter.sources.postgres import STATES, PostgresSource, sanitize
from dbpool_exporter.throwaway import PgCluster
from samples import sample_value


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """A server of our own: counts and the cap must not see other test runs' connections."""
    with PgCluster(max_connections="60") as c:
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            for role in ("u1", "u2", "u3"):
                conn.execute(f"CREATE ROLE {role} LOGIN")
        yield c


@pytest.fixture
def open_conn() -> Iterator[Callable[..., psycopg.Connection]]:
    conns: list[psycopg.Connection] = []

    def connect(dsn: str, app: str, *, user: str | None = None, in_transaction: bool = False) -> psycopg.Connection:
        kwargs = {"user": user} if user else {}
        conn = psycopg.connect(dsn, application_name=app, autocommit=True, **kwargs)
        conns.append(conn)
        if in_transaction:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        return conn

    yield connect
    for conn in conns:
        conn.close()


def _exporter(dsn: str, **kwargs: object) -> Exporter:
    return Exporter().register("db", PostgresSource("db", dsn, interval=0.5, **kwargs))  # type: ignore[arg-type]


def _poll_until(exporter: Exporter, check: Callable[[], bool], timeout: float = 10.0) -> None:
    # pg_stat_activity lags a backend's exit by a moment: poll again, a bounded number of times.
    deadline = time.monotonic() + timeout
    while True:
        exporter.poll_now()
        if check() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def test_is_a_source_and_connects_as_dbpool_exporter(cluster: PgCluster) -> None:
    # A cluster of its own: on a shared server another exporter's backend would be counted, rightly.
    pg_dsn = cluster.dsn
    source = PostgresSource("db", pg_dsn, interval=0.5)
    assert isinstance(source, Source) and source.kind == "postgres"
    with _exporter(pg_dsn) as exporter:
        exporter.poll_now()
        assert sample_value(exporter, "dbpool_source_up", source="db", kind="postgres") == 1
        with psycopg.connect(pg_dsn) as conn:
            apps = [r[0] for r in conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE application_name = 'dbpool-exporter'")]
        assert apps, "the source's connection should carry application_name dbpool-exporter"
        # ... but its own backend is excluded from what it reports.
        text = generate_latest(exporter.registry).decode()
        assert 'application_name="dbpool-exporter"' not in text


def test_connections_counted_under_application_name(cluster: PgCluster, open_conn: Callable[..., object]) -> None:
    app = f"counted-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        open_conn(cluster.dsn, app)
    for _ in range(2):
        open_conn(cluster.dsn, app, in_transaction=True)
    with _exporter(cluster.dsn) as exporter:
        labels = {"server": f"127.0.0.1:{cluster.port}", "database": "postgres", "user": "postgres",
                  "application_name": app}

        def counted() -> bool:
            return (sample_value(exporter, "dbpool_server_connections", **labels, state="idle") == 3
                    and sample_value(exporter, "dbpool_server_connections", **labels, state="idle in transaction") == 2)

        _poll_until(exporter, counted)
        assert counted()
        # Every known state is reported, the ones nobody is in as 0.
        for state in STATES:
            assert sample_value(exporter, "dbpool_server_connections", **labels, state=state) is not None, state
        assert sample_value(exporter, "dbpool_server_connections", **labels, state="active") == 0
        assert sample_value(exporter, "dbpool_server_lock_waiting_connections", server=labels["server"],
                      database="postgres") == 0


def test_idle_in_transaction_age_grows(cluster: PgCluster, open_conn: Callable[..., object]) -> None:
    app = f"idle-{uuid.uuid4().hex[:8]}"
    open_conn(cluster.dsn, app, in_transaction=True)
    labels = {"server": f"127.0.0.1:{cluster.port}", "database": "postgres", "application_name": app}
    with _exporter(cluster.dsn) as exporter:
        exporter.poll_now()
        first = sample_value(exporter, "dbpool_server_oldest_idle_in_transaction_age_seconds", **labels)
        time.sleep(1.0)
        exporter.poll_now()
        second = sample_value(exporter, "dbpool_server_oldest_idle_in_transaction_age_seconds", **labels)
        xact = sample_value(exporter, "dbpool_server_oldest_transaction_age_seconds", **labels)
    assert first is not None and second is not None and xact is not None
    # The server's clock moved at least the second we slept between the two polls.
    assert second >= first + 0.9
    assert xact >= second  # the transaction began before it went idle


def test_cap_folds_extra_names_into_other(cluster: PgCluster, open_conn: Callable[..., object]) -> None:
    tag = uuid.uuid4().hex[:6]
    a, b, c, d = (f"{tag}-{x}" for x in "abcd")
    for app, user, n in ((a, None, 3), (b, None, 2), (c, "u1", 1), (d, "u2", 1), (d, "u3", 1)):
        for _ in range(n):
            open_conn(cluster.dsn, app, user=user)
    server = f"127.0.0.1:{cluster.port}"
    with _exporter(cluster.dsn, max_label_values=2) as exporter:
        def total(**labels: str) -> float:
            return sum(sample_value(exporter, "dbpool_server_connections", server=server, database="postgres",
                              state=state, **labels) or 0 for state in STATES)

        def folded() -> bool:
            # Kept: the two busiest names (d ties with b at 2; ties go by name), and postgres + u1 as users.
            return (total(user="postgres", application_name=a) == 3
                    and total(user="postgres", application_name=b) == 2
                    and total(user="u1", application_name="other") == 1
                    and total(user="other", application_name="other") == 2
                    and sample_value(exporter, "dbpool_server_folded_values", server=server,
                                     label="application_name") == 2
                    and sample_value(exporter, "dbpool_server_folded_values", server=server, label="user") == 2)

        _poll_until(exporter, folded)
        assert folded(), generate_latest(exporter.registry).decode()
        text = generate_latest(exporter.registry).decode()
        assert c not in text and d not in text and "u2" not in text


def test_lock_waiters_counted(cluster: PgCluster, open_conn: Callable[..., psycopg.Connection]) -> None:
    table = f"locked_{uuid.uuid4().hex[:8]}"
    holder = open_conn(cluster.dsn, "holder")
    holder.execute(f"CREATE TABLE {table} (id int)")
    holder.execute("BEGIN")
    holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    waiter = open_conn(cluster.dsn, "waiter")
    blocked = threading.Thread(target=lambda: waiter.execute(f"SELECT count(*) FROM {table}"), daemon=True)
    blocked.start()
    server = f"127.0.0.1:{cluster.port}"
    try:
        with _exporter(cluster.dsn) as exporter:
            def waiting() -> bool:
                return sample_value(exporter, "dbpool_server_lock_waiting_connections", server=server,
                              database="postgres") == 1

            _poll_until(exporter, waiting)
            assert waiting()
            assert sample_value(exporter, "dbpool_server_connections", server=server, database="postgres",
                          user="postgres", application_name="waiter", state="active") == 1
    finally:
        holder.execute("ROLLBACK")
        blocked.join(timeout=10)


def test_capacity_matches_show(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
        reserved = int(conn.execute("SHOW superuser_reserved_connections").fetchone()[0])
        row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'reserved_connections'").fetchone()
        reserved += int(row[0]) if row else 0  # PostgreSQL 16+
    server, _ = from_conninfo(pg_dsn)
    with _exporter(pg_dsn) as exporter:
        exporter.poll_now()
        assert sample_value(exporter, "dbpool_server_max_connections", server=server) == max_connections
        assert sample_value(exporter, "dbpool_server_reserved_connections", server=server) == reserved
        assert sample_value(exporter, "dbpool_server_usable_connections", server=server) == max_connections - reserved


def test_server_label_joins_pools_and_keyvalue_conninfo_works(pg_dsn: str, promtool: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    keyvalue = psycopg.conninfo.make_conninfo(**params)
    assert "://" not in keyvalue
    source = PostgresSource("kv", keyvalue, interval=0.5)
    assert source.server == from_conninfo(pg_dsn)[0]  # the pools' own rule, so series join on `server`
    with Exporter().register("kv", source) as exporter:
        exporter.poll_now()
        assert sample_value(exporter, "dbpool_source_up", source="kv", kind="postgres") == 1
        check_metrics(promtool, generate_latest(exporter.registry).decode())


def test_label_values_are_bounded() -> None:
    assert len(sanitize("x" * 500)) == 128
    assert sanitize("tab\there\x00") == "tab?here?"
    assert sanitize("naïve ✓") == "naïve ✓"


def test_libpq_client_parameters_do_not_reach_the_server(pg_dsn: str) -> None:
    # asyncpg would forward unknown URI parameters as server settings; the server would refuse these.
    sep = "&" if "?" in pg_dsn else "?"
    dsn = f"{pg_dsn}{sep}connect_timeout=3&keepalives=1&application_name=someone-else&sslmode=disable"
    with Exporter().register("params", PostgresSource("params", dsn, interval=0.5)) as exporter:
        exporter.poll_now()
        state = exporter.poller.states["params"]
        assert state.up, state.last_error


def test_reconnects_back_off_and_the_backoff_is_capped() -> None:
    """A listener that hangs up at once: polls keep failing fast, but connection attempts thin out."""
    import asyncio
    import socket

    accepted: list[int] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.05)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def hang_up() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                accepted.append(1)
                conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        source = PostgresSource("flaky", f"postgresql://u:Secret-pw-1@127.0.0.1:{port}/d", interval=0.05,
                                backoff_max=0.2, connect_timeout=2)
        errors: list[str] = []

        async def poll_many() -> None:
            for _ in range(30):
                try:
                    await source.poll()
                except Exception as e:
                    errors.append(str(e))
                await asyncio.sleep(0.05)

        try:
            asyncio.run(poll_many())
        finally:
            stop.set()
            thread.join(timeout=5)
    assert len(errors) == 30
    print("connection attempts:", len(accepted), "polls:", len(errors))
    assert 2 <= len(accepted) < 30  # retried, but not on every poll
    assert all("Secret-pw-1" not in e and e.startswith("cannot connect to 127.0.0.1:") for e in errors)
    assert source._backoff.retry_at - time.monotonic() <= 0.2  # capped by backoff_max


def test_unprivileged_monitor_counts_hidden_backends_as_unknown(cluster: PgCluster,
                                                                open_conn: Callable[..., object]) -> None:
    """Without pg_monitor a role cannot see other roles' state or backend_type: counted, not dropped."""
    app = f"hidden-{uuid.uuid4().hex[:8]}"
    open_conn(cluster.dsn, app)  # a superuser's backend, invisible in detail to u1
    dsn = cluster.dsn.replace("postgres@", "u1@")
    server = f"127.0.0.1:{cluster.port}"
    labels = {"server": server, "database": "postgres", "user": "postgres", "application_name": app}
    with _exporter(dsn) as exporter:
        def counted() -> bool:
            return sample_value(exporter, "dbpool_server_connections", **labels, state="unknown") == 1

        _poll_until(exporter, counted)
        assert counted(), generate_latest(exporter.registry).decode()
        assert sample_value(exporter, "dbpool_server_connections", **labels, state="idle") == 0
