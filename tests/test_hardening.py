"""Hardening round 2 (issue 12): each test reproduces one break found by probing, on the real daemon or library."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from procs import cpu_seconds, slow_clients

from daemonproc import DaemonProcess, clean_env, exporter_command
from dbpool_exporter import Exporter
from dbpool_exporter.httpserver import serve_wsgi
from dbpool_exporter.sources.postgres import OTHER, build_snapshot
from dbpool_exporter.throwaway import PgCluster
from dbpool_exporter.webconfig import load_web_config
from webtls import PASSWORD, App, basic, client_ctx, request, tls_block, users_block, write

pytestmark = pytest.mark.timeout(180)


def _limited(tmp_path: Path, config: str | None, *, as_bytes: int | None = None, nofile: int | None = None,
             args: tuple[str, ...] = ()) -> DaemonProcess:
    """A daemon under resource limits (as systemd or a container would set them)."""

    def limits() -> None:
        if as_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    original = subprocess.Popen
    subprocess.Popen = functools.partial(original, preexec_fn=limits)  # type: ignore[misc]
    try:
        return DaemonProcess(tmp_path, config, args=args)
    finally:
        subprocess.Popen = original  # type: ignore[misc]


def _reload_ok(d: DaemonProcess) -> float | None:
    return d.value("dbpool_exporter_config_last_reload_successful")


def _dsn_file_config(path: Path | str) -> str:
    return f"servers:\n  - name: pg\n    dsn_file: {path}\n    interval: 0.5\n"


def _one_logfmt_line_each(log: str) -> None:
    for line in log.splitlines():
        assert line.startswith("ts="), f"not a log line from the formatter: {line!r}\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


# --- 1. a stuck SIGHUP reload ----------------------------------------------------------------------

def test_stuck_reload_fails_in_bounded_time_and_never_blocks(tmp_path: Path, pg_dsn: str,
                                                             daemons: list[DaemonProcess]) -> None:
    good = tmp_path / "dsn"
    good.write_text(pg_dsn + "\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer, ever: open() blocks like a hung secret mount
    d = DaemonProcess(tmp_path, _dsn_file_config(good))
    daemons.append(d)
    d.wait_for(lambda: d.value("dbpool_source_up", source="pg") == 1, "pg up")

    d.write_config(_dsn_file_config(fifo))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: _reload_ok(d) == 0, "the stuck reload reported as failed")
    assert "config reload failed" in d.log()
    d.proc.send_signal(signal.SIGHUP)  # a second one while the first reader is still stuck

    d.write_config(_dsn_file_config(good).replace("0.5", "0.25"))
    d.wait_for(lambda: (d.proc.send_signal(signal.SIGHUP), time.sleep(0.5), _reload_ok(d) == 1)[-1],
               "a later good reload goes through")
    assert "config reloaded" in d.log()
    assert d.value("dbpool_source_up", source="pg") is not None
    code, took = d.stop(signal.SIGTERM, timeout=10)  # readers of the FIFO are still blocked
    print(f"SIGTERM with two readers stuck on a FIFO: exit {code} in {took * 1000:.0f} ms")
    assert code == 0
    _one_logfmt_line_each(d.log())


def test_sigterm_during_a_stuck_reload_exits(tmp_path: Path, pg_dsn: str, daemons: list[DaemonProcess]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    good = tmp_path / "dsn"
    good.write_text(pg_dsn)
    d = DaemonProcess(tmp_path, _dsn_file_config(good))
    daemons.append(d)
    d.wait_ready()
    d.write_config(_dsn_file_config(fifo))
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)  # the reload is now blocked in open()
    code, took = d.stop(signal.SIGTERM, timeout=10)
    print(f"SIGTERM during a stuck reload: exit {code} in {took * 1000:.0f} ms")
    assert code == 0
    assert "shutting down" in d.log()


# --- 2. unbounded config input ---------------------------------------------------------------------

def _check_config(path: str) -> subprocess.CompletedProcess[str]:
    def limit() -> None:  # today's code reads /dev/zero until memory runs out: keep that bounded
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([*exporter_command(), "check-config", path], capture_output=True, text=True, timeout=60,
                          env=clean_env(), preexec_fn=limit)


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom", "huge"])
def test_check_config_refuses_endless_and_huge_files(tmp_path: Path, source: str) -> None:
    if source == "huge":
        path = tmp_path / "huge.yml"
        with open(path, "w") as f:
            for _ in range(40_000):
                f.write("# " + "x" * 98 + "\n")  # 4 MB of comments
        source = str(path)
    result = _check_config(source)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "larger than" in result.stderr and "Traceback" not in result.stderr


def test_check_config_refuses_an_endless_dsn_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(_dsn_file_config("/dev/zero"))
    result = _check_config(str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "dsn_file" in result.stderr and "larger than" in result.stderr


def test_endless_web_config_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([*exporter_command(), "run", "--web.listen-address", "127.0.0.1:0", "--web.config.file",
                             "/dev/zero"], capture_output=True, text=True, timeout=60,
                            env=clean_env(DATA_SOURCE_NAME="postgresql://127.0.0.1/postgres"),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "larger than" in result.stderr, result.stderr[-2000:]


def test_reload_of_an_endless_dsn_file_is_reported_failed(tmp_path: Path, pg_dsn: str,
                                                          daemons: list[DaemonProcess]) -> None:
    good = tmp_path / "dsn"
    good.write_text(pg_dsn)
    d = _limited(tmp_path, _dsn_file_config(good), as_bytes=1 << 30)
    daemons.append(d)
    d.wait_ready()
    d.write_config(_dsn_file_config("/dev/zero"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: _reload_ok(d) == 0, "reload failed")
    assert "larger than" in d.log()
    _one_logfmt_line_each(d.log())


def test_any_reload_exception_is_reported_failed(pg_dsn: str) -> None:
    from dbpool_exporter.config import parse
    from dbpool_exporter.daemon import Daemon

    config = parse({"servers": [{"name": "pg", "dsn": pg_dsn}]}, env={})

    def broken() -> Any:
        raise RuntimeError("something nobody thought of")

    daemon = Daemon(config, broken, listen_address="127.0.0.1:0")
    try:
        assert asyncio.run(daemon.reload()) is False
        assert daemon.reload_ok is False
    finally:
        daemon.web.stop()


# --- 3. unregister() racing a running poll ----------------------------------------------------------

def test_unregister_restores_the_pool_for_good_under_load(sync_url: str) -> None:
    engine = sqlalchemy.create_engine(sync_url, pool_size=5, max_overflow=5, pool_timeout=10)
    pool = engine.pool
    baseline = {name: len(getattr(pool.dispatch, name)) for name in ("checkin", "detach", "checkout")}
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")

    def hooked() -> bool:
        return ("connect" in pool.__dict__ or "_return_conn" in pool.__dict__ or
                any(len(getattr(pool.dispatch, n)) != c for n, c in baseline.items()))

    workers = [threading.Thread(target=work, daemon=True) for _ in range(20)]
    for w in workers:
        w.start()
    exporter = Exporter().start()
    left_hooked = 0
    try:
        deadline = time.monotonic() + 30
        for i in range(300):  # noqa: B007 - reported below
            if time.monotonic() > deadline:
                break
            exporter.register("app", engine, interval=0.002)
            time.sleep(random.uniform(0, 0.004))
            exporter.unregister("app")
            time.sleep(0.002)  # a poll that was running finishes here
            left_hooked += hooked()
            if hooked():
                pool.__dict__.pop("connect", None)  # so the next cycles are counted on their own
                pool.__dict__.pop("_return_conn", None)
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
        exporter.stop()
    print(f"cycles that left hooks on the pool: {left_hooked} of {i + 1}")
    assert left_hooked == 0
    assert not hooked()
    engine.dispose()


# --- 4. TLS hang-ups ------------------------------------------------------------------------------

def test_tls_clients_hanging_up_never_print_a_traceback(tmp_path: Path, pki: Path, hashes: dict[str, str],
                                                        pg_dsn: str, daemons: list[DaemonProcess]) -> None:
    web = write(tmp_path, tls_block(pki) + users_block(hashes))
    d = DaemonProcess(tmp_path, f"servers:\n  - name: pg\n    dsn: '{pg_dsn}'\n",
                      args=("--web.config.file", web))
    daemons.append(d)
    ctx = client_ctx(pki)
    ctx.check_hostname = False
    auth = basic("alice", PASSWORD).encode()

    def scrape() -> int:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s, \
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\n\r\n")
            return int(t.recv(64).split()[1])

    d.wait_for(lambda: scrape() == 200, "TLS scrapes answered")
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        headers = b"Authorization: " + auth + b"\r\n" if i % 2 else b""
        if i % 4 < 2:
            t.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")  # then never read
        else:
            t.sendall(b"GET /metr")  # hang up mid-request
        if i % 8 < 4:
            t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        t.close()  # no close_notify either way, like a process that went away
    time.sleep(1)
    assert scrape() == 200
    _one_logfmt_line_each(d.log())


# --- 5. file-descriptor exhaustion ------------------------------------------------------------------

def test_slow_clients_cannot_exhaust_file_descriptors(tmp_path: Path, pg_dsn: str,
                                                      daemons: list[DaemonProcess]) -> None:
    d = _limited(tmp_path, f"servers:\n  - name: pg\n    dsn: '{pg_dsn}'\n", nofile=128)
    daemons.append(d)
    d.wait_ready()
    stop, opened = threading.Event(), []
    slow = threading.Thread(target=slow_clients, args=(d.port, 300, stop, opened), daemon=True)
    slow.start()
    try:
        time.sleep(3)
        cpu_before, wall_before = cpu_seconds(d.proc.pid), time.monotonic()
        statuses = []
        for _ in range(10):
            statuses.append(d.get("/metrics")[0])
            time.sleep(0.2)
        cpu = (cpu_seconds(d.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
    finally:
        stop.set()
        slow.join(timeout=10)
        for s in opened:
            s.close()
    print(f"{len(opened)} slow clients connected; scrapes {statuses}; daemon CPU {cpu:.0%}")
    assert statuses == [200] * 10
    assert cpu < 0.5, "the accept loop spins"
    log = d.log()
    warnings = [line for line in log.splitlines() if "level=warn" in line and "too many connections" in line]
    assert len(warnings) == 1, log[-3000:]
    _one_logfmt_line_each(log)


def test_in_process_server_bounds_connections_too() -> None:
    server = serve_wsgi(App(), "127.0.0.1", 0, max_connections=8)
    opened: list[socket.socket] = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            opened.append(s)
        assert request(server)[0] == 200
        time.sleep(0.5)
        held = _established(server.port)
        print(f"40 slow clients: server holds {held}")
        assert held <= 8
    finally:
        for s in opened:
            s.close()
        server.shutdown()


def test_clients_that_never_read_their_answer_cannot_lock_out_scrapers() -> None:
    big = b"x" * (16 << 20)  # far more than the socket buffers: the answering thread blocks in send()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big if environ["PATH_INFO"] == "/big" else b"ok\n"]

    server = serve_wsgi(app, "127.0.0.1", 0, max_connections=8)  # type: ignore[arg-type]
    opened: list[socket.socket] = []
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
            opened.append(s)
        time.sleep(0.5)
        assert request(server, "/metrics")[0] == 200
    finally:
        for s in opened:
            s.close()
        server.shutdown()


_EMFILE_CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
from dbpool_exporter.httpserver import serve_wsgi
from webtls import App
server = serve_wsgi(App(), "127.0.0.1", 0, max_connections=10**6)  # a bound too high to help: EMFILE
print(server.port, flush=True)
time.sleep(60)
"""


