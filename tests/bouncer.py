"""A throwaway PgBouncer (Debian's binary) on a free loopback port, in front of a given PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Mapping

from procs import stop_process

from dbpool_exporter.throwaway import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class Bouncer:
    """pgbouncer.ini + auth_file in a temp dir; ``-u postgres`` when we are root (PgBouncer refuses root).

    ``users`` are plain-text passwords (PgBouncer derives SCRAM from them); ``databases`` are
    ``name -> connection string`` lines of the ``[databases]`` section.
    """

    def __init__(self, databases: Mapping[str, str], users: Mapping[str, str], *, admin: str = "admin",
                 stats: str = "stats", **settings: str) -> None:
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix="dbpool-pgb-")
        self.ini = os.path.join(self.base, "pgbouncer.ini")
        self.logfile = os.path.join(self.base, "pgbouncer.log")
        self.databases = dict(databases)
        self.users = dict(users)
        self.settings = {"listen_addr": "127.0.0.1", "listen_port": str(self.port), "unix_socket_dir": "",
                         "auth_type": "scram-sha-256", "auth_file": os.path.join(self.base, "users.txt"),
                         "admin_users": admin, "stats_users": stats, "pool_mode": "transaction",
                         "logfile": self.logfile, "server_login_retry": "1", **settings}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write()

    def write(self) -> None:
        """(Re)write the files; RELOAD or SIGHUP makes a running PgBouncer read them."""
        with open(self.settings["auth_file"], "w") as f:
            for user, password in self.users.items():
                f.write(f'"{user}" "{password}"\n')
        with open(self.ini, "w") as f:
            f.write("[databases]\n")
            for name, conninfo in self.databases.items():
                f.write(f"{name} = {conninfo}\n")
            f.write("[pgbouncer]\n")
            for key, value in self.settings.items():
                f.write(f"{key} = {value}\n")
        if os.geteuid() == 0:
            for path in (self.base, self.ini, self.settings["auth_file"]):
                shutil.chown(path, "postgres", "postgres")
            os.chmod(self.settings["auth_file"], 0o600)

    def dsn(self, user: str, database: str = "pgbouncer", password: str | None = None) -> str:
        password = self.users[user] if password is None else password
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    @property
    def version(self) -> str:
        """``1.18.0`` from ``PgBouncer 1.18.0``: what SHOW VERSION will say."""
        out = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[0].split()[-1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Bouncer:
        cmd = [PGBOUNCER, *(("-u", "postgres") if os.geteuid() == 0 else ()), self.ini]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer on port {self.port} did not come up")

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM), waited for, so the port is free again."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def log(self) -> str:
        with contextlib.suppress(OSError), open(self.logfile) as f:
            return f.read()
        return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Bouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
