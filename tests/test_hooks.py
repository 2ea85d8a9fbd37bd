"""One hook shape for every pool kind: each, sync or async, records the same events from the same template."""

from __future__ import annotations

import asyncio
import inspect
import traceback
from functools import partial
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from sqlalchemy import create_engine, exc
from sqlalchemy.ext.asyncio import create_async_engine

from dbpool_exporter import Exporter, hooks
from samples import polled_value

KINDS = ("sqlalchemy", "sqlalchemy-async", "psycopg", "psycopg-async")


value = partial(polled_value, pool="app")


async def drive(name: str, pg_dsn: str, sync_url: str, async_url: str) -> None:
    """Three checkouts at once between two polls, then one acquire that times out on the full pool."""
    kind = name.split("-")[0]
    if kind == "sqlalchemy":
        make: Any = create_async_engine if name.endswith("async") else create_engine
        target = make(async_url if name.endswith("async") else sync_url, pool_size=3, max_overflow=0,
                      pool_timeout=0.2)
        timeout_error: Any = exc.TimeoutError
    else:
        cls: Any = AsyncConnectionPool if name.endswith("async") else ConnectionPool
        pool = cls(pg_dsn, min_size=3, max_size=3, timeout=0.2, open=False)
        opened = pool.open(wait=True)
        if opened is not None:
            await opened
        target, timeout_error = pool, PoolTimeout
    exporter = Exporter().register("app", target)
    pool_object = getattr(getattr(target, "sync_engine", target), "pool", target)
    acquire = pool_object.connect if kind == "sqlalchemy" else pool_object.getconn
    # Both twins are the one template's, rendered into hooks.py.
    assert acquire.__code__.co_filename == hooks.__file__
    assert inspect.iscoroutinefunction(acquire) == (name == "psycopg-async")

    async def call(fn: Any, *args: Any) -> Any:
        result = fn(*args)
        return await result if inspect.isawaitable(result) else result

    try:
        exporter.poll_now()
        # An AsyncEngine's connect() is awaited to check out; a sync one's checks out at once.
        checkout = target.connect if kind == "sqlalchemy" else pool.getconn
        held = [await call(checkout) for _ in range(3)]
        with pytest.raises(timeout_error) as caught:
            await call(checkout)
        # The traceback runs through the hook, at the template's own line in hooks.py.
        frames = [f for f in traceback.extract_tb(caught.tb) if f.filename == hooks.__file__]
        assert frames and "original(" in (frames[0].line or "")
        for conn in held:
            await call(conn.close) if kind == "sqlalchemy" else await call(pool.putconn, conn)
        # No poll saw three out at once; the hooks did.
        assert value(exporter, "dbpool_checked_out_peak", kind=kind) == 3
        assert value(exporter, "dbpool_connection_hold_seconds_count", kind=kind) == 3
        assert value(exporter, "dbpool_acquire_wait_seconds_count", kind=kind) == 4
        assert value(exporter, "dbpool_acquire_timeouts_total", kind=kind) == 1
        assert value(exporter, "dbpool_pending_acquires", kind=kind) == 0
        exporter.unregister("app")
        assert not {"connect", "_return_conn", "getconn", "putconn"} & set(pool_object.__dict__)
    finally:
        exporter.stop()
        if kind == "sqlalchemy":
            await call(target.dispose)
        else:
            await call(pool.close)


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_records_peaks_holds_waits_and_timeouts_alike(name: str, pg_dsn: str, sync_url: str,
                                                                 async_url: str) -> None:
    asyncio.run(drive(name, pg_dsn, sync_url, async_url))


def test_a_hook_shape_names_only_parameters_and_an_attribute() -> None:
    with pytest.raises(ValueError, match="attribute name"):
        hooks.acquire_hook(lambda: None, hooks.Recorder(), TimeoutError, key="x; import os")
    with pytest.raises(ValueError, match="parameters"):
        hooks.release_hook(lambda c: None, hooks.Recorder(), params="conn): pass\nimport os\n(")