def test_out_of_descriptors_does_not_spin_the_accept_loop() -> None:
    child = subprocess.Popen([sys.executable, "-c", _EMFILE_CHILD], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent)
    opened: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(100):  # more than the descriptors left: accept() fails with EMFILE
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            opened.append(s)
        time.sleep(1)
        cpu_before, wall_before = cpu_seconds(child.pid), time.monotonic()
        time.sleep(2)
        cpu = (cpu_seconds(child.pid) - cpu_before) / (time.monotonic() - wall_before)
        print(f"accept loop out of descriptors: CPU {cpu:.0%}")
        assert cpu < 0.5
        assert child.poll() is None
    finally:
        for s in opened:
            s.close()
        child.kill()
        child.wait(timeout=10)


def _established(port: int) -> int:
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    return len(out.splitlines())


def test_systemd_unit_raises_the_file_limit() -> None:
    unit = (Path(__file__).parent.parent / "deploy/systemd/dbpool-exporter.service").read_text()
    assert any(line.startswith("LimitNOFILE=") for line in unit.splitlines())


# --- the small ones --------------------------------------------------------------------------------

def test_listen_backlog_is_not_64() -> None:
    server = serve_wsgi(App(), "127.0.0.1", 0)
    try:
        out = subprocess.run(["ss", "-ltnH", f"( sport = :{server.port} )"], capture_output=True, text=True,
                             check=True, timeout=10).stdout
        backlog = int(out.split()[2])  # Send-Q of a listening socket is its backlog
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert backlog >= min(1024, somaxconn), out
    finally:
        server.shutdown()


