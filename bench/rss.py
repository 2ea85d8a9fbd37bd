"""Daemon memory at 1,000 server connections: ``dbpool-exporter run`` beside postgres_exporter, in one run.

A throwaway PostgreSQL (max_connections 1100) gets 1,000 idle client connections; each exporter then
watches it alone and is scraped ``--polls`` times, and its resident memory is read from /proc after the
last scrape. postgres_exporter is Debian's ``prometheus-postgres-exporter`` (installed with apt-get when
missing and we are root). Figures are printed, never asserted.

    python bench/rss.py                    # ~1 min
    python bench/rss.py --variants plain,arena2 --smaps
    python bench/rss.py --layers           # where the memory goes: each import layer's share

Every run also prints the floor: a fresh interpreter that only imports asyncio, ssl and asyncpg, the
libraries the daemon is built on, before any of its own work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from dbpool_exporter.throwaway import PgCluster, free_port

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from procs import stop_process  # noqa: E402

EXPORTER = os.path.join(os.path.dirname(sys.executable), "dbpool-exporter")
PG_EXPORTER = "prometheus-postgres-exporter"
# Environment variants of our daemon: what each changes is what it measures. "dsn" runs it as
# postgres_exporter is run, one server from DATA_SOURCE_NAME and no config file (so no PyYAML), which
# polls at the default interval (10 s) rather than --interval.
VARIANTS = {
    "plain": {},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "dsn": {"DATA_SOURCE_NAME": "{dsn}"},
}
FLOOR = "import asyncio, ssl, asyncpg"


@dataclass
class Figures:
    name: str
    rss_kb: int
    anon_kb: int
    file_kb: int
    hwm_kb: int
    threads: int
    connections: float | None  # what the exporter reported, to show it saw the 1,000

    def row(self) -> str:
        seen = "?" if self.connections is None else f"{self.connections:.0f}"
        return (f"{self.name:<34} {self.rss_kb / 1024:>7.1f} {self.anon_kb / 1024:>7.1f} {self.file_kb / 1024:>7.1f} "
                f"{self.hwm_kb / 1024:>7.1f} {self.threads:>7} {seen:>7}")


def status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0])
    return values


def smaps_top(pid: int, count: int = 12) -> list[tuple[int, str]]:
    """The mappings holding the most resident memory, summed by file (or [heap], [anon], [stack])."""
    totals: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split()
                name = fields[5] if len(fields) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                totals[name] = totals.get(name, 0) + int(line.split()[1])
    return sorted(((kb, n) for n, kb in totals.items()), reverse=True)[:count]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


def total(text: str, family: str) -> float | None:
    """Sum of a family's samples (comment lines skipped); None when there is none."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(family + "{") or line.startswith(family + " ")]
    return sum(values) if values else None


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exporter exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            scrape(port)
            return
        time.sleep(0.1)
    raise RuntimeError("exporter did not answer in time")


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        stop_process(proc)


def measure(name: str, cmd: list[str], env: dict[str, str], port: int, polls: int, wait: float,
            family: str, smaps: bool) -> Figures:
    with running(cmd, env) as proc:
        wait_listening(port, proc, time.monotonic() + 30)
        text = ""
        for _ in range(polls):
            time.sleep(wait)
            text = scrape(port)
        s = status(proc.pid)
        figures = Figures(name, s["VmRSS"], s.get("RssAnon", 0), s.get("RssFile", 0), s["VmHWM"], s["Threads"],
                          total(text, family))
        if smaps:
            print(f"-- {name}: largest resident mappings (MB)")
            for kb, mapping in smaps_top(proc.pid):
                print(f"   {kb / 1024:7.1f}  {mapping}")
        return figures


# What `run` imports, layer by layer, each measured on top of the ones before it (--layers); the last
# two only when a YAML file is read or basic auth is configured.
LAYERS = (
    ("interpreter", "pass"),
    ("ssl (OpenSSL 3)", "import ssl"),
    ("asyncio", "import asyncio"),
    ("logging, json, argparse", "import logging, json, argparse, dataclasses"),
    ("prometheus_client", "import prometheus_client"),
    ("asyncpg", "import asyncpg"),
    ("dbpool_exporter (run's modules)", "import dbpool_exporter.cli, dbpool_exporter.daemon, "
                                        "dbpool_exporter.sources.postgres"),
    ("yaml (a config file)", "import dbpool_exporter.yamlfile"),
    ("bcrypt (basic_auth_users)", "import bcrypt"),
)
_LAYER_SCRIPT = """
import re, sys
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = 0
for name, statement in LAYERS:
    exec(statement)
    now = rss()
    print(f"{name:<34} {(now - before) / 1024:>+6.1f} MB  (total {now / 1024:5.1f}, {len(sys.modules)} modules)")
    before = now
"""


