"""Event-level pool truth (acquire wait, hold time, peaks, leaks, holding sites) with a tiny hot path.

The host application's checkout path only appends floats to deques and updates a dict and a set;
folding those into histograms, computing peaks, attributing holders to sites and looking for leaks
happens in ``fold()``, which the scheduler calls from the poll job, off the hot path.
``deque.append``/``popleft``, ``set.add``/``discard``, ``dict`` item assignment and ``pop`` are
atomic under the GIL, so no lock is taken while the host waits. The start time of a caller is kept
only when it enters acquire with the pool full (it will queue), so a pool with room pays one
truth test of an empty set for the oldest-waiter gauge.

Checkout sites (the application code that took a connection) are captured only while the pool
is busy: at least half its connections out, or one held longer than ``site_age``. A quiet pool
pays one comparison per checkout; a pool heading for exhaustion, or a leak, names its holders.
"""

from __future__ import annotations

import bisect
import logging
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Sequence

from . import sites as _sites
from .snapshot import Histogram

log = logging.getLogger("dbpool_exporter.leaks")

# From well under a millisecond (an idle connection handed over) to past the 30 s default
# timeout of SQLAlchemy (and psycopg_pool's 30 s), so a timed-out acquire lands in its own bucket.
WAIT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 45.0, 60.0, 120.0,
)
# Holds span a quick query to a long report or a leak.
HOLD_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)
_STACK_DEPTH = 24
# A checkout held this long (seconds) opens site capture for every checkout, so a slow leak in a
# quiet pool is attributed from its second connection on.
SITE_AGE = 10.0
_now = time.perf_counter  # a module global is found faster than time.perf_counter
_Weak = weakref.ref
# Gates are ints (an int comparison is the cheapest on the hot path); this one is never passed.
NEVER = sys.maxsize


def _gate(value: float) -> int:
    return int(value) if value < NEVER else NEVER


@dataclass(frozen=False, slots=True)
class _Checkout:
    started: float
    site: tuple[CodeType, int] | None
    stack: tuple[tuple[CodeType, int], ...] | None = None
    reported: bool = False


