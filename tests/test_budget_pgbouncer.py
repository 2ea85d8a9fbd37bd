"""`dbpool-exporter budget` through a real PgBouncer: the daemon watches PgBouncer and a throwaway PostgreSQL,
real app pools connect through PgBouncer and are served by a real in-process exporter."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, text

from bouncersetup import Setup
from dbpool_exporter import budget
from dbpool_exporter.sources.pgbouncer import PgBouncerSource
from dbpool_exporter.throwaway import PgCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster(max_connections="40") as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            for role in ("app", "etl"):
                conn.execute(f"CREATE ROLE {role} LOGIN")
        yield pg


@pytest.fixture
def setup(cluster: PgCluster, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(cluster, tmp_path)
    yield s
    s.close()


def _budget(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = budget.main(list(argv))
    captured = capsys.readouterr()
    assert captured.err == ""
    return rc, captured.out


def _section(out: str, heading: str) -> str:
    blocks = [b for b in out.split("\n\n") if b.startswith(heading)]
    assert len(blocks) == 1, out
    return blocks[0]


def _row(block: str, first: str) -> list[str]:
    rows = [re.split(r"\s{2,}", line.strip()) for line in block.splitlines() if line.startswith(first + " ")]
    assert len(rows) == 1, block
    return rows[0]


def test_tier_1_app_pools_against_max_client_conn(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    b = setup.start({"appdb": "pool_size=5"}, max_client_conn="30")
    replica = setup.serve(app=setup.engine("app", "appdb", pool_size=6, max_overflow=12))
    setup.wait_for("dbpool_max_connections", 5, pool="pgb/appdb/app")
    usable = setup.usable

    # Only the app's exporter: PgBouncer's address is just a server of unknown capacity.
    rc, out = _budget(capsys, replica)
    assert rc == 0 and "Tier" not in out
    assert _row(out, b.address)[:5] == [b.address, "1", "18", "unknown", "unknown"]

    # With the daemon, 18 of PgBouncer's 30 client slots, and 5 of PostgreSQL's server connections.
    rc, out = _budget(capsys, replica, setup.daemon_url)
    assert rc == 0, out
    assert _row(_section(out, "Tier 1"), b.address) == [b.address, "1", "18", "30 (pgbouncer max_client_conn)",
                                                        "12", "ok"]
    assert _row(_section(out, "Tier 2"), setup.postgres) == [setup.postgres, "1", "5", f"{usable} (exporter)",
                                                             f"{usable - 5}", "ok"]
    # The pool table lists both tiers' pools: the app's names PgBouncer, PgBouncer's names PostgreSQL.
    daemon_instance = setup.daemon_url.removeprefix("http://").removesuffix("/metrics")
    assert _row(out, daemon_instance) == [daemon_instance, "-", "pgb/appdb/app", "pgbouncer", setup.postgres, "5"]

    # A second replica: 36 clients against 30 slots. PostgreSQL is not affected (PgBouncer's pool is 5).
    second = setup.serve(app=setup.engine("app", "appdb", pool_size=6, max_overflow=12))
    rc, out = _budget(capsys, replica, second, setup.daemon_url)
    assert rc == 1, out
    assert _row(_section(out, "Tier 1"), b.address)[1:] == ["2", "36", "30 (pgbouncer max_client_conn)", "-6",
                                                            "OVERCOMMIT"]
    assert _row(_section(out, "Tier 2"), setup.postgres)[1:3] == ["1", "5"]
    assert _row(_section(out, "Tier 2"), setup.postgres)[-1] == "ok"

    # Raise max_client_conn and RELOAD: the daemon follows, the budget is ok again.
    setup.reload(max_client_conn="40")
    setup.wait_for("dbpool_pgbouncer_max_client_connections", 40, pgbouncer=b.address)
    rc, out = _budget(capsys, replica, second, setup.daemon_url)
    assert rc == 0, out
    assert _row(_section(out, "Tier 1"), b.address)[3:] == ["40 (pgbouncer max_client_conn)", "4", "ok"]


def test_tier_2_pgbouncer_server_pools_against_postgres(setup: Setup,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    setup.start({"appdb": "pool_size=20"}, reserve_pool_size="2", max_client_conn="100")
    apps = setup.serve(api=setup.engine("app", "appdb", pool_size=2, max_overflow=0),
                       etl=setup.engine("etl", "appdb", pool_size=2, max_overflow=0))
    # pool_size is per database *and user*: two users, two pools of 20 + reserve 2.
    setup.wait_for("dbpool_max_connections", 22, pool="pgb/appdb/app")
    setup.wait_for("dbpool_max_connections", 22, pool="pgb/appdb/etl")
    usable = setup.usable
    assert usable < 44, "the test needs PostgreSQL to accept fewer than PgBouncer's two pools"

    rc, out = _budget(capsys, apps, setup.daemon_url)
    assert rc == 1, out
    assert _row(_section(out, "Tier 1"), setup.bouncer.address)[1:3] == ["2", "4"]  # type: ignore[union-attr]
    assert _row(_section(out, "Tier 1"), setup.bouncer.address)[-1] == "ok"  # type: ignore[union-attr]
    assert _row(_section(out, "Tier 2"), setup.postgres) == [setup.postgres, "2", "44", f"{usable} (exporter)",
                                                             f"{usable - 44}", "OVERCOMMIT"]

    # max_db_connections caps the database's pools together, not only each one: 44 -> 30.
    setup.reload({"appdb": "pool_size=20 max_db_connections=30"})
    setup.wait_for("dbpool_pgbouncer_database_max_connections", 30, database="appdb")
    rc, out = _budget(capsys, apps, setup.daemon_url)
    assert rc == 0, out
    assert _row(_section(out, "Tier 2"), setup.postgres) == [setup.postgres, "2", "30", f"{usable} (exporter)",
                                                             f"{usable - 30}", "ok"]
    assert (f"(PgBouncer {setup.bouncer.address} database appdb: its server pools add up to 44, "  # type: ignore[union-attr]
            "max_db_connections caps them at 30)") in out


def test_a_pgbouncer_watched_by_two_exporters_counts_once(setup: Setup,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    b = setup.start({"appdb": "pool_size=25"}, max_client_conn="50")
    app = setup.serve(app=setup.engine("app", "appdb", pool_size=3, max_overflow=0))
    setup.wait_for("dbpool_max_connections", 25, pool="pgb/appdb/app")
    # Another exporter watches the same PgBouncer under another source name: its pools are "edge/...".
    edge = setup.serve(PgBouncerSource("edge", b.dsn("stats"), interval=0.3))
    usable = setup.usable
    assert 25 <= usable < 50, "the test needs one pool to fit and two not to"

    rc, out = _budget(capsys, app, setup.daemon_url, edge)
    assert rc == 0, out
    assert _row(_section(out, "Tier 2"), setup.postgres)[:3] == [setup.postgres, "1", "25"]
    instances = ",".join(u.removeprefix("http://").removesuffix("/metrics") for u in (setup.daemon_url, edge))
    assert _row(out, instances)[2:] == ["pgb/appdb/app", "pgbouncer", setup.postgres, "25"]
    assert "edge/appdb/app" not in out


def test_session_mode_bounds_app_pools_by_pgbouncer_server_pools(setup: Setup,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    b = setup.start({"appdb": "pool_size=5 pool_mode=session", "txdb": "pool_size=5"}, pool_mode="transaction",
                    max_client_conn="100")
    session_row = f"{b.address}/appdb"
    # An app pool that has not connected yet: PgBouncer has no pool for it, the database's settings say 5.
    idle = setup.serve(app=setup.engine("app", "appdb", connect=False, pool_size=6, max_overflow=12))
    rc, out = _budget(capsys, idle, setup.daemon_url)
    assert rc == 1, out
    assert _row(_section(out, "Tier 1"), session_row) == [session_row, "1", "18", "5 (pgbouncer session pools)",
                                                          "-13", "OVERCOMMIT"]

    # Connected, next to a pool as large on the transaction-mode database: only the session one is short.
    apps = setup.serve(app=setup.engine("app", "appdb", pool_size=6, max_overflow=12),
                       tx=setup.engine("app", "txdb", pool_size=6, max_overflow=12))
    setup.wait_for("dbpool_max_connections", 5, pool="pgb/appdb/app")
    setup.wait_for("dbpool_max_connections", 5, pool="pgb/txdb/app")
    rc, out = _budget(capsys, apps, setup.daemon_url)
    assert rc == 1, out
    tier_1 = _section(out, "Tier 1")
    assert _row(tier_1, session_row)[1:] == ["1", "18", "5 (pgbouncer session pools)", "-13", "OVERCOMMIT"]
    assert f"{b.address}/txdb" not in out
    assert _row(tier_1, b.address)[1:] == ["2", "36", "100 (pgbouncer max_client_conn)", "64", "ok"]
    assert _row(_section(out, "Tier 2"), setup.postgres)[1:3] == ["2", "10"]
    assert _row(_section(out, "Tier 2"), setup.postgres)[-1] == "ok"

    # An app pool sized to the session pool fits.
    fitted = setup.serve(app=setup.engine("app", "appdb", pool_size=4, max_overflow=1))
    rc, out = _budget(capsys, fitted, setup.daemon_url)
    assert rc == 0, out
    assert _row(_section(out, "Tier 1"), session_row)[1:] == ["1", "5", "5 (pgbouncer session pools)", "0", "ok"]


def test_session_mode_idle_app_connections_starve_another_replica(setup: Setup,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Why the session row exists: pooled connections idle in one replica still hold every server connection."""
    setup.start({"appdb": "pool_size=3 pool_mode=session"}, max_client_conn="100", query_wait_timeout="20")
    first = setup.engine("app", "appdb", pool_size=3, max_overflow=0)
    held = [first.connect() for _ in range(3)]
    for conn in held:
        conn.execute(text("SELECT 1"))
    for conn in held:
        conn.close()  # back into the app's pool: idle there, but still a session holding a server connection
    second = setup.engine("app", "appdb", connect=False, pool_size=3, max_overflow=0)
    url = setup.serve(first=first, second=second)
    rc, out = _budget(capsys, url, setup.daemon_url)
    assert rc == 1
    assert _row(_section(out, "Tier 1"), f"{setup.bouncer.address}/appdb")[1:] == [  # type: ignore[union-attr]
        "2", "6", "3 (pgbouncer session pools)", "-3", "OVERCOMMIT"]

    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_select_one(second)), daemon=True)
    thread.start()
    try:
        # Nothing is busy and PgBouncer is far below max_client_conn, yet the second replica queues.
        setup.wait_for("dbpool_pending_acquires", 1, pool="pgb/appdb/app", kind="pgbouncer")
        # In session mode a server connection linked to a client is sv_active, busy or not.
        assert setup.daemon.value("dbpool_connections", pool="pgb/appdb/app",  # type: ignore[union-attr]
                                  state="checked_out") == 3
        assert not result
    finally:
        first.dispose()  # the first replica's sessions end: their server connections go to the waiting client
        thread.join(timeout=15)
    assert result == [1]


def _select_one(engine: Engine) -> object:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar()
    except Exception as e:  # surfaced by the test's assertion on the result
        return e
