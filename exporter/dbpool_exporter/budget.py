"""``dbpool-exporter budget``: add up every pool's max per server across exporters and flag overcommit."""

from __future__ import annotations

import argparse
import math
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from .redact import scrub

DEFAULT_URL = "http://127.0.0.1:9188/metrics"
OK, OVERCOMMIT, BAD_INPUT = 0, 1, 2
UNKNOWN = "unknown"


class BudgetError(Exception):
    """Bad input or an unreachable exporter: one line, exit 2."""


@dataclass(frozen=True)
class Pool:
    instance: str
    pool: str
    kind: str
    server: str
    max: float  # math.inf when the pool is unbounded
    worker: str = ""  # the worker process's PID for multi-process apps


@dataclass
class Server:
    name: str
    pools: list[Pool] = field(default_factory=list)
    usable: int | None = None
    usable_from: str = ""

    @property
    def total(self) -> float:
        return sum(p.max for p in self.pools)

    @property
    def headroom(self) -> float | None:
        return None if self.usable is None else self.usable - self.total

    @property
    def overcommitted(self) -> bool:
        return self.usable is not None and self.total > self.usable


def add_parser(subparsers: Any) -> None:
    """Add the ``budget`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser("budget", help="sum pool limits per server across exporters, flag overcommit",
                                   description=__doc__, epilog=EPILOG)
    _arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbpool-exporter budget", description=__doc__, epilog=EPILOG)
    _arguments(parser)
    return run(parser.parse_args(argv))


EPILOG = ("Exit status: 0 when every server with a known capacity has room for all its pools, 1 when a "
          "server is overcommitted (the pools' max connections add up to more than it accepts), 2 on "
          "an unreachable URL or bad input.")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", nargs="*", metavar="URL",
                        help=f"an exporter's /metrics, one per replica (default {DEFAULT_URL}); "
                             "host:port is enough")
    parser.add_argument("--server-max", action="append", default=[], metavar="SERVER=N",
                        help="connections SERVER (host:port, as in the pools' server label) accepts from "
                             "applications, i.e. max_connections minus reserved slots; overrides what "
                             "exporters report; repeatable")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per fetch (default 5)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the budget table; 0 ok, 1 overcommitted, 2 bad input."""
    out = out or sys.stdout
    try:
        overrides = parse_overrides(args.server_max)
        urls = list(dict.fromkeys(normalize_url(u) for u in (args.urls or [DEFAULT_URL])))
        servers = collect((url, fetch(url, args.timeout)) for url in urls)
    except BudgetError as e:
        print(f"dbpool-exporter budget: {e}", file=sys.stderr, flush=True)
        return BAD_INPUT
    for name, usable in overrides.items():
        server = servers.setdefault(name, Server(name))
        server.usable, server.usable_from = usable, "--server-max"
    out.write(render(servers))
    out.flush()
    return OVERCOMMIT if any(s.overcommitted for s in servers.values()) else OK


def parse_overrides(values: Iterable[str]) -> dict[str, int]:
    overrides = {}
    for value in values:
        server, sep, number = value.rpartition("=")
        if not sep or not server:
            raise BudgetError(f"--server-max {value!r}: expected SERVER=N, e.g. 10.0.0.5:5432=97")
        try:
            usable = int(number)
        except ValueError:
            raise BudgetError(f"--server-max {value!r}: {number!r} is not a whole number") from None
        if usable < 0:
            raise BudgetError(f"--server-max {value!r}: must not be negative")
        overrides[server] = usable
    return overrides