def layers() -> None:
    print("Resident memory by import layer (a fresh interpreter, no connection):")
    subprocess.run([sys.executable, "-c", f"LAYERS = {LAYERS!r}\n" + _LAYER_SCRIPT], check=True, timeout=120)
    print(floor())


def floor() -> str:
    """What the chosen libraries alone hold resident: no daemon built on them can be leaner."""
    code = (f"import re, sys\n{FLOOR}\n"
            "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1), len(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    kb, modules = out.stdout.split()
    return (f"{'floor: asyncio, ssl, asyncpg alone':<34} {int(kb) / 1024:>6.1f} MB  "
            f"(a fresh interpreter, {modules} modules)")


def ensure_postgres_exporter() -> str | None:
    path = shutil.which(PG_EXPORTER) or (f"/usr/bin/{PG_EXPORTER}" if os.path.exists(f"/usr/bin/{PG_EXPORTER}")
                                          else None)
    if path or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    print(f"installing {PG_EXPORTER} (apt-get)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", PG_EXPORTER], env=env,
                   check=False, stdout=subprocess.DEVNULL, timeout=600)
    # Debian starts the packaged service on :9187 against the local server: not ours to keep running.
    subprocess.run(["systemctl", "disable", "--now", PG_EXPORTER], check=False, capture_output=True, timeout=60)
    return shutil.which(PG_EXPORTER)


def open_idle(dsn: str, count: int, seconds: float) -> list[object]:
    import psycopg

    conns: list[object] = []
    deadline = time.monotonic() + seconds
    while len(conns) < count and time.monotonic() < deadline:
        conns.append(psycopg.connect(dsn, autocommit=True, application_name=f"idle{len(conns) % 20}"))
    return conns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=10, help="scrapes (one per poll) before reading RSS")
    parser.add_argument("--interval", type=float, default=1.0, help="the daemon's poll interval, seconds")
    parser.add_argument("--variants", default="plain,arena2,dsn", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--smaps", action="store_true", help="also print each process's largest mappings")
    parser.add_argument("--layers", action="store_true", help="only print what each import layer costs")
    args = parser.parse_args()
    if args.layers:
        layers()
        return 0
    if not 1 <= args.connections <= 1050 or not 1 <= args.polls <= 100:
        parser.error("--connections 1..1050, --polls 1..100")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}")

    pg_exporter = ensure_postgres_exporter()
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("MALLOC_ARENA_MAX", "DATA_SOURCE_NAME", "DATA_SOURCE_NAME_FILE")}
    with PgCluster(max_connections="1100", shared_buffers="32MB") as cluster, \
            tempfile.TemporaryDirectory(prefix="dbpool-rss-") as tmp:
        conns = open_idle(cluster.dsn, args.connections, 180)
        try:
            print(f"{len(conns)} idle client connections open on a throwaway PostgreSQL "
                  f"{cluster.binaries.version()}; {args.polls} polls each", flush=True)
            results = []
            for variant in variants:
                port = free_port()
                config = os.path.join(tmp, "config.yml")
                with open(config, "w") as f:
                    f.write(f"servers:\n  - name: bench\n    dsn: {cluster.dsn}\n    interval: {args.interval}s\n")
                env = {**base_env, **{k: v.format(dsn=cluster.dsn) for k, v in VARIANTS[variant].items()}}
                cmd = [EXPORTER, "run", "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn"]
                if "DATA_SOURCE_NAME" not in env:
                    cmd += ["--config.file", config]
                results.append(measure(f"dbpool-exporter run ({variant})", cmd, env, port, args.polls,
                                       args.interval, "dbpool_server_connections", args.smaps))
            if pg_exporter:
                port = free_port()
                env = {**base_env, "DATA_SOURCE_NAME": cluster.dsn + "?sslmode=disable"}
                cmd = [pg_exporter, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
                results.append(measure("postgres_exporter " + version(pg_exporter), cmd, env, port, args.polls,
                                       args.interval, "pg_stat_activity_count", args.smaps))
            else:
                print(f"({PG_EXPORTER} not found and not installable here: no baseline)")
        finally:
            for conn in conns:
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[attr-defined]
    print(f"\n{'process':<34} {'RSS MB':>7} {'anon':>7} {'file':>7} {'peak':>7} {'threads':>7} {'saw':>7}")
    for figures in results:
        print(figures.row())
    print(f"\n{floor()}")
    return 0


def version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else ""


if __name__ == "__main__":
    sys.exit(main())
