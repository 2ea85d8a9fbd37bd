"""SQLAlchemy pools (``Engine``, ``AsyncEngine`` or a bare ``Pool``) read through their accessors."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.pool import base as _pool_base

from ..hooks import acquire_hook, release_hook
from ..recorder import Recorder
from ..redact import from_sqlalchemy_url
from ..snapshot import PoolSnapshot

# The fairy's _connection_record slot (its public twin, fairy.info, memoizes through two Python
# calls) and Pool._return_conn are private, so use them only where they are known to exist.
_FAST = "_connection_record" in getattr(getattr(_pool_base, "_ConnectionFairy", None), "__slots__", ())


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
        self._origins: list[Pool] = []  # pools our listeners were added to (kept for removal)
        self._listeners: dict[str, Any] = {}
        # A poll running while close() unhooks must not hook the pool again afterwards.
        self._hook_lock = threading.Lock()
        self._closed = False
        if recorder is not None:
            self._hook(self.pool)

    @property
    def pool(self) -> Pool:
        if self._engine is not None:
            return self._engine.pool  # read each time: dispose() replaces an engine's pool
        assert self._pool is not None  # __init__ sets the engine or the pool
        return self._pool

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
                with self._hook_lock:
                    if not self._closed and pool not in self._hooked:
                        self._hook(pool)
            fields.update(self.recorder.fold(fields.get("checked_out")))
            if "checked_out" not in fields:
                # Pools without accessors (NullPool, StaticPool, ...): the hooks still know.
                fields["checked_out"] = len(self.recorder.out)
        return PoolSnapshot(kind=self.kind, pool_class=type(pool).__name__, server=self.server,
                            database=self.database, **fields)

    def close(self) -> None:
        with self._hook_lock:
            self._closed = True
            self._unhook()

    def _unhook(self) -> None:
        for pool in list(self._hooked):
            pool.__dict__.pop("connect", None)
            pool.__dict__.pop("_return_conn", None)
        # Removing a listener from the pool it was added to also removes the copies that
        # Pool.recreate() (Engine.dispose()) made of it in its successors.
        for pool in self._origins:
            for name, fn in self._listeners.items():
                if event.contains(pool, name, fn):
                    event.remove(pool, name, fn)
        self._hooked.clear()
        self._origins.clear()

    def _hook(self, pool: Pool) -> None:
        recorder = self.recorder
        assert recorder is not None
        fast = _FAST and hasattr(type(pool), "_return_conn")
        connect, returned, listeners = _hooks(pool, recorder, fast)
        if not self._listeners:  # the first pool's: removing them removes recreate()'s copies too
            self._listeners = listeners
        pool.connect = connect  # type: ignore[method-assign]
        if returned is not None:
            pool._return_conn = returned  # type: ignore[method-assign]
        for name, fn in self._listeners.items():
            if fn not in getattr(pool.dispatch, name):  # recreate() may have copied it already
                event.listen(pool, name, fn)
                if pool not in self._origins:
                    self._origins.append(pool)
        self._hooked.add(pool)


def _hooks(pool: Pool, recorder: Recorder, fast: bool) -> tuple[Any, Any, dict[str, Any]]:
    """The pool's connect and _return_conn stand-ins (None where not shadowed) and its listeners.

    SQLAlchemy has no "before checkout" event, and the checkout event fires after the wait.
    Engine.raw_connection() calls pool.connect() (public API) for every checkout, sync or async
    (AsyncAdaptedQueuePool waits inside it via greenlet), so an instance attribute shadowing it sees
    the whole wait, the pool's TimeoutError included. Every "checkin" event is followed at once by
    pool._return_conn(record), its only caller; shadowing that private method too costs a fraction
    of the event dispatch, which alone was ~7% of a bare checkout+checkin (bench/checkout.py).
    A checkout is keyed by its pool record (or the record's info dict, which lives as long): both
    the checkout and every way back to the pool name it.
    """
    key = "_connection_record" if fast else "info"
    connect = acquire_hook(type(pool).connect.__get__(pool), recorder, exc.TimeoutError, key=key)
    returned = release_hook(type(pool)._return_conn.__get__(pool), recorder, params="record") if fast else None
    # A detached connection leaves the pool for good: it is no longer checked out from it.
    # Where _return_conn is shadowed, a checkin listener would count the same return twice.
    released = release_hook(None, recorder, params="dbapi_connection, record", key="" if fast else "info")
    return connect, returned, {"detach": released} if fast else {"checkin": released, "detach": released}
