"""Early warning from the hooks: the oldest waiting caller's age, and which code holds the connections."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from typing import Any, Iterator

import pytest
from psycopg_pool import ConnectionPool
from sqlalchemy import Engine, create_engine, exc
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dbpool_exporter import Exporter
from dbpool_exporter.sites import relative

HERE = relative(__file__)


def sample(exporter: Exporter, metric: str, kind: str = "sqlalchemy", **labels: str) -> float | None:
    return exporter.registry.get_sample_value(metric, {"pool": "app", "kind": kind, **labels})


def sites(exporter: Exporter, kind: str = "sqlalchemy") -> dict[str, float]:
    exporter.poll_now()
    return {s.labels["site"]: s.value for m in exporter.registry.collect() for s in m.samples
            if s.name == "dbpool_site_checked_out_connections" and s.labels["pool"] == "app"
            and s.labels["kind"] == kind}


@contextlib.contextmanager
def watched(url: str, *, register: dict[str, Any] | None = None,
            **engine_kw: Any) -> Iterator[tuple[Engine, Exporter, list[Any]]]:
    """An engine watched as "app"; connections the test appends to ``held`` are closed afterwards."""
    engine = create_engine(url, **engine_kw)
    exporter = Exporter().register("app", engine, **(register or {}))
    held: list[Any] = []
    try:
        yield engine, exporter, held
    finally:
        for conn in held:
            conn.close()
        exporter.stop()
        engine.dispose()


def line_of(fn: Any, marker: str) -> int:
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if marker in line)


# Application code as the seed had it: functions that check a connection out and keep it.
def get_db(engine: Any) -> Any:
    return engine.connect()  # checkout


def other(engine: Any) -> Any:
    """An application function that happens to be called like the overflow bucket."""
    return engine.connect()  # checkout


def quiet(engine: Any) -> Any:
    return engine.connect()  # checkout


async def aget_db(engine: Any) -> Any:
    return await engine.connect()  # checkout


def test_oldest_waiter_age_grows_while_a_caller_waits_and_drops_to_zero(sync_url: str) -> None:
    with watched(sync_url, pool_size=1, max_overflow=0, pool_timeout=10) as (engine, exporter, held):
        holder = engine.connect()
        exporter.poll_now()
        assert sample(exporter, "dbpool_oldest_pending_acquire_age_seconds") == 0
        got = threading.Event()

        def waiter() -> None:
            with engine.connect():
                got.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        exporter.poll_now()
        first = sample(exporter, "dbpool_oldest_pending_acquire_age_seconds")
        assert first is not None and first >= 0.4
        assert sample(exporter, "dbpool_pending_acquires") == 1
        time.sleep(0.3)
        exporter.poll_now()
        assert sample(exporter, "dbpool_oldest_pending_acquire_age_seconds") >= first + 0.2
        holder.close()
        assert got.wait(5)
        thread.join(5)
        exporter.poll_now()
        assert sample(exporter, "dbpool_oldest_pending_acquire_age_seconds") == 0


def test_a_timed_out_waiter_leaves_no_age_behind(sync_url: str) -> None:
    with watched(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.3) as (engine, exporter, _), \
            engine.connect():
        with pytest.raises(exc.TimeoutError):
            engine.connect()
        exporter.poll_now()
        assert sample(exporter, "dbpool_oldest_pending_acquire_age_seconds") == 0
        assert sample(exporter, "dbpool_acquire_timeouts_total") == 1


def test_a_busy_pool_names_the_code_that_holds_its_connections(sync_url: str) -> None:
    with watched(sync_url, pool_size=6, max_overflow=0) as (engine, exporter, held):
        exporter.poll_now()  # learns the pool's limit: sites are captured from half use on
        held += [quiet(engine) for _ in range(3)]  # a quiet pool: no site captured
        held += [get_db(engine) for _ in range(2)]
        held.append(other(engine))
        found = sites(exporter)
        get_db_site = f"get_db ({HERE}:{line_of(get_db, '# checkout')})"
        other_site = f"other ({HERE}:{line_of(other, '# checkout')})"
        assert found == {get_db_site: 2, other_site: 1, "other": 3}
        assert sum(found.values()) == sample(exporter, "dbpool_connections", state="checked_out") == 6
        age = sample(exporter, "dbpool_site_oldest_checkout_age_seconds", site=get_db_site)
        assert age is not None and age > 0
        for conn in held[3:]:
            conn.close()
        assert sites(exporter) == {"other": 3}


def test_only_the_top_sites_are_named_the_rest_count_as_other(sync_url: str) -> None:
    with watched(sync_url, register=dict(sites=1), pool_size=2, max_overflow=4) as (engine, exporter, held):
        exporter.poll_now()
        held += [quiet(engine) for _ in range(3)]  # held 0, 1, 2: only the last one is captured
        held += [get_db(engine) for _ in range(2)]
        held.append(other(engine))
        found = sites(exporter)
        assert found == {f"get_db ({HERE}:{line_of(get_db, '# checkout')})": 2, "other": 4}


def test_a_long_holder_turns_capture_on_in_a_quiet_pool(sync_url: str) -> None:
    with watched(sync_url, pool_size=10, max_overflow=0) as (engine, exporter, held):
        exporter.poll_now()
        held.append(quiet(engine))
        recorder = exporter.poller.states["app"].source.recorder  # type: ignore[attr-defined]
        recorder.site_age = 0.2  # the default is 10 s
        time.sleep(0.3)
        exporter.poll_now()  # one connection held past site_age: capture every checkout
        held.append(get_db(engine))
        assert sites(exporter) == {f"get_db ({HERE}:{line_of(get_db, '# checkout')})": 1, "other": 1}


def test_sites_zero_turns_attribution_off(sync_url: str) -> None:
    with watched(sync_url, register=dict(sites=0), pool_size=2, max_overflow=0) as (engine, exporter, held):
        exporter.poll_now()
        with engine.connect(), engine.connect():
            assert sites(exporter) == {}


def test_async_engine_sites_follow_the_greenlet_to_the_coroutine(async_url: str) -> None:
    async def main() -> dict[str, float]:
        engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
        exporter = Exporter().register("app", engine)
        held = []
        try:
            exporter.poll_now()
            held += [await aget_db(engine) for _ in range(2)]
            return await asyncio.to_thread(sites, exporter)
        finally:
            for conn in held:
                await conn.close()
            await exporter.astop()
            await engine.dispose()

    found = asyncio.run(main())
    assert found == {f"aget_db ({HERE}:{line_of(aget_db, '# checkout')})": 1, "other": 1}


def test_psycopg_pool_sites(pg_dsn: str) -> None:
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=2, open=True)
    exporter = Exporter().register("app", pool)
    try:
        exporter.poll_now()
        first = pool.getconn()
        second = pool.getconn()  # checkout
        found = sites(exporter, kind="psycopg")
        site = f"test_psycopg_pool_sites ({HERE}:{line_of(test_psycopg_pool_sites, 'getconn()  # checkout')})"
        assert found == {site: 1, "other": 1}
        pool.putconn(first)
        pool.putconn(second)
        assert sites(exporter, kind="psycopg") == {"other": 0}
    finally:
        exporter.stop()
        pool.close()


def test_with_leak_detection_the_site_comes_from_the_reported_stack(sync_url: str) -> None:
    with watched(sync_url, register=dict(leak_threshold=600), pool_size=4, max_overflow=0) as (engine, exporter, held):
        held.append(get_db(engine))  # leak detection captures every checkout, quiet pool or not
        assert sites(exporter) == {f"get_db ({HERE}:{line_of(get_db, '# checkout')})": 1, "other": 0}


def test_an_unbounded_pool_names_long_holders(sync_url: str) -> None:
    with watched(sync_url, poolclass=NullPool) as (engine, exporter, held):
        exporter.poll_now()
        held.append(quiet(engine))  # no limit, so no "half used": only age turns capture on
        recorder = exporter.poller.states["app"].source.recorder  # type: ignore[attr-defined]
        recorder.site_age = 0.2
        time.sleep(0.3)
        exporter.poll_now()
        held.append(get_db(engine))
        assert sites(exporter) == {f"get_db ({HERE}:{line_of(get_db, '# checkout')})": 1, "other": 1}


def test_psycopg_waiter_age(pg_dsn: str) -> None:
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=1, open=True)
    exporter = Exporter().register("app", pool)
    try:
        exporter.poll_now()
        holder = pool.getconn()
        got = threading.Event()

        def waiter() -> None:
            with pool.connection(timeout=10):
                got.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        exporter.poll_now()
        age = sample(exporter, "dbpool_oldest_pending_acquire_age_seconds", kind="psycopg")
        assert age is not None and age >= 0.4
        pool.putconn(holder)
        assert got.wait(5)
        thread.join(5)
        exporter.poll_now()
        assert sample(exporter, "dbpool_oldest_pending_acquire_age_seconds", kind="psycopg") == 0
    finally:
        exporter.stop()
        pool.close()
