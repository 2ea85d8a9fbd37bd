"""SQLAlchemy pools driven to their limits on a real PostgreSQL, asserting the exported values at each step."""

from __future__ import annotations

import asyncio
import threading
import time
from functools import partial

import pytest
from prometheus_client import generate_latest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool, SingletonThreadPool, StaticPool

from conftest import check_metrics
from dbpool_exporter import Exporter
from samples import polled_value

SEED_ERROR = r"QueuePool limit of size 2 overflow 1 reached, connection timed out, timeout 0.50"


value = partial(polled_value, pool="app", kind="sqlalchemy")


def out(exporter: Exporter) -> float | None:
    return value(exporter, "dbpool_connections", state="checked_out")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_sync_pool_to_max_overflow_waiters_and_timeout(sync_url: str, promtool: str) -> None:
    engine = create_engine(sync_url, pool_size=2, max_overflow=1, pool_timeout=0.5)
    exporter = Exporter().register("app", engine)
    try:
        assert value(exporter, "dbpool_max_connections") == 3
        assert value(exporter, "dbpool_min_connections") == 2
        assert value(exporter, "dbpool_acquire_timeout_seconds") == 0.5
        assert out(exporter) == 0 and value(exporter, "dbpool_overflow_connections") == 0
        held = [engine.connect() for _ in range(2)]
        assert out(exporter) == 2 and value(exporter, "dbpool_overflow_connections") == 0
        assert value(exporter, "dbpool_usage_ratio") == pytest.approx(2 / 3)
        held.append(engine.connect())
        assert out(exporter) == 3 and value(exporter, "dbpool_overflow_connections") == 1
        assert value(exporter, "dbpool_usage_ratio") == 1.0
        assert value(exporter, "dbpool_pending_acquires") == 0

        # A caller now waits; while it does, it is counted; then it hits the seed's error.
        errors: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _connect_expecting_timeout(engine, errors))
        waiter.start()
        wait_until(lambda: value(exporter, "dbpool_pending_acquires") == 1)
        waiter.join()
        assert len(errors) == 1 and isinstance(errors[0], exc.TimeoutError)
        assert SEED_ERROR in str(errors[0])
        assert value(exporter, "dbpool_pending_acquires") == 0
        assert value(exporter, "dbpool_pending_acquires_peak") == 1
        assert value(exporter, "dbpool_acquire_timeouts_total") == 1
        # The timed-out wait is recorded, at least as long as the pool timeout.
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="0.25") == 3
        assert value(exporter, "dbpool_acquire_wait_seconds_bucket", le="1.0") == 4

        for conn in held:
            conn.close()
        # The overflow connection is closed on return, not kept idle.
        assert out(exporter) == 0 and value(exporter, "dbpool_connections", state="idle") == 2
        assert value(exporter, "dbpool_overflow_connections") == 0
        assert value(exporter, "dbpool_checked_out_peak") == 3
        check_metrics(promtool, generate_latest(exporter.registry).decode())
    finally:
        exporter.stop()
        engine.dispose()


def _connect_expecting_timeout(engine, errors: list[BaseException]) -> None:
    try:
        engine.connect()
    except exc.TimeoutError as e:
        errors.append(e)


def test_async_engine_to_max_waiters_and_timeout(async_url: str) -> None:
    async def scenario() -> None:
        engine = create_async_engine(async_url, pool_size=2, max_overflow=1, pool_timeout=0.5)
        exporter = Exporter().register("app", engine)
        try:
            assert value(exporter, "dbpool_max_connections") == 3
            held = [await engine.connect() for _ in range(3)]
            assert out(exporter) == 3 and value(exporter, "dbpool_overflow_connections") == 1
            assert value(exporter, "dbpool_usage_ratio") == 1.0

            async def waiter() -> BaseException | None:
                try:
                    await engine.connect()
                except exc.TimeoutError as e:
                    return e
                return None

            task = asyncio.create_task(waiter())
            for _ in range(200):
                await asyncio.sleep(0.01)
                if value(exporter, "dbpool_pending_acquires") == 1:
                    break
            assert value(exporter, "dbpool_pending_acquires") == 1
            error = await task
            assert error is not None and SEED_ERROR in str(error)
            assert value(exporter, "dbpool_acquire_timeouts_total") == 1
            assert value(exporter, "dbpool_acquire_wait_seconds_count") == 4
            assert value(exporter, "dbpool_acquire_wait_seconds_sum") >= 0.5
            for conn in held:
                await conn.close()
            assert out(exporter) == 0 and value(exporter, "dbpool_connections", state="idle") == 2
            assert value(exporter, "dbpool_connection_hold_seconds_count") == 3
        finally:
            exporter.stop()
            await engine.dispose()

    asyncio.run(scenario())


