"""`dbpool-exporter budget` against real exporters serving real pools on a real server."""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from dbpool_exporter import Exporter, budget, metrics
from dbpool_exporter.families import Families
from dbpool_exporter.redact import from_conninfo
from dbpool_exporter.throwaway import free_port


@dataclass(frozen=True)
class _Capacity:
    server: str
    values: dict[str, float]

    def emit(self, name: str, out: Families) -> None:
        for metric, value in self.values.items():
            out.gauge(metrics.get(metric), {"server": self.server}, value)


class ServerSettings:
    """A minimal server source for this test: the real server's capacity, as the server source exports it."""

    kind = "postgres"
    interval = 1.0

    def __init__(self, name: str, dsn: str, metrics: tuple[str, ...]) -> None:
        self.name, self.dsn, self.metrics = name, dsn, metrics

    def poll(self) -> _Capacity:
        with psycopg.connect(self.dsn) as conn:
            max_connections, reserved = conn.execute(
                "SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int"
                " + coalesce(current_setting('reserved_connections', true)::int, 0)").fetchone()  # type: ignore[misc]
        values = {"dbpool_server_max_connections": max_connections,
                  "dbpool_server_reserved_connections": reserved,
                  "dbpool_server_usable_connections": max_connections - reserved}
        server = from_conninfo(self.dsn)[0]
        return _Capacity(server or "", {k: v for k, v in values.items() if k in self.metrics})

    def close(self) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start an in-process exporter on a free port with the given targets; returns its URL."""
    exporters: list[Exporter] = []
    closers: list[Callable[[], None]] = []

    def start(**targets: object) -> str:
        exporter = Exporter()
        exporters.append(exporter)
        for name, target in targets.items():
            exporter.register(name, target)
            close = getattr(target, "dispose", None) or getattr(target, "close", None)
            if close is not None:
                closers.append(close)
        exporter.poll_now()
        port = free_port()
        exporter.start_http_server(port)
        return f"http://127.0.0.1:{port}/metrics"

    yield start
    for exporter in exporters:
        exporter.stop()
    for close in closers:
        close()


@pytest.fixture
def server(pg_dsn: str) -> str:
    label = from_conninfo(pg_dsn)[0]
    assert label
    return label


def _budget(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = budget.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _row(out: str, first: str) -> list[str]:
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith(first + " ")]
    assert len(rows) == 1, out
    return rows[0]


def _seed_pools(sync_url: str, pg_dsn: str) -> tuple[object, ConnectionPool]:
    # The seed's two pools scaled down: SQLAlchemy 6+12 and psycopg max 4.
    engine = create_engine(sync_url, pool_size=6, max_overflow=12)
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=4, open=True)
    return engine, pool


def test_pools_of_two_exporters_overcommit_a_server(serve: Callable[..., str], capsys: pytest.CaptureFixture[str],
                                                   sync_url: str, pg_dsn: str, server: str) -> None:
    engine, pool = _seed_pools(sync_url, pg_dsn)
    app_url, worker_url = serve(app=engine), serve(checkpointer=pool)

    rc, out, err = _budget(capsys, app_url, worker_url, "--server-max", f"{server}=20")
    assert rc == 1 and err == ""
    app_instance, worker_instance = (u.removeprefix("http://").removesuffix("/metrics") for u in (app_url, worker_url))
    assert _row(out, app_instance) == [app_instance, "-", "app", "sqlalchemy", server, "18"]
    assert _row(out, worker_instance) == [worker_instance, "-", "checkpointer", "psycopg", server, "4"]
    assert _row(out, server) == [server, "2", "22", "20 (--server-max)", "-2", "OVERCOMMIT"]

    # Room enough: exit 0; host:port is accepted as a URL.
    rc, out, _ = _budget(capsys, app_instance, worker_instance, "--server-max", f"{server}=30")
    assert rc == 0
    assert _row(out, server) == [server, "2", "22", "30 (--server-max)", "8", "ok"]

    # No capacity known anywhere: say so, don't guess.
    rc, out, _ = _budget(capsys, app_url, worker_url)
    assert rc == 0
    assert _row(out, server)[:5] == [server, "2", "22", "unknown", "unknown"]
    assert "--server-max" in _row(out, server)[5]


def test_replicas_with_the_same_pool_names_add_up(serve: Callable[..., str], capsys: pytest.CaptureFixture[str],
                                                  sync_url: str, pg_dsn: str, server: str) -> None:
    replicas = [serve(app=create_engine(sync_url, pool_size=6, max_overflow=12)) for _ in range(2)]
    rc, out, _ = _budget(capsys, *replicas, replicas[0], "--server-max", f"{server}=40")  # a repeated URL counts once
    assert rc == 0
    assert _row(out, server) == [server, "2", "36", "40 (--server-max)", "4", "ok"]


@pytest.mark.parametrize("exposed", [
    ("dbpool_server_usable_connections", "dbpool_server_max_connections", "dbpool_server_reserved_connections"),
    ("dbpool_server_max_connections", "dbpool_server_reserved_connections"),  # usable = max - reserved
])
def test_capacity_comes_from_a_server_source(serve: Callable[..., str], capsys: pytest.CaptureFixture[str],
                                             sync_url: str, pg_dsn: str, server: str,
                                             exposed: tuple[str, ...]) -> None:
    with psycopg.connect(pg_dsn) as conn:
        max_connections, reserved = conn.execute(
            "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int"
            " + coalesce(current_setting('reserved_connections', true)::int, 0)").fetchone()  # type: ignore[misc]
    engine, pool = _seed_pools(sync_url, pg_dsn)
    app_url = serve(app=engine, checkpointer=pool)
    daemon_url = serve(server=ServerSettings("server", pg_dsn, exposed))
    usable = max_connections - reserved

    rc, out, _ = _budget(capsys, app_url, daemon_url)
    assert _row(out, server) == [server, "2", "22", f"{usable} (exporter)", f"{usable - 22}",
                                 "ok" if usable >= 22 else "OVERCOMMIT"]
    assert rc == (0 if usable >= 22 else 1)
    # The flag beats what the exporter reports.
    rc, out, _ = _budget(capsys, app_url, daemon_url, "--server-max", f"{server}=21")
    assert rc == 1 and _row(out, server)[3:] == ["21 (--server-max)", "-1", "OVERCOMMIT"]


def test_an_unbounded_pool_overcommits_any_known_capacity(serve: Callable[..., str],
                                                          capsys: pytest.CaptureFixture[str],
                                                          sync_url: str, server: str) -> None:
    url = serve(app=create_engine(sync_url, poolclass=NullPool))
    rc, out, _ = _budget(capsys, url, "--server-max", f"{server}=1000")
    assert rc == 1
    assert _row(out, server) == [server, "1", "unbounded", "1000 (--server-max)", "unbounded", "OVERCOMMIT"]


class _Html(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!DOCTYPE html>\n<html><body>not metrics</body></html>\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def html_url() -> Iterator[str]:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Html)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_bad_input_is_one_line_and_exit_2(serve: Callable[..., str], capsys: pytest.CaptureFixture[str],
                                          html_url: str) -> None:
    closed = free_port()
    empty = serve()  # an exporter with nothing registered has no dbpool_* metrics
    cases = {
        (f"127.0.0.1:{closed}",): f"cannot fetch http://127.0.0.1:{closed}/metrics: ",
        (empty,): "no dbpool_* metrics there",
        (html_url,): "not a Prometheus text exposition",
        (empty, "--server-max", "10.0.0.5:5432"): "expected SERVER=N",
        (empty, "--server-max", "10.0.0.5:5432=lots"): "is not a whole number",
        ("ftp://example.invalid/metrics",): "not an http(s) URL",
        ("http://user:s3cret@127.0.0.1:1/metrics",): "cannot fetch http://user:***@127.0.0.1:1/metrics",
    }
    for argv, message in cases.items():
        rc, out, err = _budget(capsys, *argv)
        assert rc == 2 and out == "", (argv, out)
        assert len(err.splitlines()) == 1 and message in err and "s3cret" not in err, (argv, err)


BROKEN_CAPACITIES = """\
dbpool_pool_info{pool="app",kind="sqlalchemy",server="db:5432",database="app"} 1
dbpool_max_connections{pool="app",kind="sqlalchemy"} 18
dbpool_pool_info{pool="web",kind="sqlalchemy",server="pgb:6432",database="app"} 1
dbpool_max_connections{pool="web",kind="sqlalchemy"} 18
dbpool_server_usable_connections{server="db:5432"} NaN
dbpool_pgbouncer_max_client_connections{pgbouncer="pgb:6432"} +Inf
"""


def test_non_finite_capacities_are_unknown_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(_Html):
        def do_GET(self) -> None:
            body = BROKEN_CAPACITIES.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Broken)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        rc, out, err = _budget(capsys, f"127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert rc == 0 and err == "", err
    assert _row(out, "db:5432")[3:5] == ["unknown", "unknown"]
    assert _row(out, "pgb:6432")[3:5] == ["unknown", "unknown"]
