"""Hostile input, for real: names chosen to break an exposition, config mistakes that would print a password,
and HTTP clients that send garbage or never finish their request.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from conftest import check_metrics
from daemonproc import SECRET, DaemonProcess, assert_no_secret, clean_env, exporter_command
from dbpool_exporter.throwaway import PgCluster

MAX_LABEL = 128  # README: "Label values are capped at 128 characters (non-printable characters become ?)"

# Set after connecting (a 10 kB name does not fit in the startup packet, whose limit is 10000 bytes).
HOSTILE_APPS = ['quo"te', "new\nline", "back\\slash", "tab\there", "ünïcødé ☃ 𝔘", "y" * 10_240, "",
                '{app="x"} 1', "</td><script>alert(1)</script>", "'; DROP TABLE t; --", "\x1b[31mred"]
HOSTILE_ROLES = ['ev"il', "new\nline", "back\\slash", "ünï☃-𝔘", "r" * 63, 'x{a="b"}']
HOSTILE_DATABASE = 'db "quoted"\n☃'


def documented(value: str) -> str:
    """The README's rule for label values."""
    return "".join(ch if ch.isprintable() else "?" for ch in value[:MAX_LABEL])


@dataclass
class Hostile:
    cluster: PgCluster
    truth: Counter[tuple[str, str, str]]  # (database, user, application_name) -> backends, as PostgreSQL has them


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    """A throwaway cluster with hostile role and database names, and a connection for each hostile name."""
    cluster = PgCluster()
    conns: list[psycopg.Connection] = []
    try:
        cluster.start()
        admin = psycopg.connect(cluster.dsn, autocommit=True)
        conns.append(admin)
        for role in HOSTILE_ROLES:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(HOSTILE_DATABASE)))
        for app in HOSTILE_APPS:
            conn = psycopg.connect(cluster.dsn, autocommit=True)
            conn.execute("SELECT set_config('application_name', %s, false)", (app,))
            conns.append(conn)
        for role in HOSTILE_ROLES:
            conns.append(psycopg.connect(cluster.dsn, user=role, autocommit=True, application_name="by-role"))
        conns.append(psycopg.connect(cluster.dsn, dbname=HOSTILE_DATABASE, autocommit=True,
                                     application_name="by-database"))
        # Busier names, so the cap has a clear top three to keep.
        for n, app in enumerate(["busy-a", "busy-b", "busy-c"]):
            for _ in range(6 - n):
                conns.append(psycopg.connect(cluster.dsn, autocommit=True, application_name=app))
        rows = admin.execute(
            "SELECT datname, usename, application_name, count(*)::int FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY 1, 2, 3").fetchall()
        truth: Counter[tuple[str, str, str]] = Counter({(d, u, a): n for d, u, a, n in rows})
        # The admin connection is idle by the time the exporter looks; it counts too.
        truth[("postgres", "postgres", "")] += 1
        print("PostgreSQL has these names:", sorted(truth))
        yield Hostile(cluster, truth)
    finally:
        for conn in conns:
            conn.close()
        cluster.destroy()


def _connections(text: str) -> Counter[tuple[str, str, str]]:
    out: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dbpool_server_connections":
                out[(s.labels["database"], s.labels["user"], s.labels["application_name"])] += int(s.value)
    return out


def _start(daemons: list[DaemonProcess], tmp_path: Path, dsn: str, max_label_values: int,
           name: str = "pg") -> DaemonProcess:
    workdir = tmp_path / f"daemon{len(daemons)}"
    workdir.mkdir()
    config = (f"servers:\n  - name: '{name}'\n    dsn: '{dsn}'\n    interval: 0.2\n"
              f"    max_label_values: {max_label_values}\n")
    d = DaemonProcess(workdir, config)
    daemons.append(d)
    return d


