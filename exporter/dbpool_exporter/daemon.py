"""``dbpool-exporter run``: the core Exporter on an asyncio loop, an HTTP thread, signals and reloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from . import __version__, logs, metrics, workers
from .config import Config, ConfigError, ServerConfig
from .exporter import Exporter
from .exposition import Exposition, labels_text, render
from .families import Families
from .sources.base import Source
from .sources.postgres import connect_params
from .web import SourceRow, WebServer
from .webconfig import WebConfig, WebConfigError

log = logging.getLogger("dbpool_exporter.daemon")

# How long shutdown waits for connections to close politely before aborting them.
CLOSE_GRACE = 0.5
# How long a reload may spend reading its files, and how many given-up reads may still hang around.
RELOAD_TIMEOUT = 5.0
MAX_STUCK_READERS = 8


class _Served:
    """What ``/metrics`` serves: the core collector's families plus the daemon's own, with const labels."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = dict(self.daemon.config.const_labels)
        for family in self.collect_plain():
            if labels:
                # Const labels go last so they can never overwrite one the exporter set (config forbids clashes).
                family.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
            yield family

    def collect_plain(self) -> Iterator[Metric]:
        """Without const labels: the sources' families and the daemon's own."""
        d = self.daemon
        own = Families()
        own.gauge(metrics.EXPORTER_BUILD_INFO, {"version": __version__}, 1.0)
        own.gauge(metrics.EXPORTER_RELOAD_OK, {}, 1.0 if d.reload_ok else 0.0)
        own.gauge(metrics.EXPORTER_RELOAD_AT, {}, d.reload_success_at)
        yield from d.exporter.registry.collect()
        yield from own

    def text(self) -> str | None:
        """With a workers directory (the sidecar), everything plus the pools the app's workers publish."""
        config = self.daemon.config
        if not config.workers_dir:
            return None  # prometheus_client's own app: content negotiation, gzip
        out = Exposition()
        labels = dict(config.const_labels)
        out.add(render(list(self.collect_plain())), labels_text(labels))
        workers.add_workers(out, Path(config.workers_dir), labels=labels)
        return out.text()


def _secrets(config: Config) -> list[str]:
    out = []
    for server in config.sources:
        out.append(server.dsn)
        with contextlib.suppress(ValueError):
            asyncpg_dsn, params = connect_params(server.dsn)
            out += [asyncpg_dsn, params.get("password", "")]
    return out