def test_unauthenticated_clients_cannot_starve_the_scraper(tmp_path: Path, hashes: dict[str, str],
                                                            ) -> None:
    text = users_block({"alice": hashes["alice"]}) + "rate_limit:\n  interval: 1h\n  burst: 2\n"
    server = serve_wsgi(App(), "127.0.0.1", 0, load_web_config(write(tmp_path, text)))
    try:
        assert [request(server)[0] for _ in range(20)] == [401] * 20  # no credentials: cheap, not limited
        good = [("Authorization", basic("alice", PASSWORD))]
        assert [request(server, headers=good)[0] for _ in range(3)] == [200, 200, 429]
        bad = [("Authorization", basic("alice", "wrong"))]
        assert request(server, headers=bad)[0] == 429  # a wrong password costs a bcrypt: limited, like the toolkit
    finally:
        server.shutdown()


def test_server_header_reveals_no_versions(tmp_path: Path) -> None:
    server = serve_wsgi(App(), "127.0.0.1", 0)
    try:
        _, headers, _ = request(server)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GARBAGE\r\n\r\n")  # a 400 from send_error, not from the app
            error = s.recv(4096).decode()
        for text in (headers.get("Server", ""), error):
            assert "Python" not in text and "WSGIServer" not in text and "BaseHTTP" not in text, text
    finally:
        server.shutdown()