def normalize_url(url: str) -> str:
    """``host:port`` -> ``http://host:port/metrics``; a given path is kept."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BudgetError(f"{scrub(url)}: not an http(s) URL")
    return urlunsplit(parts._replace(path=parts.path if parts.path not in ("", "/") else "/metrics"))


def fetch(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except Exception as e:  # URLError, HTTPError, timeouts, refused, bad URL: all one line
        reason = getattr(e, "reason", None) or e
        reason = getattr(reason, "strerror", None) or reason  # "Connection refused", not "[Errno 111] ..."
        raise BudgetError(f"cannot fetch {scrub(url)}: {scrub(str(reason)) or type(e).__name__}") from None


def _instance(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc if parts.path == "/metrics" else parts.netloc + parts.path


def collect(pages: Iterable[tuple[str, str]]) -> dict[str, Server]:
    """Pools and server capacities from each exporter's exposition, grouped by server label."""
    servers: dict[str, Server] = {}
    capacity: dict[str, dict[str, float]] = {}
    for url, text in pages:
        instance = _instance(url)
        # Keyed by worker too: every worker process of a multi-process app has its own copy of each pool.
        info: dict[tuple[str, str, str], str] = {}
        limits: dict[tuple[str, str, str], float] = {}
        seen_dbpool = False
        try:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    seen_dbpool = seen_dbpool or s.name.startswith("dbpool_")
                    key = (s.labels.get("pool", ""), s.labels.get("kind", ""), s.labels.get("worker", ""))
                    if s.name == "dbpool_pool_info":
                        info[key] = s.labels.get("server") or UNKNOWN
                    elif s.name == "dbpool_max_connections":
                        limits[key] = s.value
                    elif s.name in ("dbpool_server_usable_connections", "dbpool_server_max_connections",
                                    "dbpool_server_reserved_connections") and "server" in s.labels:
                        seen = capacity.setdefault(s.labels["server"], {})
                        # Two exporters watching one server should agree; if not, plan for the smaller.
                        seen[s.name] = min(seen.get(s.name, math.inf), s.value)
        except Exception as e:
            raise BudgetError(f"{scrub(url)}: not a Prometheus text exposition ({scrub(str(e))[:80]})") from None
        if not seen_dbpool:
            raise BudgetError(f"{scrub(url)}: no dbpool_* metrics there; is it a dbpool-exporter?")
        for (pool, kind, worker), server in sorted(info.items()):
            # No dbpool_max_connections for a pool with an info line means the pool is unbounded.
            servers.setdefault(server, Server(server)).pools.append(
                Pool(instance, pool, kind, server, limits.get((pool, kind, worker), math.inf), worker))
    for name, seen in capacity.items():
        server = servers.setdefault(name, Server(name))
        if "dbpool_server_usable_connections" in seen:
            server.usable = int(seen["dbpool_server_usable_connections"])
        elif "dbpool_server_max_connections" in seen:
            server.usable = int(seen["dbpool_server_max_connections"]
                                - seen.get("dbpool_server_reserved_connections", 0))
        server.usable_from = "exporter"
    return servers


def _n(value: float | None) -> str:
    if value is None:
        return UNKNOWN
    return "unbounded" if math.isinf(value) else f"{value:g}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(servers: dict[str, Server]) -> str:
    pools = sorted((p for s in servers.values() for p in s.pools),
                   key=lambda p: (p.server, p.instance, p.pool, p.kind, p.worker))
    lines = _table(["INSTANCE", "WORKER", "POOL", "KIND", "SERVER", "MAX"],
                   [[p.instance, p.worker or "-", p.pool, p.kind, p.server, _n(p.max)] for p in pools], {5})
    lines.append("")
    rows = []
    for s in sorted(servers.values(), key=lambda s: s.name):
        if s.overcommitted:
            status = "OVERCOMMIT"
        elif s.usable is None:
            status = "unknown capacity (--server-max SERVER=N)"
        elif not s.pools:
            status = "ok (no pool uses this server label)"
        else:
            status = "ok"
        usable = f"{s.usable} ({s.usable_from})" if s.usable is not None else UNKNOWN
        rows.append([s.name, str(len(s.pools)), _n(s.total), usable, _n(s.headroom), status])
    lines += _table(["SERVER", "POOLS", "TOTAL MAX", "USABLE", "HEADROOM", "STATUS"], rows, {1, 2, 4})
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
