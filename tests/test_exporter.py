"""The in-process API: HTTP server, ASGI and WSGI mounts, failing sources, names, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import check_metrics
from dbpool_exporter import Exporter, PoolSnapshot
from dbpool_exporter.throwaway import free_port


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample(text_: str, line_prefix: str) -> float:
    for line in text_.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in scrape")


class Broken:
    """A source whose poll raises, with a password in the error, like a bad DSN would."""

    name, kind, interval = "broken", "postgres", 0.05

    def poll(self) -> PoolSnapshot:
        raise RuntimeError("connection to postgresql://app:hunter2@db:5432/x failed")

    def close(self) -> None:
        pass


def test_http_server_threaded_app_and_clean_shutdown(sync_url: str, promtool: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine(sync_url, pool_size=2, max_overflow=0)
    before = set(threading.enumerate())
    exporter = Exporter().register("app", engine, interval=0.05).register("broken", Broken())
    port = free_port()
    with caplog.at_level(logging.INFO, logger="dbpool_exporter"):
        exporter.start_http_server(port)
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
                time.sleep(0.3)  # a few scheduled polls
                body = scrape(f"http://127.0.0.1:{port}/metrics")
            assert sample(body, 'dbpool_connections{kind="sqlalchemy",pool="app",state="checked_out"}') == 1
            assert sample(body, 'dbpool_source_up{kind="sqlalchemy",source="app"}') == 1
            # The broken source is down and counted, and the others are still served.
            assert sample(body, 'dbpool_source_up{kind="postgres",source="broken"}') == 0
            assert sample(body, 'dbpool_source_errors_total{kind="postgres",source="broken"}') >= 2
            assert "hunter2" not in body
            check_metrics(promtool, body)
        finally:
            exporter.stop()
    # One log line for the failure, not one per poll, and no password in it.
    failures = [r for r in caplog.records if "source poll failed" in r.getMessage()]
    assert len(failures) == 1 and "hunter2" not in failures[0].getMessage()
    # Stopping ends the scheduler and HTTP threads and restores the pool.
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - before
    assert "connect" not in engine.pool.__dict__
    with pytest.raises(OSError):
        scrape(f"http://127.0.0.1:{port}/metrics")
    engine.dispose()


def test_stale_snapshot_is_not_served() -> None:
    class Once:
        name, kind, interval = "once", "sqlalchemy", 0.05
        calls = 0

        def poll(self) -> PoolSnapshot:
            self.calls += 1
            if self.calls > 1:
                time.sleep(0.5)  # a hung poll: the previous snapshot ages
            return PoolSnapshot(kind="sqlalchemy", pool_class="X", checked_out=1, idle=0)

        def close(self) -> None:
            pass

    exporter = Exporter().register("once", Once())
    exporter.poll_now()
    assert exporter.registry.get_sample_value("dbpool_connections", {"pool": "once", "kind": "sqlalchemy",
                                                                     "state": "checked_out"}) == 1
    exporter.poller.states["once"].snapshot_at -= 10  # as if no poll had finished for 10 s
    assert exporter.registry.get_sample_value("dbpool_connections", {"pool": "once", "kind": "sqlalchemy",
                                                                     "state": "checked_out"}) is None


def test_names_and_types_are_checked(sync_url: str) -> None:
    engine = create_engine(sync_url)
    exporter = Exporter().register("app", engine)
    with pytest.raises(ValueError, match="already registered"):
        exporter.register("app", engine)
    with pytest.raises(TypeError, match="don't know how to watch"):
        exporter.register("other", object())
    with pytest.raises(KeyError, match="no source named"):
        exporter.unregister("nope")
    with pytest.raises(ValueError, match="interval"):
        exporter.register("fast", engine, interval=0)
    exporter.stop()
    engine.dispose()


def test_existing_registry_and_wsgi_mount(sync_url: str) -> None:
    registry = CollectorRegistry()
    engine = create_engine(sync_url, pool_size=3, max_overflow=0)
    exporter = Exporter(registry=registry).register("app", engine).start()
    server = make_server("127.0.0.1", 0, exporter.wsgi_app(), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        exporter.poll_now()
        body = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
        assert sample(body, 'dbpool_max_connections{kind="sqlalchemy",pool="app"}') == 3
        assert registry.get_sample_value("dbpool_max_connections", {"pool": "app", "kind": "sqlalchemy"}) == 3
    finally:
        server.shutdown()
        server.server_close()
        exporter.stop()
        engine.dispose()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_asgi_app_with_both_seed_pools(async_url: str, pg_dsn: str) -> None:
    """The seed's shape: an asyncio web app with an async engine and an AsyncConnectionPool."""

    async def scenario() -> None:
        engine = create_async_engine(async_url, pool_size=2, max_overflow=4, pool_timeout=5)
        pool = AsyncConnectionPool(pg_dsn, min_size=1, max_size=3, open=False)
        await pool.open(wait=True)
        exporter = Exporter().register("app", engine, interval=0.05).register("checkpointer", pool, interval=0.05)
        metrics_app = exporter.asgi_app()

        async def app(scope, receive, send):  # a tiny real ASGI app: /work uses the DB, /metrics is ours
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        exporter.start()  # inside the running loop: the AsyncIOScheduler path
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await exporter.astop()
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            if scope["path"].startswith("/metrics"):
                return await metrics_app(scope, receive, send)
            async with engine.connect() as conn, pool.connection() as pconn:
                await conn.execute(text("select pg_sleep(0.2)"))
                await pconn.execute("select 1")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.02)
            work = [asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/work") for _ in range(3)]
            busy = asyncio.gather(*work)
            await asyncio.sleep(0.15)
            body = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
            await busy
            assert sample(body, 'dbpool_connections{kind="sqlalchemy",pool="app",state="checked_out"}') == 3
            assert sample(body, 'dbpool_overflow_connections{kind="sqlalchemy",pool="app"}') == 1
            assert sample(body, 'dbpool_max_connections{kind="psycopg",pool="checkpointer"}') == 3
            assert sample(body, 'dbpool_source_up{kind="psycopg",source="checkpointer"}') == 1
        finally:
            server.should_exit = True
            await serving
            await pool.close()
            await engine.dispose()

    asyncio.run(scenario())


def test_in_process_server_honours_web_config(tmp_path, sync_url: str) -> None:
    import base64
    import urllib.error

    import bcrypt

    from dbpool_exporter.webconfig import load_web_config

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  prom: '{hashed}'\n")
    engine = create_engine(sync_url)
    exporter = Exporter().register("app", engine).start_http_server(0, web_config=load_web_config(str(path)))
    url = f"http://127.0.0.1:{exporter.http_port}/metrics"
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            scrape(url)
        assert denied.value.code == 401
        request = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(b"prom:pw").decode()})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert b"dbpool_source_up" in response.read()
    finally:
        exporter.stop()
        engine.dispose()