class _SlowSource:
    kind = "test"
    interval = 0.05

    def __init__(self) -> None:
        self.name = "slow"

    def poll(self) -> Any:
        time.sleep(0.3)
        raise RuntimeError("slow")

    def close(self) -> None:
        pass


def test_library_does_not_log_skipped_runs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with Exporter() as exporter:
        exporter.register("slow", _SlowSource()).start()
        time.sleep(1.5)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert not skipped, [r.getMessage() for r in skipped]


def test_an_application_named_other_stays_apart_from_the_folded_bucket() -> None:
    def row(app: str, n: int) -> dict[str, Any]:
        return {"database": "db", "user": "u", "application_name": app, "state": "idle", "connections": n,
                "oldest_xact_age": 0.0, "oldest_idle_xact_age": 0.0, "lock_waiting": 0}

    snap = build_snapshot("h:5432", [row("web", 10), row(OTHER, 7), row("a", 1), row("b", 1)], {},
                          max_label_values=2)
    counts: dict[str, int] = {}
    for _, _, app, _, n in snap.connections:
        counts[app] = counts.get(app, 0) + n
    assert counts[OTHER] == 2  # the two folded ones, and only them
    assert sum(n for app, n in counts.items() if app not in ("web", OTHER)) == 7  # the real "other", kept apart
    assert dict(snap.folded)["application_name"] == 2


def test_reconnects_do_not_pile_up_blocked_backends(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    with PgCluster() as cluster:
        dsn = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        holder = psycopg.connect(dsn)
        try:
            holder.execute("LOCK TABLE pg_database IN ACCESS EXCLUSIVE MODE")
            config = (f"servers:\n  - name: pg\n    dsn: '{dsn}'\n    interval: 0.2\n    backoff_max: 0.4\n"
                      f"    connect_timeout: 0.5\n")
            d = DaemonProcess(tmp_path, config)
            daemons.append(d)
            d.wait_for(lambda: (d.value("dbpool_source_errors_total", source="pg") or 0) >= 10, "failed polls")
            # Backends blocked in their start-up are not in pg_stat_activity yet (which joins pg_database
            # anyway): count the postmaster's children that say so in their process title.
            blocked = _backends_in_startup(cluster)
            print(f"backends blocked after {d.value('dbpool_source_errors_total', source='pg'):.0f} failed polls:"
                  f" {blocked}")
            assert blocked <= 1
            holder.rollback()
            d.wait_for(lambda: d.value("dbpool_source_up", source="pg") == 1, "up once the lock is gone")
        finally:
            holder.close()
            for d in daemons:
                d.stop()


def _backends_in_startup(cluster: PgCluster) -> int:
    postmaster = Path(cluster.datadir, "postmaster.pid").read_text().split()[0]
    count = 0
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[1] == postmaster and "startup" in (proc / "cmdline").read_text():
                count += 1
    return count


# --- passwords in process arguments -----------------------------------------------------------------

def test_demo_refuses_a_password_in_argv() -> None:
    result = subprocess.run([*exporter_command(), "demo", "--dsn", "postgresql://u:s3cret-pw@127.0.0.1:1/db"],
                            capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 2, result.stderr
    assert "DBPOOL_DEMO_DSN" in result.stderr and "s3cret-pw" not in result.stderr


def test_compose_puts_no_password_in_a_command() -> None:
    import yaml

    compose = yaml.safe_load((Path(__file__).parent.parent / "deploy/compose/compose.yaml").read_text())
    for name, service in compose["services"].items():
        command = " ".join(service.get("command") or [])
        assert "PASSWORD" not in command and "@" not in command, (name, command)
