"""The in-process API: register pools by name, then serve, mount or hand over the collector."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, make_asgi_app, make_wsgi_app

from .collector import DbpoolCollector
from .httpserver import RunningServer, serve_wsgi
from .poller import Poller
from .recorder import HOLD_BUCKETS, WAIT_BUCKETS, Recorder
from .sources.base import Source
from .webconfig import WebConfig


class Exporter:
    """Monitors pools (and, later, servers) and exposes them to Prometheus.

    Nothing runs until ``start()``/``start_http_server()``; the collector lives in ``registry``
    (a fresh one unless you pass yours, e.g. ``prometheus_client.REGISTRY``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.poller = Poller()
        self.collector = DbpoolCollector(self.poller)
        self.registry.register(self.collector)
        self._http: RunningServer | None = None

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
        """Start polling: on the running asyncio loop if called from one, else in a thread."""
        self.poller.start()
        return self

    def start_http_server(
        self, port: int, addr: str = "127.0.0.1", web_config: WebConfig | None = None
    ) -> Exporter:
        """Start polling and serve ``/metrics`` on ``addr:port`` from daemon threads.

        ``web_config`` (from ``load_web_config(path)``, the exporter-toolkit format) adds TLS and
        basic auth; port 0 picks a free port (see ``http_port``).
        """
        if self._http is None:
            self._http = serve_wsgi(self.wsgi_app(), addr, port, web_config)
        return self.start()

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http else None

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this exporter's registry, to mount e.g. at ``/metrics``."""
        return make_asgi_app(self.registry)

    def wsgi_app(self) -> Callable[..., Any]:
        """A WSGI app serving this exporter's registry."""
        return make_wsgi_app(self.registry)

    def poll_now(self) -> None:
        """Poll every source once, synchronously (sync sources only); handy in tests and scripts."""
        for state in list(self.poller.states.values()):
            self.poller.poll_sync(state)

    def stop(self) -> None:
        """Stop the jobs, the HTTP server and its thread; registered pools are restored."""
        self.poller.shutdown()
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


def _is_pool(target: Any) -> bool:
    module = type(target).__module__
    return module.startswith(("sqlalchemy", "psycopg_pool"))


def _source_for(name: str, target: Any, interval: float, recorder: Recorder | None) -> Source:
    module = type(target).__module__
    if module.startswith("psycopg_pool"):
        from .sources.psycopg import PsycopgPoolSource

        return PsycopgPoolSource(name, target, interval=interval, recorder=recorder)
    if module.startswith("sqlalchemy"):
        from .sources.sqlalchemy import SQLAlchemySource

        return SQLAlchemySource(name, target, interval=interval, recorder=recorder)
    raise TypeError(f"pool {name!r}: don't know how to watch a {type(target).__module__}."
                    f"{type(target).__name__}; pass an Engine, AsyncEngine, Pool or psycopg_pool pool")