class _Folded:
    """Cumulative bucket counts owned by the poll job."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds)) + (float("inf"),)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def drain(self, raw: deque[float]) -> None:
        bounds, counts = self.bounds, self.counts
        while raw:
            try:
                value = raw.popleft()
            except IndexError:  # drained concurrently
                break
            counts[bisect.bisect_left(bounds, value)] += 1
            self.total += value

    def snapshot(self) -> Histogram:
        running, cumulative = 0, []
        for c in self.counts:
            running += c
            cumulative.append(running)
        return Histogram(self.bounds, tuple(cumulative), self.total)


class Recorder:
    """Per-pool event sink: the hooks write, ``fold()`` reads."""

    def __init__(
        self,
        *,
        wait_buckets: Sequence[float] = WAIT_BUCKETS,
        hold_buckets: Sequence[float] = HOLD_BUCKETS,
        leak_threshold: float | None = None,
        peak_window: float = 60.0,
        pool_name: str = "",
        sites: int = 5,
        site_age: float = SITE_AGE,
    ) -> None:
        self.waits: deque[float] = deque()
        self.holds: deque[float] = deque()
        self.waiting: deque[None] = deque()  # one entry per caller inside acquire
        # Start times of the callers that entered acquire with the pool full: they queue. Two
        # starting in the same clock tick share an entry, which only matters for that instant.
        self.queued: set[float] = set()
        # The pool's limit, kept current by the source: a caller inside acquire only waits
        # for the pool when every connection up to this limit is already out.
        self._capacity: float = float("inf")
        self.timeouts: deque[None] = deque()  # a deque's length is an atomic counter
        # Checkout start times; (start, site) while sites are captured; _Checkout records when
        # leak detection is on. Keyed by id(connection), or by the connection itself where the
        # hooks say by_object (see unpin()).
        self.out: dict[object, float | tuple[float, _sites.Site | None] | _Checkout] = {}
        self.out_peak = 0
        self.waiting_peak = 0
        # capacity + waiting_peak: a caller entering acquire raises the peak when len(out) +
        # len(waiting) exceeds it, one comparison instead of float arithmetic on the hot path.
        self.peak_gate: int = NEVER
        # A caller entering acquire queues when len(out) + len(waiting) exceeds the capacity.
        self.full_gate: int = NEVER
        self.leak_threshold = leak_threshold
        self.peak_window = peak_window
        self.pool_name = pool_name
        self.sites = max(0, int(sites))
        self.site_age = site_age
        # A checkout's site is captured when len(out) >= site_gate; fold() keeps it current.
        self.site_gate: int = 0 if leak_threshold is not None else NEVER
        # min(site_gate, out_peak): below it an acquire stores its start time and is done, one
        # comparison; at or past it acquired() captures the site or raises the peak.
        self.acquired_gate: int = 0
        self._wait_hist = _Folded(wait_buckets)
        self._hold_hist = _Folded(hold_buckets)
        self._peaks: deque[tuple[float, int, int]] = deque()
        self.leaks = 0

    @property
    def capacity(self) -> float:
        return self._capacity

    @capacity.setter
    def capacity(self, value: float) -> None:
        self._capacity = value
        self.peak_gate = _gate(value + self.waiting_peak)
        self.full_gate = _gate(value)
        self._open_site_gate(0.0)

    # --- the hooks' slower branches (hooks.py holds the hot path) ------------------------------
    def acquire_failed(self, started: float, timed_out: bool) -> None:
        self.waiting.pop()
        self.queued.discard(started)
        if timed_out:
            self.waits.append(_now() - started)
            self.timeouts.append(None)

    def queue(self, inside: int, started: float) -> None:
        """``inside`` callers hold or wait for a connection, more than the pool has: this one queues.

        ``peak_gate`` (capacity + waiting peak) is never below ``full_gate`` (capacity), so the
        waiting peak needs checking only here.
        """
        self.queued.add(started)
        if inside > self.peak_gate:
            self.raise_waiting_peak(inside)

    def raise_waiting_peak(self, inside: int) -> None:
        """``inside`` callers hold or wait for a connection: more than ever since the last fold."""
        self.waiting_peak = int(inside - self._capacity)
        self.peak_gate = _gate(self._capacity + self.waiting_peak)

    def acquired(self, held: int, now: float) -> float | _Checkout | tuple[float, _sites.Site | None]:
        """What ``out`` keeps for a checkout made with ``held`` others out, at ``acquired_gate`` or past it.

        A start time, or with its site (start, site), or with leak detection a record holding its
        stack, where fold() finds the site. Called by the hook, so both skip it.
        """
        if held >= self.out_peak:
            self.out_peak = peak = held + 1
            # min(site_gate, out_peak) inline: the call would cost more than the rest of this branch.
            self.acquired_gate = peak if peak < self.site_gate else self.site_gate
        if held < self.site_gate:
            return now
        if self.leak_threshold is None:
            return now, _capture_site(2)  # a tuple: no Python-level __init__ on the hot path
        return _Checkout(now, None, _capture_stack())

    def released_checkout(self, checkout: _Checkout | tuple[float, _sites.Site | None]) -> None:
        if checkout.__class__ is tuple:
            self.holds.append(_now() - checkout[0])
            return
        held = _now() - checkout.started  # type: ignore[union-attr]
        self.holds.append(held)
        if checkout.reported:  # type: ignore[union-attr]
            log.warning("previously reported leaked connection returned pool=%s held_seconds=%.1f",
                        self.pool_name, held)

    # --- poll side --------------------------------------------------------------------------
    def fold(self, checked_out_now: int | None = None) -> dict[str, object]:
        """Drain raw events into histograms and return the event-level snapshot fields."""
        self._wait_hist.drain(self.waits)
        self._hold_hist.drain(self.holds)
        self.unpin()
        now_mono = time.monotonic()
        now = time.perf_counter()
        out_now = len(self.out)
        waiting_now = self.blocked()
        # Reset the between-polls maxima to the present, then remember this poll's maxima.
        out_max, self.out_peak = max(self.out_peak, out_now, checked_out_now or 0), out_now
        wait_max, self.waiting_peak = max(self.waiting_peak, waiting_now), waiting_now
        self.peak_gate = _gate(self._capacity + waiting_now)
        peaks = self._peaks
        peaks.append((now_mono, out_max, wait_max))
        while peaks and peaks[0][0] < now_mono - self.peak_window:
            peaks.popleft()
        checkouts = list(self.out.values())
        oldest = max((now - _started(c) for c in checkouts), default=0.0)
        if self.leak_threshold is not None:
            self._report_leaks([c for c in checkouts if c.__class__ is _Checkout], now)
        first_waiter = min(self.queued, default=None)
        self._open_site_gate(oldest)
        return {
            "acquire_wait": self._wait_hist.snapshot(),
            "hold": self._hold_hist.snapshot(),
            "pending": waiting_now,
            "acquire_timeouts": len(self.timeouts),
            "checked_out_peak": max(p[1] for p in peaks),
            "pending_peak": max(p[2] for p in peaks),
            "oldest_checkout_age": oldest,
            "oldest_pending_age": max(0.0, now - first_waiter) if first_waiter is not None else 0.0,
            "leaks": self.leaks if self.leak_threshold is not None else None,
            "sites": self._top_sites(checkouts, now) if self.sites else None,
        }

    def unpin(self) -> None:
        """Hold no connection alive: move every checkout keyed by its connection to a weak key.

        Hooks made with ``by_object`` key ``out`` by the connection itself: cheaper than ``id()``
        on the hot path (no int is made) and never confused by a reused id. But a key is a strong
        reference, and a connection the application drops without returning must be freed, and
        its server session closed, as it would be without us (reference cycles included). So each
        poll moves those keys to weak references; the release hook looks there (``released_late``)
        when its own key is gone. A dropped connection still counts as out: the pool never gets
        that slot back.
        """
        out = self.out
        for key in [k for k in list(out) if k.__class__ is not int and k.__class__ is not _Weak]:
            checkout = out.get(key)
            if checkout is None:
                continue
            try:
                weak: object = _Weak(key)
            except TypeError:  # no weak references to this type: its id, which holds nothing
                weak = id(key)
            # Add the weak key before removing the strong one, so a release in between finds one of
            # them; if the release took the strong one, the weak copy is stale and goes too.
            out[weak] = checkout
            if out.pop(key, None) is None:
                out.pop(weak, None)

    def released_late(self, conn: object) -> None:
        """The release of a checkout that ``unpin()`` moved to a weak key (held across a poll)."""
        try:
            checkout = self.out.pop(_Weak(conn), None)
        except TypeError:
            checkout = self.out.pop(id(conn), None)
        if checkout.__class__ is float:
            self.holds.append(_now() - checkout)
        elif checkout is not None:
            self.released_checkout(checkout)  # type: ignore[arg-type]

    def _open_site_gate(self, oldest: float) -> None:
        if self.leak_threshold is not None or (self.sites and oldest > self.site_age):
            self.site_gate = 0
        elif self.sites:
            # Half used; an unbounded pool has no half, only age opens it.
            self.site_gate = _gate((self._capacity + 1) // 2) if self._capacity < NEVER else NEVER
        else:
            self.site_gate = NEVER
        self.acquired_gate = min(self.site_gate, self.out_peak)

    def _top_sites(self, checkouts: list[float | tuple[float, _sites.Site | None] | _Checkout],
                   now: float) -> tuple[tuple[str, int, float], ...]:
        """(site, connections held, oldest age) for the top ``sites`` sites by count, then ``other``.

        ``other`` also holds checkouts taken while the pool was quiet, whose site was not captured.
        """
        held: dict[str, list[float]] = {}  # label -> [count, oldest age]
        other = [0, 0.0]
        for c in checkouts:
            site = None
            if c.__class__ is tuple:
                site = c[1]
            elif c.__class__ is _Checkout:
                site = c.site
                if site is None and c.stack:
                    site = c.site = _sites.first_in(c.stack)
            entry = held.setdefault(_sites.label(site), [0, 0.0]) if site is not None else other
            entry[0] += 1
            entry[1] = max(entry[1], now - _started(c))
        ranked = sorted(held.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
        for _, (count, age) in ranked[self.sites:]:
            other[0] += count
            other[1] = max(other[1], age)
        top = [(site, int(count), age) for site, (count, age) in ranked[: self.sites]]
        return (*top, (_sites.OTHER, int(other[0]), other[1]))

    def blocked(self) -> int:
        """Callers inside acquire beyond the pool's limit: those waiting for a connection."""
        return max(0, int(len(self.out) + len(self.waiting) - self._capacity)) if self._capacity < float("inf") else 0

    def _report_leaks(self, checkouts: list[_Checkout], now: float) -> None:
        threshold = self.leak_threshold or 0.0
        for c in checkouts:
            if not c.reported and now - c.started > threshold:
                c.reported = True
                self.leaks += 1
                log.warning("connection leak suspected pool=%s held_seconds=%.1f threshold_seconds=%g "
                            "checked_out_at:\n%s", self.pool_name, now - c.started, threshold,
                            format_stack(c.stack or ()))


