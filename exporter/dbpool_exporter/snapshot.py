"""Immutable snapshots returned by sources and rendered by the collector at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

from . import metrics as m
from .families import Families, Histogram

__all__ = ["Histogram", "PoolSnapshot", "Snapshot"]


class Snapshot(Protocol):
    """What every source returns: an immutable value that knows how to render itself."""

    def emit(self, name: str, out: Families) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One pool at one instant, in the shared vocabulary. ``None`` means "not known for this pool"."""

    kind: str
    pool_class: str
    checked_out: int | None = None
    idle: int | None = None
    overflow: int | None = None
    min: int | None = None
    max: int | None = None
    timeout: float | None = None
    pending: int | None = None
    acquire_timeouts: int | None = None
    server: str | None = None
    database: str | None = None
    # Kind-specific cumulative counters: catalogue name (metrics.py) -> value (already in base units).
    counters: Mapping[str, float] = field(default_factory=dict)
    # Event-level instrumentation (set when the pool is instrumented).
    acquire_wait: Histogram | None = None
    hold: Histogram | None = None
    checked_out_peak: int | None = None
    pending_peak: int | None = None
    oldest_checkout_age: float | None = None
    oldest_pending_age: float | None = None
    leaks: int | None = None
    # (site, connections held, oldest age) for the top sites, ``other`` last.
    sites: tuple[tuple[str, int, float], ...] | None = None

    def emit(self, name: str, out: Families) -> None:
        labels = {"pool": name, "kind": self.kind}
        info = {"pool_class": self.pool_class}
        if self.server:
            info["server"] = self.server
        if self.database:
            info["database"] = self.database
        out.info(m.POOL_INFO, {**labels, **info})
        if self.checked_out is not None:
            out.gauge(m.CONNECTIONS, {**labels, "state": "checked_out"}, self.checked_out)
        if self.idle is not None:
            out.gauge(m.CONNECTIONS, {**labels, "state": "idle"}, self.idle)
        for spec, value in (
            (m.OVERFLOW, self.overflow),
            (m.MIN, self.min),
            (m.MAX, self.max),
            (m.USAGE_RATIO, self.usage_ratio),
            (m.ACQUIRE_TIMEOUT, self.timeout),
            (m.PENDING, self.pending),
            (m.CHECKED_OUT_PEAK, self.checked_out_peak),
            (m.PENDING_PEAK, self.pending_peak),
            (m.OLDEST_CHECKOUT_AGE, self.oldest_checkout_age),
            (m.OLDEST_PENDING_AGE, self.oldest_pending_age),
        ):
            if value is not None:
                out.gauge(spec, labels, value)
        if self.acquire_timeouts is not None:
            out.counter(m.ACQUIRE_TIMEOUTS, labels, self.acquire_timeouts)
        if self.leaks is not None:
            out.counter(m.LEAKED, labels, self.leaks)
        for site, held, age in self.sites or ():
            out.gauge(m.SITE_CHECKED_OUT, {**labels, "site": site}, held)
            out.gauge(m.SITE_OLDEST_AGE, {**labels, "site": site}, age)
        for metric, value in self.counters.items():
            out.counter(m.get(metric), labels, value)
        if self.acquire_wait is not None:
            out.histogram(m.ACQUIRE_WAIT, labels, self.acquire_wait)
        if self.hold is not None:
            out.histogram(m.HOLD, labels, self.hold)

    @property
    def usage_ratio(self) -> float | None:
        if self.checked_out is None or not self.max:
            return None
        return self.checked_out / self.max

