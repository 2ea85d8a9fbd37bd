"""Runs every source on its own interval (APScheduler, or the daemon's own loop) and keeps its latest result."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from .redact import scrub
from .snapshot import Snapshot
from .sources.base import Source

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

log = logging.getLogger("dbpool_exporter")

# APScheduler logs every run at INFO; at one run per second per pool that would drown the host's
# logs. Quiet it unless the host configured those loggers itself.
for _name in ("apscheduler.executors.default", "apscheduler.scheduler"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


class _NoSkipped(logging.Filter):
    # "skipped: maximum number of running instances reached" is max_instances=1 doing its job (a slow
    # poll never piles up); the slow poll shows in dbpool_source_poll_duration_seconds. Logged every
    # interval, it would fill the host application's log.
    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


# Our schedulers log here, not to "apscheduler.scheduler", so the filter touches nobody else's scheduler.
_scheduler_log = logging.getLogger("dbpool_exporter.scheduler")
_scheduler_log.addFilter(_NoSkipped())
if _scheduler_log.level == logging.NOTSET:
    _scheduler_log.setLevel(logging.WARNING)
# How long remove() waits for a poll already under way in another thread (polls bound themselves).
REMOVE_WAIT = 15.0


@dataclass(slots=True)
class SourceState:
    """What the collector reads: the last good snapshot and the source's own health."""

    source: Source
    snapshot: Snapshot | None = None
    snapshot_at: float = 0.0  # monotonic
    up: bool = False
    last_success: float = 0.0  # wall clock, for the timestamp metric
    duration: float = 0.0
    errors: int = 0
    polls: int = 0
    last_error: str = ""
    removed: bool = False
    # Held by a thread while it polls, so remove() can wait for a poll already under way.
    busy: threading.Lock = field(default_factory=threading.Lock)
    busy_thread: int = 0

    def fresh(self, now: float) -> bool:
        # A snapshot older than a few intervals (a stalled loop, a hung poll) is not current.
        return self.up and self.snapshot is not None and now - self.snapshot_at <= 3 * self.source.interval + 1