def test_hostile_names_exported_safely(tmp_path: Path, hostile: Hostile, promtool: str,
                                       daemons: list[DaemonProcess]) -> None:
    expected = Counter({tuple(documented(v) for v in key): n for key, n in hostile.truth.items()})
    d = _start(daemons, tmp_path, hostile.cluster.dsn, max_label_values=100)
    d.wait_for(lambda: _connections(d.metrics()) == expected, "every hostile name counted")
    text = d.metrics()
    check_metrics(promtool, text)
    for line in text.splitlines():
        assert line.isprintable(), f"a control character in the exposition: {line!r}"
    values = {v for key in _connections(text) for v in key}
    assert all(len(v) <= MAX_LABEL for v in values)
    # What PostgreSQL made of the names (v15 turns non-ASCII application_name bytes into '?' and truncates
    # at NAMEDATALEN-1 = 63 bytes); the exporter passes that on unchanged where printable.
    assert 'quo"te' in values and "back\\slash" in values and '{app="x"} 1' in values
    assert "y" * 63 in values and "y" * 64 not in values
    assert "new?line" in values  # PostgreSQL's own '?' for the newline
    assert 'ev"il' in values and "ünï☃-𝔘" in values and "new?line" in values and "r" * 63 in values
    assert 'db "quoted"?☃' in values  # a newline in a database name: the exporter's '?'
    assert d.value("dbpool_server_folded_values", label="application_name") == 0
    # The landing page shows none of these names, and escapes the server's own.
    assert "<script>" not in d.get("/")[1]
    assert "Traceback" not in d.log()
    assert d.stop()[0] == 0


def test_cap_folds_the_excess_into_other(tmp_path: Path, hostile: Hostile,
                                         daemons: list[DaemonProcess]) -> None:
    cap = 3
    d = _start(daemons, tmp_path, hostile.cluster.dsn, max_label_values=cap)
    total = sum(hostile.truth.values())
    d.wait_for(lambda: sum(_connections(d.metrics()).values()) == total, "every backend counted")
    counted = _connections(d.metrics())
    by_app: Counter[str] = Counter()
    by_user: Counter[str] = Counter()
    for (_, user, app), n in hostile.truth.items():
        by_app[documented(app)] += n
        by_user[documented(user)] += n
    kept_apps = {app for _, _, app in counted} - {"other"}
    kept_users = {user for _, user, _ in counted} - {"other"}
    assert len(kept_apps) == cap and len(kept_users) == cap, (kept_apps, kept_users)
    assert d.value("dbpool_server_folded_values", label="application_name") == len(by_app) - cap
    assert d.value("dbpool_server_folded_values", label="user") == len(by_user) - cap
    # Busiest first: nothing folded was busier than anything kept.
    assert min(by_app[a] for a in kept_apps) >= max(n for a, n in by_app.items() if a not in kept_apps)
    assert min(by_user[u] for u in kept_users) >= max(n for u, n in by_user.items() if u not in kept_users)
    # Nothing lost in the folding.
    folded = sum(n for (_, _, app), n in counted.items() if app == "other")
    assert folded == sum(n for a, n in by_app.items() if a not in kept_apps) > 0
    assert d.stop()[0] == 0


def test_hostile_server_name(tmp_path: Path, pg_dsn: str, promtool: str,
                             daemons: list[DaemonProcess]) -> None:
    """The config's own names reach the source label and the landing page."""
    name = 'ev"il\\ <script>alert(1)</script> {x="1"} ☃'
    d = _start(daemons, tmp_path, pg_dsn, max_label_values=5, name=name.replace("'", "''"))
    d.wait_for(lambda: d.value("dbpool_source_up", source=name) == 1, "up under the hostile name")
    check_metrics(promtool, d.metrics())
    page = d.get("/")[1]
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert d.stop()[0] == 0


# --- config mistakes that must not print the password -----------------------------------------------
SECRET_DSN = f"postgresql://monitor:{quote(SECRET, safe='')}@db.example:5432/postgres"
PASSWORD_ENV = "DBPOOL_FAULT_PASSWORD"


