"""A throwaway PostgreSQL with PgBouncer in front, a daemon watching both, and app pools: for budget and alert tests."""

from __future__ import annotations

from pathlib import Path

import psycopg
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, text

from bouncer import Bouncer
from daemonproc import DaemonProcess, clean_env
from dbpool_exporter import Exporter
from dbpool_exporter.throwaway import PgCluster, free_port

USERS = {"admin": "admin-Secret-1", "stats": "stats-Secret-2", "app": "app-Secret-3", "etl": "etl-Secret-4"}


class Setup:
    """One PgBouncer in front of the cluster, a daemon watching both, and app pools served by exporters."""

    def __init__(self, cluster: PgCluster, tmp_path: Path) -> None:
        self.cluster, self.tmp_path = cluster, tmp_path
        self.postgres = f"127.0.0.1:{cluster.port}"
        self.bouncer: Bouncer | None = None
        self.daemon: DaemonProcess | None = None
        self.exporters: list[Exporter] = []
        self.engines: list[Engine] = []

    def start(self, databases: dict[str, str], **settings: str) -> Bouncer:
        target = f"host=127.0.0.1 port={self.cluster.port} dbname=postgres"
        self.bouncer = Bouncer({name: f"{target} {extra}" for name, extra in databases.items()}, USERS,
                               **settings).start()
        config = ("defaults: {interval: 0.3, backoff_max: 1}\n"
                  f"servers:\n  - name: pg\n    dsn: 'postgresql://postgres@{self.postgres}/postgres'\n"
                  "pgbouncers:\n  - name: pgb\n    dsn_env: PGB_DSN\n")
        self.daemon = DaemonProcess(self.tmp_path, config, env=clean_env(PGB_DSN=self.bouncer.dsn("stats")))
        self.daemon.wait_ready()
        self.daemon.wait_for(lambda: self.daemon.value("dbpool_source_up", source="pgb") == 1  # type: ignore[union-attr]
                             and self.daemon.value("dbpool_source_up", source="pg") == 1, "both sources up")
        return self.bouncer

    @property
    def daemon_url(self) -> str:
        assert self.daemon is not None
        return f"http://127.0.0.1:{self.daemon.port}/metrics"

    @property
    def usable(self) -> int:
        assert self.daemon is not None
        value = self.daemon.value("dbpool_server_usable_connections", server=self.postgres)
        assert value is not None
        return int(value)

    def engine(self, user: str, database: str, *, connect: bool = True, **pool: int) -> Engine:
        assert self.bouncer is not None
        url = self.bouncer.dsn(user, database).replace("postgresql://", "postgresql+psycopg://")
        engine = create_engine(url, **pool)
        self.engines.append(engine)
        if connect:  # PgBouncer opens a database/user pool at its first client
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        return engine

    def serve(self, *sources: object, **pools: Engine) -> str:
        """A real exporter on a free port serving these app pools (and sources); returns its URL."""
        exporter = Exporter(CollectorRegistry())
        self.exporters.append(exporter)
        for name, target in pools.items():
            exporter.register(name, target)
        for source in sources:
            exporter.register(source.name, source)  # type: ignore[attr-defined]
        exporter.poll_now()
        port = free_port()
        exporter.start_http_server(port)
        return f"http://127.0.0.1:{port}/metrics"

    def reload(self, databases: dict[str, str] | None = None, **settings: str) -> None:
        """Rewrite pgbouncer.ini and RELOAD through the admin console."""
        assert self.bouncer is not None
        if databases is not None:
            target = f"host=127.0.0.1 port={self.cluster.port} dbname=postgres"
            self.bouncer.databases = {name: f"{target} {extra}" for name, extra in databases.items()}
        self.bouncer.settings.update(settings)
        self.bouncer.write()
        with psycopg.connect(self.bouncer.dsn("admin"), autocommit=True, prepare_threshold=None) as conn:
            conn.execute("RELOAD")

    def wait_for(self, name: str, value: float, **labels: str) -> None:
        assert self.daemon is not None
        self.daemon.wait_for(lambda: self.daemon.value(name, **labels) == value,  # type: ignore[union-attr]
                             f"{name}{labels} == {value}")

    def close(self) -> None:
        for exporter in self.exporters:
            exporter.stop()
        for engine in self.engines:
            engine.dispose()
        if self.daemon is not None:
            self.daemon.stop()
        if self.bouncer is not None:
            self.bouncer.destroy()
