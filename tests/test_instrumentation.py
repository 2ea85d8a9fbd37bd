"""Event-level truth: known waits and holds land in the right buckets, peaks, leaks, timeouts."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial

import pytest
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine, exc, text
from sqlalchemy.ext.asyncio import create_async_engine

from dbpool_exporter import Exporter
from samples import polled_value

LEAK_LOGGER = "dbpool_exporter.leaks"


value = partial(polled_value, pool="app", kind="sqlalchemy")


def test_known_wait_and_hold_land_in_their_buckets(sync_url: str) -> None:
    engine = create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=5)
    exporter = Exporter().register("app", engine)
    try:
        with engine.connect():
            pass  # warm: one fast acquire, one short hold
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="0.25") == 1
        holder = engine.connect()
        waited: list[float] = []

        def waiter() -> None:
            started = time.perf_counter()
            with engine.connect():
                waited.append(time.perf_counter() - started)
                time.sleep(0.12)  # a hold of known length

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.35)
        holder.close()
        thread.join()
        assert 0.25 < waited[0] <= 0.5
        # The waiter's ~0.35 s wait lands in (0.25, 0.5]; the others stay below.
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="0.25") == 2
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="0.5") == 3
        assert value(exporter, "dbpool_acquire_wait_seconds_count") == 3
        # Holds: the warm-up (< 0.1 s), the waiter's 0.12 s in (0.1, 0.25], the holder's ~0.35 s.
        assert value(exporter, "dbpool_connection_hold_seconds_bucket", le="0.1") == 1
        assert value(exporter, "dbpool_connection_hold_seconds_bucket", le="0.25") == 2
        assert value(exporter, "dbpool_connection_hold_seconds_bucket", le="0.5") == 3
    finally:
        exporter.stop()
        engine.dispose()


def test_timeout_counts_and_records_a_wait_at_least_the_timeout(sync_url: str) -> None:
    engine = create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=1.2)
    exporter = Exporter().register("app", engine)
    try:
        held = engine.connect()
        before = value(exporter, "dbpool_acquire_wait_seconds_sum")
        with pytest.raises(exc.TimeoutError, match="QueuePool limit of size 1 overflow 0 reached"):
            engine.connect()
        assert value(exporter, "dbpool_acquire_timeouts_total") == 1
        assert value(exporter, "dbpool_acquire_wait_seconds_sum") - before >= 1.2
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="1.0") == 1
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="2.5") == 2
        held.close()
    finally:
        exporter.stop()
        engine.dispose()


def test_burst_between_polls_is_kept_as_a_peak(sync_url: str) -> None:
    engine = create_engine(sync_url, pool_size=4, max_overflow=0)
    exporter = Exporter().register("app", engine, peak_window=60)
    try:
        exporter.poll_now()
        burst = [engine.connect() for _ in range(4)]
        for conn in burst:
            conn.close()
        # No poll saw 4 out at once, yet the peak says so.
        assert value(exporter, "dbpool_connections", state="checked_out") == 0
        assert value(exporter, "dbpool_checked_out_peak") == 4
        assert value(exporter, "dbpool_checked_out_peak") == 4  # still, within the window
    finally:
        exporter.stop()
        engine.dispose()


def leaky_get_db(engine):
    """The seed's bug: a manual try/finally that forgets to give the connection back on error."""
    conn = engine.connect()
    try:
        yield conn
    finally:
        pass  # should have been conn.close(), or `with engine.connect() as conn:`


def test_leaked_connection_is_reported_with_its_checkout_stack(sync_url: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine(sync_url, pool_size=2, max_overflow=0)
    exporter = Exporter().register("app", engine, leak_threshold=0.2)
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)
    try:
        request = leaky_get_db(engine)
        conn = next(request)
        conn.execute(text("select 1"))
        request.close()  # the request ends; the connection stays checked out
        assert value(exporter, "dbpool_leaked_connections_total") == 0
        time.sleep(0.3)
        assert value(exporter, "dbpool_leaked_connections_total") == 1
        assert value(exporter, "dbpool_oldest_checkout_age_seconds") >= 0.3
        assert value(exporter, "dbpool_leaked_connections_total") == 1  # reported once, not per poll
        reports = [r.getMessage() for r in caplog.records if r.name == LEAK_LOGGER]
        assert len(reports) == 1
        assert "connection leak suspected pool=app" in reports[0]
        assert "in leaky_get_db" in reports[0]
        assert "in test_leaked_connection_is_reported_with_its_checkout_stack" in reports[0]
        conn.close()  # found and returned: a second line says so
        exporter.poll_now()
        reports = [r.getMessage() for r in caplog.records if r.name == LEAK_LOGGER]
        assert len(reports) == 2 and "returned pool=app" in reports[1]
        assert value(exporter, "dbpool_oldest_checkout_age_seconds") == 0
    finally:
        exporter.stop()
        engine.dispose()


def test_async_leak_stack_reaches_the_application_coroutine(async_url: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)

    async def handler_that_leaks(engine):
        conn = await engine.connect()
        await conn.execute(text("select 1"))
        return conn

    async def scenario() -> None:
        engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
        exporter = Exporter().register("app", engine, leak_threshold=0.1)
        try:
            conn = await handler_that_leaks(engine)
            await asyncio.sleep(0.2)
            assert value(exporter, "dbpool_leaked_connections_total") == 1
            await conn.close()
        finally:
            exporter.stop()
            await engine.dispose()

    asyncio.run(scenario())
    reports = [r.getMessage() for r in caplog.records if r.name == LEAK_LOGGER]
    assert "in handler_that_leaks" in reports[0]


def test_psycopg_leak_and_known_wait(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LEAK_LOGGER)
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=1, timeout=5, open=True)
    pool.wait()
    exporter = Exporter().register("app", pool, leak_threshold=0.2)
    try:
        conn = pool.getconn()  # never returned by this "request"
        time.sleep(0.3)
        assert value(exporter, "dbpool_leaked_connections_total", kind="psycopg") == 1
        assert "in test_psycopg_leak_and_known_wait" in caplog.records[0].getMessage()

        def release_later() -> None:
            time.sleep(0.3)
            pool.putconn(conn)

        threading.Thread(target=release_later).start()
        with pool.connection():
            pass
        # Waits: the first getconn (fast) and the one that waited ~0.3 s for the release.
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", kind="psycopg", le="0.25") == 1
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", kind="psycopg", le="0.5") == 2
    finally:
        exporter.stop()
        pool.close()
