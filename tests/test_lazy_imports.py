"""What each use of the package imports: nothing of an extra it does not use (pyproject.toml's extras)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The daemon's extra and the pool kinds' extras.
DAEMON_PACKAGES = ("asyncpg", "yaml", "bcrypt", "apscheduler", "tzlocal")
POOL_PACKAGES = ("sqlalchemy", "psycopg", "psycopg_pool", "psycopg_binary", "greenlet")
# Our modules that `run` has no use for: subcommands, the demo's workload, test infrastructure, pool sources.
NOT_FOR_RUN = ("dbpool_exporter.demo", "dbpool_exporter.budget", "dbpool_exporter.workload",
               "dbpool_exporter.throwaway", "dbpool_exporter.sources.sqlalchemy", "dbpool_exporter.sources.psycopg",
               "dbpool_exporter.sources.pgbouncer")
# What the daemon loads only when its flags ask for it; ``run`` with DATA_SOURCE_NAME alone loads none of them.
RUN_LAZY = ("yaml", "bcrypt")
# What it never loads: its polls are timers on its own loop (no APScheduler, tzlocal or multiprocessing).
NEVER_FOR_RUN = ("apscheduler", "tzlocal", "multiprocessing", "concurrent.futures.process")
PASSWORD = "probe-password"

# Installed as a meta path finder, it makes the named top-level packages absent, as in a core-only install.
BLOCK = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _python(code: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in names or m.split(".")[0] in names)


def test_import_loads_no_extra() -> None:
    result = _python("import json, sys, dbpool_exporter; print(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout)
    assert "dbpool_exporter.exporter" in modules  # the probe sees what the import loaded
    assert _loaded(modules, DAEMON_PACKAGES + POOL_PACKAGES) == []


def _app_modules(setup: str, *args: str) -> list[str]:
    """sys.modules of an app that registered one pool and served one scrape."""
    result = _python(f"""
        import json, sys
        from prometheus_client import generate_latest
        import dbpool_exporter
        {setup}
        exporter = dbpool_exporter.Exporter().register("app", pool).start()
        exporter.poll_now()
        text = generate_latest(exporter.registry).decode()
        assert "dbpool_connections" in text, text
        exporter.stop()
        print(json.dumps(sorted(sys.modules)))
    """, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_sqlalchemy_app_loads_no_psycopg_and_no_daemon_library(tmp_path: Path) -> None:
    modules = _app_modules("""
        from sqlalchemy import create_engine
        from sqlalchemy.pool import QueuePool
        pool = create_engine("sqlite:///" + sys.argv[1], poolclass=QueuePool)
    """, str(tmp_path / "app.db"))
    assert "dbpool_exporter.sources.sqlalchemy" in modules
    assert _loaded(modules, ("psycopg", "psycopg_pool", "psycopg_binary", "asyncpg", "yaml", "bcrypt")) == []


def test_psycopg_app_loads_no_sqlalchemy_and_no_daemon_library(pg_dsn: str) -> None:
    modules = _app_modules("""
        from psycopg_pool import ConnectionPool
        pool = ConnectionPool(sys.argv[1], min_size=1, max_size=2, open=True)
    """, pg_dsn)
    assert "dbpool_exporter.sources.psycopg" in modules
    assert _loaded(modules, ("sqlalchemy", "greenlet", "asyncpg", "yaml", "bcrypt")) == []


def test_core_only_install() -> None:
    """With every extra absent: the package imports and collects, ``run`` names the extra in one line."""
    blocked = DAEMON_PACKAGES + POOL_PACKAGES
    code = f"BLOCKED = {blocked!r}\n" + BLOCK + textwrap.dedent("""
        import dbpool_exporter
        from prometheus_client import generate_latest
        generate_latest(dbpool_exporter.Exporter().registry)
        from dbpool_exporter.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    help_result = _python(code, "--help")
    assert help_result.returncode == 0, help_result.stderr
    assert "run the exporter daemon" in help_result.stdout
    for command in (["run"], ["check-config", "x.yml"]):
        result = _python(code, *command)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'dbpool-exporter[daemon]'" in lines[0], result.stderr