@pytest.mark.parametrize("config", [
    # The DSN where the name of a variable or a file belongs.
    pytest.param(f"servers: [{{name: a, dsn_env: '{SECRET_DSN}'}}]", id="dsn-in-dsn_env"),
    pytest.param(f"servers: [{{name: a, dsn_file: '{SECRET_DSN}'}}]", id="dsn-in-dsn_file"),
    # ${VAR} of the password variable instead of its name.
    pytest.param(f"servers: [{{name: a, dsn_env: '${{{PASSWORD_ENV}}}'}}]", id="password-variable-expanded"),
    # An indentation slip turns the DSN into a key.
    pytest.param(f"servers:\n  - name: a\n    dsn:\n    {SECRET_DSN}: x\n", id="dsn-as-key"),
    pytest.param(f"const_labels: {{'{SECRET_DSN}': x}}\nservers: [{{name: a, dsn: 'postgresql://h/d'}}]",
                 id="dsn-as-label-name"),
    pytest.param(f"servers: [{{name: a, dsn: !<{SECRET_DSN}> x}}]", id="dsn-as-yaml-tag"),
    pytest.param(f"servers: [{{name: a, dsn: 'host=h password {SECRET}'}}]", id="broken-conninfo"),
    pytest.param(f"servers:\n  - name: a\n     dsn: {SECRET_DSN}\n   bad", id="broken-yaml-on-the-dsn-line"),
])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_config_mistakes_never_print_the_password(tmp_path: Path, config: str, command: str) -> None:
    path = tmp_path / "dbpool.yml"
    path.write_text(config)
    args = [str(path)] if command == "check-config" else ["--config.file", str(path),
                                                          "--web.listen-address", "127.0.0.1:0"]
    result = subprocess.run([*exporter_command(), command, *args], capture_output=True, text=True, timeout=60,
                            env={**clean_env(), PASSWORD_ENV: SECRET})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert_no_secret(f"{command} output", output)


# --- HTTP clients that misbehave ------------------------------------------------------------------------
def _raw(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def test_http_garbage_and_stalled_clients(tmp_path: Path, pg_dsn: str,
                                          daemons: list[DaemonProcess]) -> None:
    d = _start(daemons, tmp_path, pg_dsn, max_label_values=5)
    d.wait_ready()
    # Clients that open a request and never finish it hold their connections throughout.
    stalled = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        stalled.append(s)
    try:
        payloads = {
            "binary": b"\x00\xff\xfe garbage \x16\x03\x01\r\n\r\n",
            "tls hello": bytes.fromhex("16030100a5010000a10303") + os.urandom(64),
            "long url": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            "many headers": b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
            "huge header": b"GET /metrics HTTP/1.1\r\nX: " + b"z" * 200_000 + b"\r\n\r\n",
            "bad method": b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "traversal": b"GET /../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
            "nul in path": b"GET /metrics%00.html HTTP/1.1\r\nHost: x\r\n\r\n",
            "bad version": b"GET /metrics HTTP/9.9\r\n\r\n",
            "post body": b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "lying length": b"POST /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nx",
        }
        answers = {}
        for what, payload in payloads.items():
            reply = _raw(d.port, payload)
            answers[what] = reply.split(b"\r\n", 1)[0][:80]
            # Refusing is fine (400, 414, 431, 501 ...); an internal error is not.
            assert not reply.startswith((b"HTTP/1.0 500", b"HTTP/1.1 500")), (what, reply[:300])
            assert d.proc.poll() is None, d.log()
            status, body = d.get("/metrics")
            assert status == 200 and "dbpool_source_up" in body, what
        print("answers:", answers)
        assert b"root:" not in b"".join(answers.values())
    finally:
        for s in stalled:
            s.close()
    started = time.monotonic()
    assert d.get("/metrics")[0] == 200
    print(f"a scrape after 20 stalled clients and {len(payloads)} garbage requests: "
          f"{(time.monotonic() - started) * 1000:.1f} ms")
    assert "Traceback" not in d.log(), d.log()[-3000:]
    assert d.stop()[0] == 0


def test_clients_hanging_up_mid_scrape(tmp_path: Path, pg_dsn: str,
                                       daemons: list[DaemonProcess]) -> None:
    """What Prometheus does at scrape_timeout: close the connection while the answer is on its way."""
    d = _start(daemons, tmp_path, pg_dsn, max_label_values=5)
    d.wait_ready()
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        s.close()
    status, body = d.get("/metrics")
    assert status == 200 and "dbpool_source_up" in body
    assert d.proc.poll() is None
    # A client going away is not the exporter's error: no traceback, no error line per hang-up.
    log = d.log()
    assert "Traceback" not in log, log[-3000:]
    assert "level=error" not in log, log[-3000:]
    assert d.stop()[0] == 0