def test_dispose_while_monitored_follows_the_new_pool(sync_url: str) -> None:
    engine = create_engine(sync_url, pool_size=2, max_overflow=0)
    untouched = set(engine.pool.__dict__)
    exporter = Exporter().register("app", engine)
    try:
        first = engine.pool
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        assert value(exporter, "dbpool_connections", state="idle") == 1
        engine.dispose()
        assert engine.pool is not first
        assert value(exporter, "dbpool_connections", state="idle") == 0
        held = engine.connect()
        assert out(exporter) == 1
        exporter.poll_now()  # the poll after dispose hooked the new pool: its acquires are timed
        held.close()
        with engine.connect():
            pass
        assert value(exporter, "dbpool_acquire_wait_seconds_count") >= 3
        assert value(exporter, "dbpool_connection_hold_seconds_count") >= 2
        assert "connect" in engine.pool.__dict__
        exporter.unregister("app")
        for pool in (first, engine.pool):
            assert "connect" not in pool.__dict__ and "_return_conn" not in pool.__dict__
            assert not pool.dispatch.checkin and not pool.dispatch.detach
        assert set(first.__dict__) == untouched  # nothing of ours is left on the instance
    finally:
        exporter.stop()
        engine.dispose()


@pytest.mark.parametrize("options", [{"pool_size": 0}, {"pool_size": 2, "max_overflow": -1}])
def test_unbounded_pool_has_no_max_and_no_ratio(sync_url: str, options: dict) -> None:
    engine = create_engine(sync_url, **options)
    exporter = Exporter().register("app", engine)
    try:
        held = [engine.connect() for _ in range(4)]
        assert out(exporter) == 4
        assert value(exporter, "dbpool_max_connections") is None
        assert value(exporter, "dbpool_usage_ratio") is None
        assert value(exporter, "dbpool_pending_acquires") == 0
        assert value(exporter, "dbpool_source_up", source="app") is None  # labels differ: source, not pool
        assert exporter.registry.get_sample_value("dbpool_source_up", {"source": "app", "kind": "sqlalchemy"}) == 1
        for conn in held:
            conn.close()
    finally:
        exporter.stop()
        engine.dispose()


@pytest.mark.parametrize("poolclass", [NullPool, StaticPool, SingletonThreadPool])
def test_pools_without_limits_export_what_they_can(sync_url: str, poolclass: type) -> None:
    engine = create_engine(sync_url, poolclass=poolclass)
    exporter = Exporter().register("app", engine)
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
            assert out(exporter) == 1  # counted by the acquire/checkin hooks
        assert out(exporter) == 0
        assert value(exporter, "dbpool_max_connections") is None
        assert value(exporter, "dbpool_pool_info", pool_class=poolclass.__name__, server=_server(sync_url),
                     database=engine.url.database) == 1
        assert value(exporter, "dbpool_connection_hold_seconds_count") == 1
    finally:
        exporter.stop()
        engine.dispose()


def _server(url: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return f"{u.host}:{u.port or 5432}"


def test_bare_pool_is_accepted(sync_url: str) -> None:
    engine = create_engine(sync_url, pool_size=1, max_overflow=0)
    exporter = Exporter().register("app", engine.pool)
    try:
        with engine.connect():
            assert out(exporter) == 1
        assert value(exporter, "dbpool_max_connections") == 1
        # A bare Pool knows no URL: the info metric has no server label rather than a wrong one.
        assert value(exporter, "dbpool_pool_info", pool_class="QueuePool", server="", database="") == 1
    finally:
        exporter.stop()
        engine.dispose()


def test_uninstrumented_pool_still_reports_status(sync_url: str) -> None:
    engine = create_engine(sync_url, pool_size=1, max_overflow=1)
    exporter = Exporter().register("app", engine, instrument=False)
    try:
        assert "connect" not in engine.pool.__dict__
        with engine.connect():
            assert out(exporter) == 1
        assert value(exporter, "dbpool_acquire_wait_seconds_count") is None
        assert value(exporter, "dbpool_max_connections") == 2
    finally:
        exporter.stop()
        engine.dispose()