class Daemon:
    """Owns the sources of one config; ``run()`` until SIGTERM/SIGINT, reloading on SIGHUP."""

    def __init__(self, config: Config, loader: Callable[[], Config], *, listen_address: str = ":9188",
                 telemetry_path: str = "/metrics", web_config_loader: Callable[[], WebConfig | None] | None = None
                 ) -> None:
        self.config = config
        self.loader = loader
        self.exporter = Exporter()
        # Polls are timers on our own loop: APScheduler (and the tzlocal and multiprocessing it loads, 2.4 MB
        # resident) earns its keep in host applications, which may have no loop, not here.
        self.exporter.poller.on_loop = True
        self.registry = CollectorRegistry(auto_describe=False)
        served = _Served(self)
        self.registry.register(served)
        self.reload_ok = True
        self.reload_success_at = time.time()
        self.ready = False
        self._known_secrets: set[str] = set(_secrets(config))
        logs.set_secrets(self._known_secrets)
        # Bound here, before the loop starts, so a taken port is a one-line startup error.
        self.web_config_loader = web_config_loader or (lambda: None)
        self.web = WebServer(listen_address, telemetry_path, self.registry, sources=self.rows,
                             ready=lambda: self.ready, version=__version__, web_config=self.web_config_loader(),
                             text=served.text)
        self._stop: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self._reload_seq = self._reload_done = 0
        self._stuck_readers = 0

    # --- state for the web thread ---------------------------------------------------------------
    def rows(self) -> list[SourceRow]:
        return [SourceRow(name, st.source.kind, st.up, st.last_success, st.last_error)
                for name, st in sorted(self.exporter.poller.states.items())]

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for server in self.config.sources:  # servers, then pgbouncers
            self.exporter.register(server.name, server.source())
        self.exporter.start()  # inside the running loop: the poller's timers need it
        host, port = self.web.address
        log.info("listening address=%s:%d telemetry_path=%s version=%s", f"[{host}]" if ":" in host else host,
                 port, self.web.telemetry_path, __version__)
        log.info("config loaded from=%s %s", self.config.origin or "-", self.config.summary())
        first_round = loop.create_task(self._first_round())
        await self._stop.wait()
        first_round.cancel()
        for task in list(self._reloads):
            task.cancel()  # a reload waiting on a stuck read must not hold up the exit
        log.info("shutting down")
        await self.shutdown()
        return 0

    async def _first_round(self) -> None:
        # Ready once every source has been polled (successfully or not) at least once.
        while not all(st.polls > 0 for st in self.exporter.poller.states.values()):
            await asyncio.sleep(0.05)
        self.ready = True
        log.info("ready sources=%d up=%d", len(self.exporter.poller.states),
                 sum(st.up for st in self.exporter.poller.states.values()))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def shutdown(self) -> None:
        self.exporter.poller.shutdown()
        sources = [st.source for st in self.exporter.poller.states.values()]
        await self._close(sources)
        self.exporter.stop()  # unregisters; the connections are closed already
        await asyncio.to_thread(self.web.stop)

    @staticmethod
    async def _close(sources: Sequence[Source]) -> None:
        closers = [s.aclose() for s in sources if hasattr(s, "aclose")]
        if closers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closers, return_exceptions=True), CLOSE_GRACE)
        for source in sources:
            with contextlib.suppress(Exception):
                source.close()  # aborts whatever did not close in time

    # --- SIGHUP ---------------------------------------------------------------------------------
    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """Re-read the config; a bad one keeps the old config running and says why.

        Reading runs in its own thread, given up after ``RELOAD_TIMEOUT`` (a ``dsn_file`` that is a FIFO or
        on a hung mount blocks forever), so a stuck read never holds up a later reload or shutdown.
        """
        self._reload_seq += 1
        seq = self._reload_seq
        try:
            new, web_config = await self._read_configs()
        except Exception as e:  # anything at all (a MemoryError too): the old config stays, and says so
            self._reload_failed(seq, e)
            return False
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            if seq < self._reload_done:
                log.info("config reload superseded by a later one; not applied")
                return False
            try:
                self.web.set_web_config(web_config)  # certificates and users re-read
                self._known_secrets |= set(_secrets(new))
                logs.set_secrets(self._known_secrets)
                await self._apply(new)
            except Exception as e:
                self._reload_failed(seq, e)
                return False
            self._reload_done = seq
            self.reload_ok, self.reload_success_at = True, time.time()
            log.info("config reloaded from=%s %s", new.origin or "-", new.summary())
            return True

    async def _read_configs(self) -> tuple[Config, WebConfig | None]:
        if self._stuck_readers >= MAX_STUCK_READERS:
            raise TimeoutError(f"{self._stuck_readers} earlier reloads are still stuck reading their files; "
                               f"fix the file (a FIFO, a hung mount?) and send SIGHUP again")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[Config, WebConfig | None]] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            self._stuck_readers -= 1
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)

        def read() -> None:
            result, error = None, None
            try:
                result = (self.loader(), self.web_config_loader())
            except BaseException as e:  # handed to the loop, whatever it is
                error = e
            with contextlib.suppress(RuntimeError):  # the loop closed while we were stuck: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        # A daemon thread, not asyncio.to_thread: the default executor is joined when the loop closes,
        # so one read stuck forever would keep the process from exiting.
        self._stuck_readers += 1
        threading.Thread(target=read, name="dbpool-exporter-reload", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), RELOAD_TIMEOUT)
        except asyncio.TimeoutError:
            raise TimeoutError(f"reading the config files took longer than {RELOAD_TIMEOUT:g} s "
                               f"(a FIFO or a hung mount?); gave up") from None

    def _reload_failed(self, seq: int, e: Exception) -> None:
        if seq < self._reload_done:  # a later reload has already succeeded: this outcome is stale
            log.info("an earlier config reload failed after a later one succeeded; nothing changed")
            return
        self.reload_ok = False
        if isinstance(e, ConfigError):
            for problem in e.problems:
                log.error("config reload failed, keeping the previous config: %s", problem)
        elif isinstance(e, (WebConfigError, ValueError, TimeoutError)):
            log.error("config reload failed, keeping the previous config: %s", e)
        else:
            log.error("config reload failed, keeping the previous config: %s", f"{type(e).__name__}: {e}")

    async def _apply(self, new: Config) -> None:
        old: dict[str, ServerConfig] = {s.name: s for s in self.config.sources}
        wanted: dict[str, ServerConfig] = {s.name: s for s in new.sources}
        # Unchanged servers keep their connection and history; changed ones (a rotated password too) restart.
        gone = [name for name, cfg in old.items() if wanted.get(name) != cfg]
        removed = []
        for name in gone:
            with contextlib.suppress(KeyError):
                removed.append(self.exporter.poller.remove(name))
        await self._close(removed)
        for name, cfg in wanted.items():
            if old.get(name) != cfg:
                self.exporter.register(name, cfg.source())
        self.config = new
