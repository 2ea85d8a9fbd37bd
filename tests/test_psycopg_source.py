"""psycopg_pool pools (sync and async) on a real PostgreSQL: gauges, moving counters, PoolTimeout."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import weakref
from functools import partial

import psycopg
from prometheus_client import generate_latest
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from conftest import check_metrics
from dbpool_exporter import Exporter
from dbpool_exporter.throwaway import free_port
from samples import polled_value

value = partial(polled_value, pool="ck", kind="psycopg")


def test_sync_pool_counters_move_waiters_and_timeout(pg_dsn: str, promtool: str) -> None:
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=2, timeout=0.5, open=True)
    pool.wait()
    exporter = Exporter().register("ck", pool)
    try:
        assert value(exporter, "dbpool_min_connections") == 1
        assert value(exporter, "dbpool_max_connections") == 2
        assert value(exporter, "dbpool_acquire_timeout_seconds") == 0.5
        assert value(exporter, "dbpool_psycopg_requests_total") == 0  # absent key counts as 0
        with pool.connection() as conn:
            conn.execute("select pg_sleep(0.05)")
        assert value(exporter, "dbpool_psycopg_requests_total") == 1
        assert value(exporter, "dbpool_psycopg_usage_seconds_total") >= 0.05

        a, b = pool.getconn(), pool.getconn()
        assert value(exporter, "dbpool_connections", state="checked_out") == 2
        assert value(exporter, "dbpool_connections", state="idle") == 0
        assert value(exporter, "dbpool_usage_ratio") == 1.0
        assert value(exporter, "dbpool_overflow_connections") == 1

        errors: list[BaseException] = []

        def wait_for_one() -> None:
            try:
                pool.getconn()
            except PoolTimeout as e:
                errors.append(e)

        waiter = threading.Thread(target=wait_for_one)
        waiter.start()
        deadline = time.monotonic() + 5
        while value(exporter, "dbpool_pending_acquires") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiter.join()
        assert len(errors) == 1
        assert value(exporter, "dbpool_pending_acquires") == 0
        assert value(exporter, "dbpool_pending_acquires_peak") == 1
        assert value(exporter, "dbpool_acquire_timeouts_total") == 1
        assert value(exporter, "dbpool_psycopg_requests_errors_total") == 1
        assert value(exporter, "dbpool_psycopg_requests_queued_total") >= 1
        assert value(exporter, "dbpool_psycopg_requests_wait_seconds_total") >= 0.45
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="0.25") == 3
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="1.0") == 4
        pool.putconn(a)
        pool.putconn(b)
        assert value(exporter, "dbpool_connections", state="checked_out") == 0
        assert value(exporter, "dbpool_connection_hold_seconds_count") == 3
        text = generate_latest(exporter.registry).decode()
        check_metrics(promtool, text)
        exporter.unregister("ck")
        assert "getconn" not in pool.__dict__ and "putconn" not in pool.__dict__
    finally:
        exporter.stop()
        pool.close()


def test_connections_being_opened_are_not_checked_out(pg_dsn: str) -> None:
    # Nothing listens on the port: psycopg_pool keeps retrying its min_size connections, and
    # get_stats() counts all of them in pool_size for minutes, none available.
    opening = ConnectionPool(f"postgresql://postgres@127.0.0.1:{free_port()}/test", min_size=3, max_size=4,
                             open=True, name="opening")
    exporter = Exporter().register("ck", opening)
    try:
        stats = opening.get_stats()
        assert stats["pool_size"] - stats["pool_available"] == 3
        assert value(exporter, "dbpool_connections", state="checked_out") == 0
        assert value(exporter, "dbpool_checked_out_peak") == 0
        assert value(exporter, "dbpool_usage_ratio") == 0
    finally:
        exporter.stop()
        opening.close(timeout=0)
    # A real pool read right after open(), without wait(): only what the application takes counts.
    pool = ConnectionPool(pg_dsn, min_size=3, max_size=4, open=True)
    exporter = Exporter().register("ck", pool)
    try:
        assert value(exporter, "dbpool_checked_out_peak") == 0
        conn = pool.getconn()
        assert value(exporter, "dbpool_connections", state="checked_out") == 1
        pool.putconn(conn)
        assert value(exporter, "dbpool_connections", state="checked_out") == 0
        assert value(exporter, "dbpool_checked_out_peak") == 1
    finally:
        exporter.stop()
        pool.close()


def test_async_pool_waiters_and_counters(pg_dsn: str) -> None:
    async def scenario() -> None:
        pool = AsyncConnectionPool(pg_dsn, min_size=1, max_size=2, timeout=0.5, open=False)
        await pool.open(wait=True)
        exporter = Exporter().register("ck", pool)
        try:
            async with pool.connection() as conn:
                await conn.execute("select 1")
            assert value(exporter, "dbpool_psycopg_requests_total") == 1
            a, b = await pool.getconn(), await pool.getconn()
            assert value(exporter, "dbpool_usage_ratio") == 1.0
            task = asyncio.create_task(pool.getconn())
            for _ in range(200):
                await asyncio.sleep(0.01)
                if value(exporter, "dbpool_pending_acquires") == 1:
                    break
            assert value(exporter, "dbpool_pending_acquires") == 1
            try:
                await task
                raise AssertionError("expected PoolTimeout")
            except PoolTimeout:
                pass
            assert value(exporter, "dbpool_acquire_timeouts_total") == 1
            await pool.putconn(a)
            await pool.putconn(b)
            assert value(exporter, "dbpool_connection_hold_seconds_count") == 3
            exporter.unregister("ck")
            assert "getconn" not in pool.__dict__
        finally:
            exporter.stop()
            await pool.close()

    asyncio.run(scenario())


def test_info_has_server_and_database_but_never_the_password(pg_dsn: str) -> None:
    conninfo = "host=127.0.0.1 port=5432 dbname=test user=postgres password=s3cr3t-pw"
    pool = ConnectionPool(conninfo, min_size=0, max_size=1, open=False)
    exporter = Exporter().register("ck", pool)
    try:
        assert value(exporter, "dbpool_pool_info", pool_class="ConnectionPool", server="127.0.0.1:5432",
                     database="test") == 1
        assert "s3cr3t-pw" not in generate_latest(exporter.registry).decode()
    finally:
        exporter.stop()


def test_a_connection_dropped_without_putconn_is_freed_yet_still_counted_out(pg_dsn: str) -> None:
    # The hooks key checkouts by the connection object (cheaper than id()); that key must not keep a
    # leaked connection, and its server session, alive: the application lost it, the pool lost the slot.
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=4, open=True, kwargs={"application_name": "dbpool-dropped"})
    pool.wait()
    exporter = Exporter().register("ck", pool)
    watcher = psycopg.connect(pg_dsn, autocommit=True)
    try:
        kept = pool.getconn()
        dropped, cyclic = pool.getconn(), pool.getconn()
        cyclic.add_notice_handler(lambda notice, conn=cyclic: None)  # a reference cycle: only gc frees it
        backends = [dropped.info.backend_pid, cyclic.info.backend_pid]
        alive = [weakref.ref(dropped), weakref.ref(cyclic)]
        del dropped, cyclic
        assert value(exporter, "dbpool_connections", state="checked_out") == 3
        gc.collect()
        assert [ref() for ref in alive] == [None, None], "the exporter kept a dropped connection alive"
        deadline = time.monotonic() + 10
        while watcher.execute("select 1 from pg_stat_activity where pid = any(%s)", [backends]).fetchone():
            assert time.monotonic() < deadline, "a dropped connection's server session stayed open"
            time.sleep(0.05)
        # Still out: psycopg_pool never gets those slots back, so the leak stays visible.
        time.sleep(0.05)
        assert value(exporter, "dbpool_connections", state="checked_out") == 3
        assert value(exporter, "dbpool_oldest_checkout_age_seconds") >= 0.05
        # A connection held across those polls comes back through its weak key and is timed as usual.
        pool.putconn(kept)
        assert value(exporter, "dbpool_connection_hold_seconds_count") == 1
        assert value(exporter, "dbpool_connections", state="checked_out") == 2
    finally:
        watcher.close()
        exporter.stop()
        pool.close()


class _EqualByPid(psycopg.Connection):  # type: ignore[type-arg]
    """A connection class of the application's with its own equality: unhashable, so never a key."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _EqualByPid) and other.info.backend_pid == self.info.backend_pid


