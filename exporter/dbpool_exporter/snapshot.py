"""Immutable snapshots returned by sources and rendered by the collector at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

from .families import Families


class Snapshot(Protocol):
    """What every source returns: an immutable value that knows how to render itself."""

    def emit(self, name: str, out: Families) -> None: ...


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative histogram state copied at poll time (bucket upper bounds and cumulative counts)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0


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
    # Kind-specific cumulative counters: metric name -> value (already in base units).
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
        out.info("dbpool_pool", "Static facts about a pool: class, server (host:port) and database.",
                 {**labels, **info})
        if self.checked_out is not None:
            out.gauge("dbpool_connections", "Open connections by state (checked_out + idle = open).",
                      {**labels, "state": "checked_out"}, self.checked_out)
        if self.idle is not None:
            out.gauge("dbpool_connections", "Open connections by state (checked_out + idle = open).",
                      {**labels, "state": "idle"}, self.idle)
        for metric, value, doc in (
            ("dbpool_overflow_connections", self.overflow,
             "Open connections beyond the pool's base size (never negative)."),
            ("dbpool_min_connections", self.min, "Base size of the pool (pool_size, min_size)."),
            ("dbpool_max_connections", self.max,
             "Hard limit on open connections (pool_size + max_overflow, max_size); absent when unbounded."),
            ("dbpool_usage_ratio", self.usage_ratio,
             "checked_out / max_connections, 0..1; absent when the pool is unbounded."),
            ("dbpool_acquire_timeout_seconds", self.timeout,
             "How long an acquire waits before the pool gives up (pool_timeout, timeout)."),
            ("dbpool_pending_acquires", self.pending, "Callers waiting for a connection right now."),
            ("dbpool_checked_out_peak", self.checked_out_peak,
             "Highest checked-out count seen in the recent window."),
            ("dbpool_pending_acquires_peak", self.pending_peak,
             "Highest number of waiting callers seen in the recent window."),
            ("dbpool_oldest_checkout_age_seconds", self.oldest_checkout_age,
             "Age of the longest-held checked-out connection (0 when none is out)."),
            ("dbpool_oldest_pending_acquire_age_seconds", self.oldest_pending_age,
             "How long the longest-waiting caller has been waiting for a connection (0 when none waits)."),
        ):
            if value is not None:
                out.gauge(metric, doc, labels, value)
        if self.acquire_timeouts is not None:
            out.counter("dbpool_acquire_timeouts", "Acquires that failed because the pool timed out.",
                        labels, self.acquire_timeouts)
        if self.leaks is not None:
            out.counter("dbpool_leaked_connections",
                        "Checkouts held past the pool's leak-detection threshold.", labels, self.leaks)
        for site, held, age in self.sites or ():
            out.gauge("dbpool_site_checked_out_connections",
                      "Connections checked out now, by the application code that took them (top sites, then "
                      "other).", {**labels, "site": site}, held)
            out.gauge("dbpool_site_oldest_checkout_age_seconds",
                      "Age of the oldest connection checked out by each site (0 when it holds none).",
                      {**labels, "site": site}, age)
        for metric, value in self.counters.items():
            out.counter(metric, COUNTER_HELP.get(metric, metric), labels, value)
        if self.acquire_wait is not None:
            out.histogram("dbpool_acquire_wait_seconds",
                          "Time from asking for a connection to getting one, or to the pool timeout.",
                          labels, self.acquire_wait)
        if self.hold is not None:
            out.histogram("dbpool_connection_hold_seconds", "Time from checkout to checkin.",
                          labels, self.hold)

    @property
    def usage_ratio(self) -> float | None:
        if self.checked_out is None or not self.max:
            return None
        return self.checked_out / self.max


# Help text of kind-specific counters, filled in by the sources that define them.
COUNTER_HELP: dict[str, str] = {}
