"""The interface every source implements: pools now, PostgreSQL servers and PgBouncer next."""

from __future__ import annotations

from typing import Any, Awaitable, Protocol, runtime_checkable

from ..snapshot import Snapshot


@runtime_checkable
class Source(Protocol):
    """Reads one thing and returns an immutable snapshot.

    ``poll`` is either a plain function (pools: microseconds, no I/O) or a coroutine function
    (servers: a query); the scheduler runs each the way it needs.
    """

    name: str
    kind: str
    interval: float

    def poll(self) -> Snapshot | Awaitable[Snapshot]: ...

    def close(self) -> Any: ...