def test_a_connection_class_with_its_own_equality_is_still_counted(pg_dsn: str) -> None:
    pool = ConnectionPool(pg_dsn, connection_class=_EqualByPid, min_size=1, max_size=2, open=True)
    pool.wait()
    exporter = Exporter().register("ck", pool)
    try:
        a, b = pool.getconn(), pool.getconn()
        assert value(exporter, "dbpool_connections", state="checked_out") == 2
        pool.putconn(a)
        pool.putconn(b)
        assert value(exporter, "dbpool_connections", state="checked_out") == 0
        assert value(exporter, "dbpool_connection_hold_seconds_count") == 2
        assert pool.get_stats()["pool_available"] == 2
    finally:
        exporter.stop()
        pool.close()


def test_polls_racing_busy_threads_never_fail_and_count_every_checkout(pg_dsn: str) -> None:
    # fold() walks the checkouts the hooks add and remove from other threads at the same time. A race
    # shows in about one poll of a few thousand: this run makes ~5,000, so it catches one often, not always.
    pool = ConnectionPool(pg_dsn, min_size=4, max_size=4, open=True)
    pool.wait()
    exporter = Exporter().register("ck", pool)
    threads, cycles = 4, 20000
    stop_at = time.monotonic() + 60

    def work() -> None:
        for _ in range(cycles):
            if time.monotonic() > stop_at:
                return
            with pool.connection():
                pass

    workers = [threading.Thread(target=work) for _ in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: a race shows in one run
    try:
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            exporter.poll_now()
        for w in workers:
            w.join()
        polls = polled_value(exporter, "dbpool_source_polls_total", source="ck", kind="psycopg")
        failed = polled_value(exporter, "dbpool_source_errors_total", source="ck", kind="psycopg")
        assert (failed, polls > 10) == (0, True), f"{failed} of {polls} polls failed"
        assert value(exporter, "dbpool_connections", state="checked_out") == 0
        assert value(exporter, "dbpool_connection_hold_seconds_count") == threads * cycles
    finally:
        sys.setswitchinterval(interval)
        exporter.stop()
        pool.close()