class LoopScheduler:
    """The part of APScheduler's interface the Poller uses, on plain asyncio timers of one running loop.

    For an asyncio program of its own (the daemon), which then need not load APScheduler, tzlocal and
    multiprocessing. Call it from the loop's thread only. The semantics are the ones the Poller asks of
    APScheduler: a job is one task, so it never overlaps itself (``max_instances=1``); ticks missed while it
    ran or the loop was busy are skipped (``coalesce``); the first run is at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: dict[str, _LoopJob] = {}

    def start(self) -> None:
        pass

    def add_job(self, func: Callable[[], Any], trigger: str, *, seconds: float, id: str, name: str = "",
                replace_existing: bool = False, next_run_time: datetime | None = None) -> None:
        if trigger != "interval" or seconds <= 0:
            raise ValueError(f"job {id!r}: only a positive interval is supported")
        previous = self._jobs.get(id)
        if previous is not None:
            if not replace_existing:
                raise ValueError(f"a job {id!r} is already scheduled")
            self.remove_job(id)
        # A replaced job's run under way finishes first: one id never runs twice at once.
        after = previous.task if previous is not None and previous.running else None
        job = self._jobs[id] = _LoopJob(id, seconds, func, after=after)
        job.task = self._loop.create_task(self._run(job), name=f"dbpool-exporter:{name or id}")

    def get_job(self, job_id: str) -> _LoopJob | None:
        return self._jobs.get(job_id)

    def remove_job(self, job_id: str) -> None:
        """Unschedule; a KeyError (as APScheduler's JobLookupError is) when there is no such job."""
        job = self._jobs.pop(job_id)
        job.removed = True
        # A run under way finishes, as with APScheduler; none follows it.
        if not job.running and job.task is not None:
            job.task.cancel()

    def shutdown(self, wait: bool = True) -> None:
        # As APScheduler's AsyncIOExecutor: runs under way are cancelled too.
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.removed = True
            if job.task is not None:
                job.task.cancel()

    async def _run(self, job: _LoopJob) -> None:
        if job.after is not None:
            await asyncio.wait([job.after])
        due = self._loop.time()
        while True:
            delay = due - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            job.running = True
            try:
                if inspect.iscoroutinefunction(job.func):
                    await job.func()
                else:  # AsyncIOScheduler runs plain functions in the loop's executor: they may block
                    await asyncio.to_thread(job.func)
            except asyncio.CancelledError:
                if job.removed:  # shutdown() cancelled it
                    raise
                # A poll's own cancellation (a timeout inside it) must not end its schedule for good.
                _scheduler_log.exception("job %s was cancelled", job.id)
            except Exception:
                _scheduler_log.exception("job %s raised an exception", job.id)
            finally:
                job.running = False
            if self._jobs.get(job.id) is not job:
                return  # removed or replaced while it ran
            # A fixed rate, as APScheduler's interval trigger: the next tick still ahead.
            due += job.seconds
            now = self._loop.time()
            if due < now:
                due += math.ceil((now - due) / job.seconds) * job.seconds


@dataclass(slots=True)
class _LoopJob:
    id: str
    seconds: float
    func: Callable[[], Any]
    task: asyncio.Task[None] | None = None
    running: bool = False
    removed: bool = False
    after: asyncio.Task[None] | None = None  # the run of the job this one replaced, to finish first


class Poller:
    """One scheduled job per source: ``max_instances=1`` and coalesced, so polls never pile up.

    APScheduler runs them (on the host's loop, else in a thread), or, with ``on_loop`` set before
    ``start()``, a ``LoopScheduler`` on the running loop.
    """

    def __init__(self) -> None:
        self.states: dict[str, SourceState] = {}
        self.on_loop = False
        self._scheduler: BaseScheduler | LoopScheduler | None = None
        self._threaded = False  # a BackgroundScheduler thread, rather than an AsyncIOScheduler on the host's loop
        self._private_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # Housekeeping jobs beside the sources (publishing to other workers, retrying a port).
        self._chores: dict[str, tuple[float, Callable[[], None]]] = {}

    # --- sources ----------------------------------------------------------------------------
    def add(self, source: Source) -> SourceState:
        with self._lock:
            if source.name in self.states:
                raise ValueError(f"a source named {source.name!r} is already registered")
            state = self.states[source.name] = SourceState(source)
        if self._scheduler is not None:
            self._schedule(state)
        return state

    def remove(self, name: str) -> Source:
        """Unschedule ``name``; a poll already running in another thread is waited for (bounded)."""
        with self._lock:
            state = self.states.pop(name)
        state.removed = True
        if self._scheduler is not None and self._scheduler.get_job(name) is not None:
            self._scheduler.remove_job(name)
        # A poll under way would otherwise finish after the caller closed the source, and undo the close
        # (re-hook a pool, reconnect). Polls are bounded by their timeouts; this by REMOVE_WAIT.
        if state.busy_thread != threading.get_ident() and state.busy.acquire(timeout=REMOVE_WAIT):
            state.busy.release()
        return state.source

    def every(self, job_id: str, seconds: float, func: Callable[[], None]) -> None:
        """Run ``func`` (sync, quick) every ``seconds`` while polling runs; replaces a job of that id."""
        self._chores[job_id] = (seconds, func)
        if self._scheduler is not None:
            self._schedule_chore(job_id)

    def cancel(self, job_id: str) -> None:
        if self._chores.pop(job_id, None) is not None and self._scheduler is not None:
            with contextlib.suppress(KeyError):  # APScheduler's JobLookupError is one
                self._scheduler.remove_job(job_id)

    # --- running ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._scheduler is not None

    def start(self) -> None:
        """Use the running asyncio loop when there is one (async hosts), else a daemon thread."""
        if self._scheduler is not None:
            return
        if self.on_loop:
            self._threaded = False
            self._scheduler = LoopScheduler(asyncio.get_running_loop())
            self._schedule_all()
            return
        defaults = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        # Imported here: a host that never starts polling never loads APScheduler.
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.schedulers.background import BackgroundScheduler

        self._threaded = loop is None
        if loop is not None:
            self._scheduler = AsyncIOScheduler(event_loop=loop, job_defaults=defaults, timezone=timezone.utc,
                                               logger=_scheduler_log)
        else:
            self._scheduler = BackgroundScheduler(job_defaults=defaults, daemon=True, timezone=timezone.utc,
                                                  logger=_scheduler_log)
        self._scheduler.start()
        self._schedule_all()

    def _schedule_all(self) -> None:
        for state in list(self.states.values()):
            self._schedule(state)
        for job_id in list(self._chores):
            self._schedule_chore(job_id)

    def after_fork(self) -> bool:
        """In a forked child: the parent's scheduler thread and loop thread did not come along.

        Returns whether polling ran in a thread, so the caller can start it again in the child.
        """
        threaded = self._scheduler is not None and self._threaded
        self._scheduler, self._private_loop = None, None
        self._lock = threading.Lock()  # the parent's may have been held by a thread that is gone
        return threaded

    def shutdown(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            # An AsyncIOScheduler cannot wait from outside its loop; its jobs are short anyway.
            scheduler.shutdown(wait=self._threaded)

    def close_loop(self) -> None:
        """Stop the private loop; after the sources that live on it have been closed."""
        loop, self._private_loop = self._private_loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def _schedule(self, state: SourceState) -> None:
        assert self._scheduler is not None
        if not self._threaded:
            async def job() -> None:
                await self.poll_async(state)
            func: Callable[[], Any] = job
        else:
            def func() -> None:
                self.poll_sync(state)
        self._scheduler.add_job(func, "interval", seconds=state.source.interval, id=state.source.name,
                                name=state.source.name, next_run_time=datetime.now(timezone.utc))

    def _schedule_chore(self, job_id: str) -> None:
        assert self._scheduler is not None
        seconds, func = self._chores[job_id]

        def chore() -> None:
            try:
                func()
            except Exception as e:  # housekeeping must never take polling down
                log.warning("%s failed: %s", job_id, scrub(f"{type(e).__name__}: {e}"))

        self._scheduler.add_job(chore, "interval", seconds=seconds, id=job_id, name=job_id,
                                replace_existing=True, next_run_time=datetime.now(timezone.utc))

    # --- one poll -------------------------------------------------------------------------
    def poll_sync(self, state: SourceState) -> None:
        """Poll from a plain thread; a coroutine source runs on a private loop thread."""
        with state.busy:
            if state.removed:
                return
            state.busy_thread = threading.get_ident()
            try:
                self._poll_sync(state)
            finally:
                state.busy_thread = 0

    def _poll_sync(self, state: SourceState) -> None:
        started = time.perf_counter()
        try:
            result = state.source.poll()
            if inspect.isawaitable(result):
                result = asyncio.run_coroutine_threadsafe(_await(result), self._loop()).result()
        except Exception as e:  # a broken source must never reach the host application
            self._failed(state, e, started)
        else:
            self._succeeded(state, result, started)

    async def poll_async(self, state: SourceState) -> None:
        if state.removed:
            return
        started = time.perf_counter()
        try:
            result = state.source.poll()
            if inspect.isawaitable(result):
                result = await result
        except Exception as e:
            self._failed(state, e, started)
        else:
            self._succeeded(state, result, started)

    def _succeeded(self, state: SourceState, snapshot: Snapshot, started: float) -> None:
        state.duration = time.perf_counter() - started
        state.polls += 1
        state.snapshot, state.snapshot_at = snapshot, time.monotonic()
        state.last_success = time.time()
        if not state.up:
            if state.errors:
                log.info("source recovered source=%s", state.source.name)
            state.up, state.last_error = True, ""

    def _failed(self, state: SourceState, error: Exception, started: float) -> None:
        state.duration = time.perf_counter() - started
        state.polls += 1
        state.errors += 1
        message = scrub(f"{type(error).__name__}: {error}".strip().splitlines()[0])
        # Once per change of state, not once per poll.
        if state.up or state.polls == 1 or message != state.last_error:
            log.warning("source poll failed source=%s error=%r", state.source.name, message)
        state.up, state.last_error = False, message

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._private_loop is None:
                loop = self._private_loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="dbpool-exporter-loop", daemon=True).start()
            return self._private_loop


async def _await(awaitable: Any) -> Any:
    return await awaitable
