"""The in-process API: register pools by name, then serve, mount or hand over the collector."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from prometheus_client import CollectorRegistry, make_asgi_app, make_wsgi_app

from . import exposition, workers
from .collector import DbpoolCollector
from .httpserver import RunningServer, serve_wsgi
from .poller import Poller
from .recorder import HOLD_BUCKETS, WAIT_BUCKETS, Recorder
from .sources.base import Source

if TYPE_CHECKING:
    from .webconfig import WebConfig

log = logging.getLogger("dbpool_exporter")

PUBLISH_INTERVAL = 1.0  # seconds between a worker's publications to the shared directory
TAKEOVER_INTERVAL = 1.0  # seconds between a standby worker's attempts to take over the metrics port
_PUBLISH_JOB, _TAKEOVER_JOB = "dbpool-exporter:publish", "dbpool-exporter:takeover"


class Exporter:
    """Monitors pools (and, later, servers) and exposes them to Prometheus.

    Nothing runs until ``start()``/``start_http_server()``; the collector lives in ``registry``
    (a fresh one unless you pass yours, e.g. ``prometheus_client.REGISTRY``).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 multiprocess_dir: str | os.PathLike[str] | None = None) -> None:
        """``multiprocess_dir`` (else ``$DBPOOL_EXPORTER_MULTIPROC_DIR``): where several worker processes
        meet, so each one's endpoint serves them all; see README, "Several worker processes"."""
        self._own_registry = registry is None
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.poller = Poller()
        self.collector = DbpoolCollector(self.poller)
        self.registry.register(self.collector)
        self._http: RunningServer | None = None
        self._multiprocess_dir = multiprocess_dir
        # (addr, port, web_config) while another worker holds our port and this one waits to take it over.
        self._standby: tuple[str, int, WebConfig | None] | None = None
        self._standby_tries = 0
        _LIVE.add(self)

    def register(
        self,
        name: str,
        target: Any,
        *,
        interval: float = 1.0,
        instrument: bool = True,
        leak_threshold: float | None = None,
        wait_buckets: Sequence[float] = WAIT_BUCKETS,
        hold_buckets: Sequence[float] = HOLD_BUCKETS,
        peak_window: float = 60.0,
        sites: int = 5,
    ) -> Exporter:
        """Watch a SQLAlchemy ``Engine``/``AsyncEngine``/``Pool``, a psycopg_pool pool or a ``Source``.

        ``instrument`` adds the event-level hooks (acquire wait, hold time, peaks, waiters for
        SQLAlchemy); ``leak_threshold`` (seconds) turns on leak reports; ``sites`` is how many
        checkout sites (the application code holding connections) are named per pool, 0 for
        none. Returns the exporter, so calls chain.
        """
        if not name or not isinstance(name, str):
            raise ValueError("a pool needs a non-empty name")
        if name in self.poller.states:
            raise ValueError(f"a source named {name!r} is already registered")
        if interval <= 0:
            raise ValueError(f"pool {name!r}: interval must be positive, got {interval!r}")
        if isinstance(target, Source) and not _is_pool(target):
            source: Source = target
        else:
            recorder = Recorder(wait_buckets=wait_buckets, hold_buckets=hold_buckets,
                                leak_threshold=leak_threshold, peak_window=peak_window,
                                pool_name=name, sites=sites) if instrument else None
            source = _source_for(name, target, interval, recorder)
        self.poller.add(source)
        return self

    def unregister(self, name: str) -> None:
        """Stop watching ``name`` and restore its pool exactly as it was."""
        try:
            source = self.poller.remove(name)
        except KeyError:
            raise KeyError(f"no source named {name!r} is registered") from None
        source.close()

    def start(self) -> Exporter:
        """Start polling: on the running asyncio loop if called from one, else in a thread.

        In a worker of gunicorn/uvicorn (or with a shared directory configured) this process also
        publishes its pools for the other workers' endpoints, and serves theirs.
        """
        self._join_workers()
        self.poller.start()
        return self

    def start_http_server(
        self, port: int, addr: str = "127.0.0.1", web_config: WebConfig | None = None
    ) -> Exporter:
        """Start polling and serve ``/metrics`` on ``addr:port`` from daemon threads.

        ``web_config`` (from ``load_web_config(path)``, the exporter-toolkit format) adds TLS and
        basic auth; port 0 picks a free port (see ``http_port``). Called in every worker of a
        multi-process server, one worker serves every worker's pools and the others publish theirs
        (and take the port over if the serving worker exits): no worker fails on a taken port.
        """
        self._join_workers()
        if self._http is None and self._standby is None:
            try:
                self._http = serve_wsgi(self.wsgi_app(), addr, port, web_config)
            except OSError as e:
                if e.errno != errno.EADDRINUSE or self.collector.publisher is None:
                    raise
                self._standby, self._standby_tries = (addr, port, web_config), 0
                log.info("metrics port in use, publishing for the worker that serves it port=%d dir=%s",
                         port, self.collector.publisher.directory)
                self.poller.every(_TAKEOVER_JOB, TAKEOVER_INTERVAL, self._take_over)
        return self.start()

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http else None

    @property
    def worker_dir(self) -> Path | None:
        """The shared directory this process publishes to, or ``None`` when it runs alone."""
        publisher = self.collector.publisher
        return publisher.directory if publisher else None

    # --- several workers ------------------------------------------------------------------------
    def _join_workers(self) -> None:
        if self.collector.publisher is not None:
            return
        named = self._multiprocess_dir or os.environ.get(workers.ENV_DIR)
        directory = Path(named) if named else workers.default_dir()
        if directory is None:
            return
        try:
            workers.prepare_dir(directory, private=not named)
            publisher = workers.Publisher(directory)
        except (workers.SharedDirError, OSError) as e:
            if named:  # asked for by name: a misconfiguration the user must see
                raise ValueError(f"multiprocess_dir: {e}") from None
            log.warning("worker processes will not be combined: %s", e)
            return
        self.collector.publisher = publisher
        self.poller.every(_PUBLISH_JOB, PUBLISH_INTERVAL, self._publish)

    def _publish(self) -> None:
        publisher = self.collector.publisher
        if publisher is None or publisher.pid != os.getpid():
            return
        serving = f"{self._http.url}" if self._http is not None else ""
        publisher.publish(exposition.render(self.collector.own()),
                          ttl=workers.STALE_INTERVALS * PUBLISH_INTERVAL + 1, serving=serving)

    def _take_over(self) -> None:
        standby = self._standby
        if standby is None:
            self.poller.cancel(_TAKEOVER_JOB)
            return
        addr, port, web_config = standby
        try:
            self._http = serve_wsgi(self.wsgi_app(), addr, port, web_config)
        except OSError as e:
            self._standby_tries += 1
            if self._standby_tries == 3 and self.collector.publisher is not None:
                docs = workers.read_workers(self.collector.publisher.directory, exclude=self.collector.publisher.id)
                if not any(d.serving for d in docs):
                    log.warning("metrics port %d is held by a process that is not one of these workers; "
                                "nobody serves their pools there: %s", port, e)
            return
        self._standby = None
        self.poller.cancel(_TAKEOVER_JOB)
        log.info("serving metrics for every worker port=%d", self._http.port)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``): become a worker of its own, never a copy of the parent."""
        threaded = self.poller.after_fork()
        http, self._http = self._http, None
        standby, self._standby = self._standby, None
        publisher, self.collector.publisher = self.collector.publisher, None
        if http is not None:
            http.forget()
        if publisher is not None:
            publisher.forget()
        if not threaded:
            return  # polling had not started in the parent (or ran on its loop): start() comes later
        if http is not None:
            standby = (http.bind_host, http.port, http.web_config)
        if standby is not None:
            self.start_http_server(standby[1], standby[0], standby[2])
        else:
            self.start()

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this exporter's registry, to mount e.g. at ``/metrics``."""
        return exposition.asgi_app(self._text, make_asgi_app(self.registry))

    def wsgi_app(self) -> Callable[..., Any]:
        """A WSGI app serving this exporter's registry."""
        return exposition.wsgi_app(self._text, make_wsgi_app(self.registry))

    def _text(self) -> str | None:
        # Several workers: the pre-rendered fast path, unless the registry holds other collectors too.
        return self.collector.text() if self._own_registry else None

    def poll_now(self) -> None:
        """Poll every source once, synchronously (sync sources only); handy in tests and scripts."""
        for state in list(self.poller.states.values()):
            self.poller.poll_sync(state)

    def stop(self) -> None:
        """Stop the jobs, the HTTP server and its thread; registered pools are restored."""
        self.poller.shutdown()
        self.poller.cancel(_PUBLISH_JOB)
        self.poller.cancel(_TAKEOVER_JOB)
        self._standby = None
        publisher, self.collector.publisher = self.collector.publisher, None
        if publisher is not None and publisher.pid == os.getpid():
            publisher.close()
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
        for name in list(self.poller.states):
            self.unregister(name)
        self.poller.close_loop()

    async def astop(self) -> None:
        """``stop()`` for async hosts: the scheduler stops on its own loop, the rest off it."""
        import asyncio

        self.poller.shutdown()  # an AsyncIOScheduler must be stopped from its loop's thread
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE: weakref.WeakSet[Exporter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for exporter in list(_LIVE):
        try:
            exporter._after_fork()
        except Exception as e:  # a fork hook that raises would only print; say it in one line
            log.warning("exporter could not restart after fork: %s", e)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Pool kinds: the classes a source watches (module, class name) and where the source lives. A class is looked
# up only if the app has imported its module already, so watching psycopg pools never imports SQLAlchemy.
_KINDS: tuple[tuple[tuple[tuple[str, str], ...], str, str], ...] = (
    ((("psycopg_pool.base", "BasePool"),), ".sources.psycopg", "PsycopgPoolSource"),
    ((("sqlalchemy.engine", "Engine"), ("sqlalchemy.pool", "Pool"), ("sqlalchemy.ext.asyncio", "AsyncEngine")),
     ".sources.sqlalchemy", "SQLAlchemySource"),
)


def _source_class(target: Any) -> Any:
    """The source class for a pool (subclasses included), or ``None`` when it is no pool we know."""
    for classes, module, name in _KINDS:
        for class_module, class_name in classes:
            loaded = sys.modules.get(class_module)
            cls = getattr(loaded, class_name, None) if loaded is not None else None
            if cls is not None and isinstance(target, cls):
                return getattr(importlib.import_module(module, __package__), name)
    return None


def _is_pool(target: Any) -> bool:
    return _source_class(target) is not None


def _source_for(name: str, target: Any, interval: float, recorder: Recorder | None) -> Source:
    source_class = _source_class(target)
    if source_class is None:
        raise TypeError(f"pool {name!r}: don't know how to watch a {type(target).__module__}."
                        f"{type(target).__name__}; pass an Engine, AsyncEngine, Pool or psycopg_pool pool")
    return source_class(name, target, interval=interval, recorder=recorder)
