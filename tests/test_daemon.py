"""``dbpool-exporter run`` as a real subprocess: endpoints, SIGTERM/SIGINT, SIGHUP reloads, bad flags."""

from __future__ import annotations

import gzip
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import check_metrics
from daemonproc import DaemonProcess, clean_env, exporter_command
from dbpool_exporter.throwaway import PgCluster, free_port


@pytest.fixture
def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[DaemonProcess] = []

    def start(config: str | None, **kwargs: object) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(signal.SIGKILL)


def _config(*servers: tuple[str, str], extra: str = "") -> str:
    lines = ["defaults: {interval: 0.3, backoff_max: 1}", "servers:"]
    for name, dsn in servers:
        lines += [f"  - name: {name}", f"    dsn: '{dsn}'"]
    return "\n".join(lines) + "\n" + extra


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_on_signal(daemon, pg_dsn: str, promtool: str, sig: int) -> None:  # type: ignore[no-untyped-def]
    d = daemon(_config(("local", pg_dsn), extra="const_labels: {env: test}\n"))
    d.wait_ready()
    assert d.get("/-/healthy")[0] == 200
    text = d.metrics()
    check_metrics(promtool, text)
    assert d.value("dbpool_source_up", source="local", kind="postgres", env="test") == 1
    assert d.value("dbpool_exporter_build_info", env="test") == 1
    assert d.value("dbpool_exporter_config_last_reload_successful") == 1
    assert (d.value("dbpool_server_max_connections") or 0) > 0
    assert all('env="test"' in line for line in text.splitlines() if line and not line.startswith("#"))
    status, page = d.get("/")
    assert status == 200 and "<td>local</td><td>postgres</td><td>1</td>" in page and 'href="/metrics"' in page
    assert d.get("/nowhere")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{d.port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert b"dbpool_source_up" in gzip.decompress(response.read())
    code, took = d.stop(sig)
    print(f"stopped by signal {sig} in {took:.2f} s")
    assert code == 0, d.log()
    assert "Traceback" not in d.log()


def test_dsn_from_environment_and_custom_path(daemon, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    d = daemon(None, env=clean_env(DATA_SOURCE_NAME=pg_dsn), args=("--web.telemetry-path", "/probe", "--log.format",
                                                             "json"))
    d.wait_for(lambda: d.get("/probe")[0] == 200 and "dbpool_source_up" in d.get("/probe")[1], "/probe")
    d.wait_for(lambda: 'dbpool_source_up{kind="postgres",source="default"} 1.0' in d.get("/probe")[1], "up")
    assert d.get("/metrics")[0] == 404
    assert d.stop()[0] == 0
    assert all(line.startswith('{"ts": ') for line in d.log().splitlines()), d.log()


@pytest.fixture
def second_server() -> Iterator[str]:
    with PgCluster() as cluster:
        yield cluster.dsn


def test_sighup_reload_good_and_bad(daemon, pg_dsn: str, second_server: str) -> None:  # type: ignore[no-untyped-def]
    d = daemon(_config(("first", pg_dsn)))
    d.wait_for(lambda: d.value("dbpool_source_up", source="first") == 1, "first up")

    d.write_config(_config(("first", pg_dsn), ("second", second_server), extra="const_labels: {team: db}\n"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: d.value("dbpool_source_up", source="second", team="db") == 1, "second up after reload")
    assert d.value("dbpool_exporter_config_last_reload_successful") == 1
    polls_before = d.value("dbpool_source_polls_total", source="first") or 0

    d.write_config(_config(("first", pg_dsn)) + "servers_typo: 1\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: d.value("dbpool_exporter_config_last_reload_successful") == 0, "failed reload")
    assert "config reload failed, keeping the previous config: servers_typo: unknown key" in d.log()
    # The old config keeps running: both sources, still polling, const label kept.
    d.wait_for(lambda: (d.value("dbpool_source_polls_total", source="first") or 0) > polls_before, "first polls on")
    assert d.value("dbpool_source_up", source="second", team="db") == 1

    d.write_config(_config(("first", pg_dsn)))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: d.value("dbpool_exporter_config_last_reload_successful") == 1, "good reload")
    assert d.value("dbpool_source_up", source="second") is None  # removed with its series
    assert d.value("dbpool_source_up", source="first") == 1
    assert d.stop()[0] == 0


@pytest.mark.parametrize(("args", "needle"), [
    (("--web.listen-address", "nonsense"), "--web.listen-address"),
    (("--web.telemetry-path", "metrics"), "--web.telemetry-path"),
    (("--log.level", "loud"), "--log.level"),
    (("--config.file", "/nonexistent/dbpool.yml"), "/nonexistent/dbpool.yml: cannot read config file"),
    (("--no-such-flag",), "unrecognized arguments"),
    ((), "no servers: pass --config.file or set DATA_SOURCE_NAME"),
])
def test_bad_flags_one_line_exit_2(args: tuple[str, ...], needle: str) -> None:
    port = free_port()
    result = subprocess.run([*exporter_command(), "run", "--web.listen-address", f"127.0.0.1:{port}", *args],
                            capture_output=True, text=True, timeout=30, env=clean_env())
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert len(output.splitlines()) == 1 and needle in output and "Traceback" not in output, output


def test_port_in_use_is_one_line(daemon, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon(_config(("local", pg_dsn)))
    d.wait_ready()
    config = tmp_path / "other.yml"
    config.write_text(_config(("local", pg_dsn)))
    result = subprocess.run([*exporter_command(), "run", "--web.listen-address", f"127.0.0.1:{d.port}",
                             "--config.file", str(config)], capture_output=True, text=True, timeout=30, env=clean_env())
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1 and len(output.splitlines()) == 1 and "cannot listen" in output, output


def test_web_config_guards_every_daemon_endpoint(daemon, tmp_path: Path, pg_dsn: str) -> None:
    import base64

    import bcrypt

    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    d = daemon(_config(("main", pg_dsn)), args=("--web.config.file", str(web)))
    d.wait_for(lambda: d.get("/-/healthy")[0] == 401, "401 without credentials")
    for path in ("/", "/metrics", "/-/ready", "/nope"):
        assert d.get(path)[0] == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"prometheus:s3cret").decode()}
    request = urllib.request.Request(f"http://127.0.0.1:{d.port}/metrics", headers=good)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert b"dbpool_exporter_build_info" in response.read()
    assert d.stop()[0] == 0
    assert "s3cret" not in d.log()


def test_bad_web_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n")
    result = subprocess.run([*exporter_command(), "run", "--web.config.file", str(web), "--web.listen-address",
                             f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30,
                            env=clean_env(DATA_SOURCE_NAME="postgresql://postgres@127.0.0.1:1/x"))
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "--web.config.file" in lines[0] and "cert_file" in lines[0], lines
