"""Throwaway PostgreSQL clusters from local binaries: for the demo and for tests that stop servers."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindir() -> str:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if not dirs:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return dirs[-1]


class PgCluster:
    """initdb + pg_ctl on a free loopback port; run as user postgres when we are root."""

    def __init__(self, **settings: str) -> None:
        self.bindir = _bindir()
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix="dbpool-pg-")
        self.datadir = os.path.join(self.base, "data")
        self.logfile = os.path.join(self.base, "server.log")
        self.settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": self.base,
                         "fsync": "off", "max_connections": "50", **settings}
        try:
            if os.geteuid() == 0:
                shutil.chown(self.base, "postgres", "postgres")
            self._run("initdb", "-D", self.datadir, "-U", "postgres", "-A", "trust", "--no-sync")
            with open(os.path.join(self.datadir, "postgresql.auto.conf"), "a") as f:
                for key, value in self.settings.items():
                    f.write(f"{key} = '{value}'\n")
        except BaseException:
            # The caller never gets an object to destroy(), so don't leave the directory behind.
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [os.path.join(self.bindir, tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def require_passwords(self) -> None:
        """Before ``start()``: every role but ``postgres`` must log in over TCP with scram-sha-256
        (``postgres`` keeps trust, so a test can still set things up and play other clients)."""
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all postgres 127.0.0.1/32 trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")

    def set_password(self, role: str, password: str, *, create: bool = False, superuser: bool = False) -> None:
        """Create (``create=True``) or alter a login role with a scram-sha-256 password."""
        import psycopg
        from psycopg import sql

        verb = "CREATE" if create else "ALTER"
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute("SET password_encryption = 'scram-sha-256'")
            admin.execute(sql.SQL(verb + " ROLE {} " + ("SUPERUSER " if superuser else "") + "LOGIN PASSWORD {}")
                          .format(sql.Identifier(role), sql.Literal(password)))

    def start(self) -> PgCluster:
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-o", f"-p {self.port}", "-w", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"throwaway cluster on port {self.port} did not come up")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