_capture_site = _sites.capture


def _started(checkout: float | tuple[float, _sites.Site | None] | _Checkout) -> float:
    if isinstance(checkout, _Checkout):
        return checkout.started
    return checkout[0] if isinstance(checkout, tuple) else checkout


def _capture_stack() -> tuple[tuple[CodeType, int], ...]:
    # Code objects and bytecode offsets only: no frames kept alive (their locals could be large),
    # and line numbers, which cost a scan of each frame's line table, worked out only when a leak
    # is actually reported.
    frame: FrameType | None = sys._getframe(3)
    stack: list[tuple[CodeType, int]] = []
    hops = 0
    while len(stack) < _STACK_DEPTH:
        if frame is None:
            # SQLAlchemy's asyncio layer runs the pool inside a greenlet whose stack ends at
            # greenlet_spawn; the application's coroutines are on the parent greenlet's stack.
            frame = _sites.parent_greenlet_frame(hops)
            hops += 1
            if frame is None:
                break
        stack.append((frame.f_code, frame.f_lasti))
        frame = frame.f_back
    return tuple(stack)


def format_stack(stack: tuple[tuple[CodeType, int], ...]) -> str:
    """Innermost-last, like a traceback, skipping frames of the pool libraries themselves."""
    lines = []
    for code, lasti in reversed(stack):
        filename = code.co_filename
        if "/sqlalchemy/" in filename or "/psycopg_pool/" in filename or "/dbpool_exporter/" in filename:
            continue
        lines.append(f'  File "{filename}", line {_sites.lineno(code, lasti)}, in {code.co_name}')
    return "\n".join(lines)
