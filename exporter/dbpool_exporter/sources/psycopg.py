"""psycopg_pool ``ConnectionPool`` and ``AsyncConnectionPool`` read through ``get_stats()``."""

from __future__ import annotations

import inspect
from typing import Any

from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from psycopg_pool.base import BasePool

from .. import metrics as m
from ..hooks import acquire_hook, release_hook
from ..metrics import MetricSpec
from ..recorder import Recorder
from ..redact import from_conninfo
from ..snapshot import PoolSnapshot

# Cumulative get_stats() keys: raw key -> (catalogue entry, factor to base units).
# One table, like pgbouncer_exporter's, so a new psycopg key is one line here and one in metrics.py.
COUNTERS: dict[str, tuple[MetricSpec, float]] = {
    "requests_num": (m.PSYCOPG_REQUESTS, 1.0),
    "requests_queued": (m.PSYCOPG_REQUESTS_QUEUED, 1.0),
    "requests_wait_ms": (m.PSYCOPG_REQUESTS_WAIT, 1e-3),
    "requests_errors": (m.PSYCOPG_REQUESTS_ERRORS, 1.0),
    "usage_ms": (m.PSYCOPG_USAGE, 1e-3),
    "returns_bad": (m.PSYCOPG_RETURNS_BAD, 1.0),
    "connections_num": (m.PSYCOPG_CONNECTIONS, 1.0),
    "connections_ms": (m.PSYCOPG_CONNECTIONS_TIME, 1e-3),
    "connections_errors": (m.PSYCOPG_CONNECTIONS_ERRORS, 1.0),
    "connections_lost": (m.PSYCOPG_CONNECTIONS_LOST, 1.0),
}


class PsycopgPoolSource:
    """Reads ``get_stats()`` (never ``pop_stats()``, which would reset counters other readers share)."""

    kind = "psycopg"

    def __init__(self, name: str, pool: Any, *, interval: float = 1.0,
                 recorder: Recorder | None = None) -> None:
        # The two concrete pools (Null* subclass them), which unlike BasePool have a conninfo.
        if not isinstance(pool, (ConnectionPool, AsyncConnectionPool)):
            raise TypeError(f"pool {name!r}: expected a psycopg_pool pool, got {type(pool).__name__}")
        self.name = name
        self.interval = interval
        self.pool = pool
        self.recorder = recorder
        # psycopg_pool 3.3 also takes a (maybe async) callable returning the conninfo: not called here.
        conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
        self.server, self.database = from_conninfo(conninfo, getattr(pool, "kwargs", None))
        if recorder is not None:
            recorder.capacity = pool.max_size
            _install(pool, recorder)

    def poll(self) -> PoolSnapshot:
        stats = self.pool.get_stats()
        size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
        fields: dict[str, Any] = dict(
            # pool_size counts connections still being opened (all min_size of them right after
            # open(), for minutes while the server refuses): without hooks they pass for checked out.
            checked_out=max(0, size - available),
            idle=available,
            min=stats.get("pool_min", 0),
            max=stats.get("pool_max", 0),
            overflow=max(0, size - stats.get("pool_min", 0)),
            timeout=float(self.pool.timeout),
            pending=stats.get("requests_waiting", 0),
            # The docs say keys may be absent until the event first happens: absent means 0.
            counters={spec.name: stats.get(key, 0) * factor for key, (spec, factor) in COUNTERS.items()},
        )
        if self.recorder is not None:
            self.recorder.capacity = fields["max"] or float("inf")
            # The hooks' own count of waiters replaces requests_waiting: psycopg_pool leaves a
            # timed-out client in its queue until the next connection comes back.
            # The hooks count the connections handed out since register() and never one being
            # opened, so a pool still filling reads 0 checked out (and peak), not min_size.
            fields["checked_out"] = min(fields["checked_out"], len(self.recorder.out))
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
    # Checkouts keyed by the connection itself (no id() to make per call) where it hashes and compares
    # by identity, as psycopg's own classes do; a connection_class with its own __eq__ or __hash__
    # would refuse to be a key, or merge two connections into one.
    conn_cls = getattr(pool, "connection_class", object)
    by_object = conn_cls.__hash__ is object.__hash__ and conn_cls.__eq__ is object.__eq__
    pool.getconn = acquire_hook(cls.getconn.__get__(pool), recorder, PoolTimeout,  # type: ignore[attr-defined]
                                is_async=is_async, params="timeout=None", by_object=by_object)
    pool.putconn = release_hook(cls.putconn.__get__(pool), recorder,  # type: ignore[attr-defined]
                                is_async=is_async, by_object=by_object)