def test_server_source_in_a_threaded_app_closes_its_connection(pg_dsn: str, sync_url: str) -> None:
    import psycopg

    from dbpool_exporter import PostgresSource

    def alive(pid: int) -> bool:
        with psycopg.connect(pg_dsn) as conn:
            return conn.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()[0] == 1

    engine = create_engine(sync_url)
    source = PostgresSource("db", pg_dsn, interval=0.1)
    # No running loop here: a BackgroundScheduler thread, the async source on the private loop.
    exporter = Exporter().register("app", engine).register("db", source).start()
    try:
        deadline = time.monotonic() + 10
        while exporter.registry.get_sample_value("dbpool_source_up", {"source": "db", "kind": "postgres"}) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert exporter.registry.get_sample_value("dbpool_server_max_connections", {
            "server": _server_of(pg_dsn)}) is not None
        # This source's own backend, by its server PID: other clients of a shared server do not count.
        pid = source._conn.get_server_pid()  # type: ignore[union-attr]
        assert alive(pid)
    finally:
        exporter.stop()
        engine.dispose()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def _server_of(dsn: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(dsn)
    return f"{url.host}:{url.port or 5432}"


def test_user_subclasses_of_pools_are_watched(sync_url: str, pg_dsn: str) -> None:
    """Pool kinds are chosen by isinstance, so a pool class defined in the application works."""
    from psycopg_pool import ConnectionPool
    from sqlalchemy.pool import QueuePool

    class MyQueuePool(QueuePool):
        pass

    class MyPool(ConnectionPool):
        pass

    engine = create_engine(sync_url, poolclass=MyQueuePool, pool_size=2, max_overflow=1)
    pool = MyPool(pg_dsn, min_size=1, max_size=2, open=True)
    exporter = Exporter().register("engine", engine).register("subclass", engine.pool).register("psycopg", pool)
    try:
        with engine.connect(), pool.connection():
            exporter.poll_now()
            get = exporter.registry.get_sample_value
            assert get("dbpool_max_connections", {"pool": "subclass", "kind": "sqlalchemy"}) == 3
            assert get("dbpool_connections", {"pool": "engine", "kind": "sqlalchemy", "state": "checked_out"}) == 1
            assert get("dbpool_connections", {"pool": "psycopg", "kind": "psycopg", "state": "checked_out"}) == 1
            info = [s.labels for m in exporter.registry.collect() for s in m.samples if s.name == "dbpool_pool_info"]
            assert {i["pool"]: i["pool_class"] for i in info} == {"engine": "MyQueuePool", "subclass": "MyQueuePool",
                                                                  "psycopg": "MyPool"}
    finally:
        exporter.stop()
        pool.close()
        engine.dispose()
