"""psycopg_pool ``ConnectionPool`` and ``AsyncConnectionPool`` read through ``get_stats()``."""

from __future__ import annotations

import inspect
from typing import Any

from psycopg_pool import PoolTimeout
from psycopg_pool.base import BasePool

from ..hooks import acquire_hook, release_hook
from ..recorder import Recorder
from ..redact import from_conninfo
from ..snapshot import COUNTER_HELP, PoolSnapshot

# Cumulative get_stats() keys: raw key -> (metric name without _total, factor to base units, help).
# One table, like pgbouncer_exporter's, so a new psycopg key is one line here.
COUNTERS: dict[str, tuple[str, float, str]] = {
    "requests_num": ("dbpool_psycopg_requests", 1.0, "Connection requests made to the pool."),
    "requests_queued": ("dbpool_psycopg_requests_queued", 1.0,
                        "Requests that had to wait in the queue because no connection was ready."),
    "requests_wait_ms": ("dbpool_psycopg_requests_wait_seconds", 1e-3,
                         "Total time requests spent waiting in the queue."),
    "requests_errors": ("dbpool_psycopg_requests_errors", 1.0,
                        "Requests that failed: timeouts, or rejected with a full queue."),
    "usage_ms": ("dbpool_psycopg_usage_seconds", 1e-3, "Total time connections spent out of the pool."),
    "returns_bad": ("dbpool_psycopg_returns_bad", 1.0,
                    "Connections returned in a bad state (closed, in a transaction)."),
    "connections_num": ("dbpool_psycopg_connections", 1.0, "Connection attempts made to the server."),
    "connections_ms": ("dbpool_psycopg_connections_seconds", 1e-3, "Total time spent connecting."),
    "connections_errors": ("dbpool_psycopg_connections_errors", 1.0, "Failed connection attempts."),
    "connections_lost": ("dbpool_psycopg_connections_lost", 1.0,
                         "Connections found broken by the pool's check."),
}
COUNTER_HELP.update({metric: doc for metric, _, doc in COUNTERS.values()})


class PsycopgPoolSource:
    """Reads ``get_stats()`` (never ``pop_stats()``, which would reset counters other readers share)."""

    kind = "psycopg"

    def __init__(self, name: str, pool: Any, *, interval: float = 1.0,
                 recorder: Recorder | None = None) -> None:
        if not isinstance(pool, BasePool):
            raise TypeError(f"pool {name!r}: expected a psycopg_pool pool, got {type(pool).__name__}")
        self.name = name
        self.interval = interval
        self.pool = pool
        self.recorder = recorder
        self.server, self.database = from_conninfo(pool.conninfo, getattr(pool, "kwargs", None))
        if recorder is not None:
            recorder.capacity = pool.max_size
            _install(pool, recorder)

    def poll(self) -> PoolSnapshot:
        stats = self.pool.get_stats()
        size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
        fields: dict[str, Any] = dict(
            # pool_size counts connections being opened too; they are not idle, so "checked out".
            checked_out=max(0, size - available),
            idle=available,
            min=stats.get("pool_min", 0),
            max=stats.get("pool_max", 0),
            overflow=max(0, size - stats.get("pool_min", 0)),
            timeout=float(self.pool.timeout),
            pending=stats.get("requests_waiting", 0),
            # The docs say keys may be absent until the event first happens: absent means 0.
            counters={metric: stats.get(key, 0) * factor for key, (metric, factor, _) in COUNTERS.items()},
        )
        if self.recorder is not None:
            self.recorder.capacity = fields["max"] or float("inf")
            # The hooks' own count of waiters replaces requests_waiting: psycopg_pool leaves a
            # timed-out client in its queue until the next connection comes back.
            fields.update(self.recorder.fold(fields["checked_out"]))
        else:
            fields["acquire_timeouts"] = stats.get("requests_errors", 0)
        return PoolSnapshot(kind=self.kind, pool_class=type(self.pool).__name__, server=self.server,
                            database=self.database, **fields)

    def close(self) -> None:
        self.pool.__dict__.pop("getconn", None)
        self.pool.__dict__.pop("putconn", None)


def _install(pool: BasePool, recorder: Recorder) -> None:
    # psycopg_pool reports only a total wait, not one per request. connection() calls
    # self.getconn()/self.putconn() (public API), so instance attributes shadowing them see
    # every acquire and release; removing them restores the class methods exactly.
    cls = type(pool)
    is_async = inspect.iscoroutinefunction(cls.getconn)  # type: ignore[attr-defined]
    pool.getconn = acquire_hook(cls.getconn.__get__(pool), recorder, PoolTimeout,  # type: ignore[attr-defined]
                                is_async=is_async, params="timeout=None")
    pool.putconn = release_hook(cls.putconn.__get__(pool), recorder, is_async=is_async)  # type: ignore[attr-defined]
