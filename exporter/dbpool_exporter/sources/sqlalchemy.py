"""SQLAlchemy pools (``Engine``, ``AsyncEngine`` or a bare ``Pool``) read through their accessors."""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

from ..recorder import Recorder
from ..redact import from_sqlalchemy_url
from ..snapshot import PoolSnapshot


class SQLAlchemySource:
    """Polls ``engine.pool`` every time, because ``Engine.dispose()`` swaps in a new pool."""

    kind = "sqlalchemy"

    def __init__(self, name: str, target: Any, *, interval: float = 1.0,
                 recorder: Recorder | None = None) -> None:
        sync_engine = getattr(target, "sync_engine", None)  # AsyncEngine wraps a sync Engine
        engine = sync_engine if sync_engine is not None else target
        if isinstance(engine, Engine):
            self._engine: Engine | None = engine
            self._pool: Pool | None = None
            self.server, self.database = from_sqlalchemy_url(engine.url)
        elif isinstance(engine, Pool):
            self._engine, self._pool = None, engine
            self.server = self.database = None  # a bare Pool only knows its creator function
        else:
            raise TypeError(f"pool {name!r}: expected an Engine, AsyncEngine or Pool, got {type(target).__name__}")
        self.name = name
        self.interval = interval
        self.recorder = recorder
        self._hooked: weakref.WeakSet[Pool] = weakref.WeakSet()
        if recorder is not None:
            self._hook(self.pool)

    @property
    def pool(self) -> Pool:
        return self._engine.pool if self._engine is not None else self._pool  # type: ignore[return-value]

    def poll(self) -> PoolSnapshot:
        pool = self.pool
        fields: dict[str, Any] = {}
        if isinstance(pool, QueuePool):
            size = pool.size()
            # max_overflow has no public accessor; -1 (or pool_size 0) means unbounded.
            max_overflow = getattr(pool, "_max_overflow", -1)
            idle = pool.checkedin()
            checked_out = pool.checkedout()
            bounded = size > 0 and max_overflow >= 0
            if self.recorder is not None:
                self.recorder.capacity = size + max_overflow if bounded else float("inf")
            fields.update(
                checked_out=checked_out,
                idle=idle,
                # overflow() starts at -pool_size: only connections beyond the base size count.
                overflow=max(0, pool.overflow()),
                min=size,
                max=size + max_overflow if bounded else None,
                timeout=pool.timeout(),
            )
        if self.recorder is not None:
            if pool not in self._hooked:
                self._hook(pool)
            fields.update(self.recorder.fold(fields.get("checked_out")))
            if "checked_out" not in fields:
                # Pools without accessors (NullPool, StaticPool, ...): the hooks still know.
                fields["checked_out"] = len(self.recorder.out)
        return PoolSnapshot(kind=self.kind, pool_class=type(pool).__name__, server=self.server,
                            database=self.database, **fields)

    def close(self) -> None:
        # The engine's current pool may have inherited our listeners through recreate().
        for pool in {*self._hooked, self.pool}:
            _unhook(pool)
        self._hooked.clear()

    def _hook(self, pool: Pool) -> None:
        _install(pool, self.recorder)  # type: ignore[arg-type]
        self._hooked.add(pool)


def _install(pool: Pool, recorder: Recorder) -> None:
    # SQLAlchemy has no "before checkout" event, and the checkout event fires after the wait.
    # Engine.raw_connection() calls pool.connect() (public API) for every checkout, sync or
    # async (AsyncAdaptedQueuePool waits inside it via greenlet), so an instance attribute
    # shadowing Pool.connect sees the whole wait, the pool's TimeoutError included, without
    # touching the class. Deleting the attribute restores the original method exactly.
    original = type(pool).connect.__get__(pool)
    started_fn, acquired, failed = recorder.acquire_started, recorder.acquired, recorder.acquire_failed

    def connect() -> Any:
        started = started_fn()
        try:
            fairy = original()
        except exc.TimeoutError:
            failed(started, True)
            raise
        except BaseException:
            failed(started, False)
            raise
        # The record's info dict lives as long as the record and is handed to checkin too.
        acquired(id(fairy.info), started)
        return fairy

    def checkin(dbapi_connection: Any, record: Any) -> None:
        recorder.released(id(record.info))

    def detach(dbapi_connection: Any, record: Any) -> None:
        recorder.released(id(record.info))

    pool.connect = connect  # type: ignore[method-assign]
    # Pool.recreate() copies listeners into the new pool; don't add them twice.
    for name, fn in (("checkin", checkin), ("detach", detach)):
        for old in _listeners(pool, name):
            event.remove(pool, name, old)
        event.listen(pool, name, fn)


def _listeners(pool: Pool, name: str) -> list[Any]:
    return [fn for fn in getattr(pool.dispatch, name) if getattr(fn, "__qualname__", "").startswith("_install.")]


def _unhook(pool: Pool) -> None:
    pool.__dict__.pop("connect", None)
    for name in ("checkin", "detach"):
        for fn in _listeners(pool, name):
            event.remove(pool, name, fn)