def test_check_config_parses_dsns_without_psycopg(tmp_path: Path) -> None:
    """Validating servers and PgBouncers reads their DSNs with libpq's grammar, not psycopg's libpq."""
    config = tmp_path / "config.yml"
    config.write_text("servers:\n  - name: main\n    dsn: host=db1 dbname=app\n"
                      "pgbouncers:\n  - name: bouncer\n    dsn: postgresql://stats@db1:6432/pgbouncer\n")
    result = _python("""
        import json, sys
        from dbpool_exporter.cli import main
        code = main(sys.argv[1:])
        print(json.dumps(sorted(sys.modules)))
        sys.exit(code)
    """, "check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")
    modules = json.loads(result.stdout.splitlines()[-1])
    assert "dbpool_exporter.sources.pgbouncer" in modules  # its DSN was checked
    assert _loaded(modules, POOL_PACKAGES + ("asyncpg",)) == []  # no connection made: no driver


def _daemon_modules(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """sys.modules of a real ``dbpool-exporter run`` once it has polled its server (and served that poll)."""
    port = free_port()
    out = tmp_path / "modules.json"
    code = textwrap.dedent(f"""
        import json, os, signal, sys, threading, time, urllib.request

        def probe():
            deadline = time.monotonic() + 60
            # Harmless without basic auth; the right password with it.
            auth = {{"Authorization": "Basic " + __import__("base64").b64encode(b"probe:{PASSWORD}").decode()}}
            while time.monotonic() < deadline:
                try:
                    request = urllib.request.Request("http://127.0.0.1:{port}/metrics", headers=auth)
                    with urllib.request.urlopen(request, timeout=5) as r:
                        text = r.read().decode()
                    if "\\ndbpool_server_max_connections{{" in text:  # a poll happened (no client may be connected)
                        with open({str(out)!r}, "w") as f:
                            json.dump(sorted(sys.modules), f)
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=probe, daemon=True).start()
        from dbpool_exporter.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    result = _python(code, "run", *args, "--web.listen-address", f"127.0.0.1:{port}", timeout=90, env=env)
    assert out.exists(), f"the daemon never served a server poll: {result.stderr[-2000:]}"
    modules: list[str] = json.loads(out.read_text())
    assert "asyncpg" in modules and "dbpool_exporter.sources.postgres" in modules  # it did poll
    assert _loaded(modules, NEVER_FOR_RUN) == []
    return modules


def test_run_with_servers_only_loads_no_pool_library(pg_dsn: str, tmp_path: Path) -> None:
    """``dbpool-exporter run`` watching a server, after it served a poll: no SQLAlchemy, no psycopg, no demo."""
    config = tmp_path / "config.yml"
    config.write_text(f"servers:\n  - name: main\n    dsn: {pg_dsn}\n    interval: 0.5s\n")
    modules = _daemon_modules(tmp_path, "--config.file", str(config))
    assert _loaded(modules, POOL_PACKAGES) == []
    assert [m for m in NOT_FOR_RUN if m in modules] == []
    assert "yaml" in modules  # the config file was read


@pytest.mark.parametrize("web", ["none", "no users", "users"])
def test_run_loads_what_its_flags_need(pg_dsn: str, tmp_path: Path, web: str) -> None:
    """The daemon's lazy set: PyYAML only for a file it reads, bcrypt only for basic_auth_users."""
    args: list[str] = []
    if web != "none":
        import bcrypt

        users = f"basic_auth_users:\n  probe: '{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}'\n"
        config = tmp_path / "web.yml"
        config.write_text("rate_limit:\n  interval: 1ms\n  burst: 100\n" + (users if web == "users" else ""))
        args = ["--web.config.file", str(config)]
    modules = _daemon_modules(tmp_path, *args, env={**os.environ, "DATA_SOURCE_NAME": pg_dsn})
    expected_absent = {"none": ("yaml", "bcrypt"), "no users": ("bcrypt",), "users": ()}[web]
    assert sorted({m.split(".")[0] for m in _loaded(modules, RUN_LAZY)}) == sorted(set(RUN_LAZY) - set(expected_absent))
