"""A service shaped like the incident's, for real uvicorn/gunicorn worker tests (ASGI and WSGI).

Environment: DBPOOL_APP_DSN (libpq URL), DBPOOL_APP_MODE (port | mount | none), DBPOOL_APP_METRICS_PORT,
DBPOOL_APP_POOL (size,overflow,timeout), DBPOOL_APP_CHECKPOINTER_MAX, DBPOOL_APP_WSGI and DBPOOL_APP_START_AT_IMPORT.
GET /hold?n=K checks out K connections and keeps them (a leak), /release gives them back,
/work does one quick query, /pid says which worker answered.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import parse_qs

import psycopg_pool
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import dbpool_exporter

DSN = os.environ["DBPOOL_APP_DSN"]
MODE = os.environ.get("DBPOOL_APP_MODE", "port")
METRICS_PORT = int(os.environ.get("DBPOOL_APP_METRICS_PORT", "0"))
CHECKPOINTER_MAX = int(os.environ.get("DBPOOL_APP_CHECKPOINTER_MAX", "2"))  # 0: no checkpointer pool watched
SIZE, OVERFLOW, TIMEOUT = (float(x) for x in os.environ.get("DBPOOL_APP_POOL", "2,3,2").split(","))


def _url(driver: str) -> str:
    return make_url(DSN).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def _start(exporter: dbpool_exporter.Exporter) -> None:
    if MODE == "port":
        exporter.start_http_server(METRICS_PORT)
    else:
        exporter.start()


# --- ASGI (uvicorn workers, gunicorn -k uvicorn.workers.UvicornWorker) ------------------------------
state: dict[str, object] = {}


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            engine = create_async_engine(_url("asyncpg"), pool_size=int(SIZE), max_overflow=int(OVERFLOW),
                                         pool_timeout=TIMEOUT)
            pool = psycopg_pool.AsyncConnectionPool(DSN, min_size=1, max_size=CHECKPOINTER_MAX or 1, open=False)
            await pool.open()
            exporter = dbpool_exporter.Exporter().register("app", engine)
            if CHECKPOINTER_MAX:
                exporter.register("checkpointer", pool)
            _start(exporter)
            state.update(engine=engine, pool=pool, exporter=exporter, metrics=exporter.asgi_app(), held=[])
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await state["exporter"].astop()
            await state["pool"].close()
            await state["engine"].dispose()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _reply(send, body: str, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})


async def asgi_app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    path, query = scope["path"], parse_qs(scope.get("query_string", b"").decode())
    if path.startswith("/metrics"):
        await state["metrics"](scope, receive, send)
        return
    engine, held = state["engine"], state["held"]
    try:
        if path == "/hold":
            for _ in range(int(query.get("n", ["1"])[0])):
                held.append(await engine.connect())
        elif path == "/release":
            while held:
                await held.pop().close()
        elif path == "/work":
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            await asyncio.sleep(float(query.get("sleep", ["0"])[0]))
    except Exception as e:  # the test reads the pool error the user would see
        await _reply(send, f"{os.getpid()} {type(e).__name__}: {e}", 503)
        return
    await _reply(send, f"{os.getpid()} held={len(held)}")


# --- WSGI (gunicorn sync workers) --------------------------------------------------------------------
_sync_engine = None
_sync_exporter = None
_sync_held: list = []


def _sync_setup() -> None:
    global _sync_engine, _sync_exporter
    _sync_engine = create_engine(_url("psycopg"), pool_size=int(SIZE), max_overflow=int(OVERFLOW),
                                 pool_timeout=TIMEOUT)
    _sync_exporter = dbpool_exporter.Exporter().register("app", _sync_engine)
    if os.environ.get("DBPOOL_APP_START_AT_IMPORT"):
        _start(_sync_exporter)  # in each worker; in the gunicorn master under --preload


if os.environ.get("DBPOOL_APP_WSGI"):
    _sync_setup()


def wsgi_app(environ, start_response):
    if not _sync_exporter.poller.running:
        _start(_sync_exporter)  # first request in this worker: after any fork
    path, query = environ["PATH_INFO"], parse_qs(environ.get("QUERY_STRING", ""))
    if path.startswith("/metrics"):
        return _sync_exporter.wsgi_app()(environ, start_response)
    try:
        if path == "/hold":
            for _ in range(int(query.get("n", ["1"])[0])):
                _sync_held.append(_sync_engine.connect())
        elif path == "/release":
            while _sync_held:
                _sync_held.pop().close()
        elif path == "/work":
            with _sync_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        status, body = "200 OK", f"{os.getpid()} held={len(_sync_held)}"
    except Exception as e:
        status, body = "503 Service Unavailable", f"{os.getpid()} {type(e).__name__}: {e}"
    start_response(status, [("Content-Type", "text/plain")])
    return [body.encode()]
