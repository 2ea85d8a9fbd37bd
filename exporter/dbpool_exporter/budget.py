"""Connection budget: add up every pool's max per server across exporters and flag overcommit.

With PgBouncer in between there are tiers: app pools against PgBouncer's max_client_conn (and, in
session mode, against the database's PgBouncer server pools), PgBouncer's server pools against PostgreSQL.
"""

from __future__ import annotations

import argparse
import math
import sys
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, TextIO
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from .redact import scrub

DEFAULT_URL = "http://127.0.0.1:9188/metrics"
OK, OVERCOMMIT, BAD_INPUT = 0, 1, 2
UNKNOWN = "unknown"
# What a row of the server table is checked against.
POSTGRES, PGBOUNCER, SESSION = "postgres", "pgbouncer", "session"
FOLDED = "other"  # the PgBouncer source's name for databases folded by its label cap


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
    database: str = ""
    pgbouncer: tuple[str, str, str] | None = None  # (address, database, user) of a kind="pgbouncer" pool


@dataclass
class Server:
    name: str
    pools: list[Pool] = field(default_factory=list)
    usable: int | None = None
    usable_from: str = ""
    tier: str = POSTGRES
    # (PgBouncer, database) -> its max_db_connections: the cap on all its users' server pools together.
    caps: dict[tuple[str, str], int] = field(default_factory=dict)

    def capped(self) -> dict[tuple[str, str], tuple[float, int]]:
        """PgBouncer databases whose server pools add up to more than max_db_connections: (sum, cap)."""
        sums: dict[tuple[str, str], float] = defaultdict(float)
        for p in self.pools:
            if p.pgbouncer and p.pgbouncer[:2] in self.caps:
                sums[p.pgbouncer[:2]] += p.max
        return {g: (total, self.caps[g]) for g, total in sums.items() if total > self.caps[g]}

    @property
    def total(self) -> float:
        capped = self.capped()
        return (sum(p.max for p in self.pools if not (p.pgbouncer and p.pgbouncer[:2] in capped))
                + sum(cap for _, cap in capped.values()))

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
          "server is overcommitted (the pools' max connections add up to more than it accepts; with "
          "PgBouncer: more than its max_client_conn, more than a session-mode database's server pools, "
          "or PgBouncer's server pools more than PostgreSQL accepts), 2 on an unreachable URL or bad input.")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", nargs="*", metavar="URL",
                        help=f"an exporter's /metrics, one per replica (default {DEFAULT_URL}); "
                             "host:port is enough")
    parser.add_argument("--server-max", action="append", default=[], metavar="SERVER=N",
                        help="connections SERVER (host:port, as in the pools' server label) accepts from "
                             "applications, i.e. max_connections minus reserved slots (for a PgBouncer: "
                             "max_client_conn); overrides what exporters report; repeatable")
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


def _whole(value: float) -> int | None:
    """A reported capacity as a count; None (unknown) for NaN, infinities or negatives from a broken exposition."""
    return int(value) if math.isfinite(value) and value >= 0 else None


def collect(pages: Iterable[tuple[str, str]]) -> dict[str, Server]:
    """Pools and capacities from each exporter's exposition: one row per server label, PgBouncer or PostgreSQL,
    plus one per session-mode PgBouncer database that app pools connect to."""
    pools: list[Pool] = []
    # A PgBouncer watched by two exporters (or by every worker of an app) shows the same pools twice:
    # count each once, by (address, database, user), whatever the source is called there.
    bouncer_pools: dict[tuple[str, ...], Pool] = {}
    capacity: dict[str, dict[str, float]] = {}
    bouncers: dict[str, float] = {}  # PgBouncer address -> max_client_conn
    databases: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)  # (address, database) -> facts
    for url, text in pages:
        instance = _instance(url)
        # Keyed by worker too: every worker process of a multi-process app has its own copy of each pool.
        info: dict[tuple[str, str, str], tuple[str, str]] = {}
        limits: dict[tuple[str, str, str], float] = {}
        behind: dict[tuple[str, str, str], tuple[str, str, str]] = {}
        seen_dbpool = False
        try:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    seen_dbpool = seen_dbpool or s.name.startswith("dbpool_")
                    labels = s.labels
                    key = (labels.get("pool", ""), labels.get("kind", ""), labels.get("worker", ""))
                    if s.name == "dbpool_pool_info":
                        info[key] = (labels.get("server") or UNKNOWN, labels.get("database", ""))
                    elif s.name == "dbpool_max_connections":
                        limits[key] = s.value
                    elif s.name in ("dbpool_server_usable_connections", "dbpool_server_max_connections",
                                    "dbpool_server_reserved_connections") and "server" in labels:
                        seen = capacity.setdefault(labels["server"], {})
                        # Two exporters watching one server should agree; if not, plan for the smaller.
                        seen[s.name] = min(seen.get(s.name, math.inf), s.value)
                    elif s.name == "dbpool_pgbouncer_pool_info":
                        behind[key] = (labels.get("pgbouncer", ""), labels.get("database", ""),
                                       labels.get("user", ""))
                        databases[behind[key][:2]].setdefault("modes", {})[behind[key][2]] = labels.get("pool_mode")
                    elif s.name == "dbpool_pgbouncer_max_client_connections" and "pgbouncer" in labels:
                        bouncers[labels["pgbouncer"]] = min(bouncers.get(labels["pgbouncer"], math.inf), s.value)
                    elif s.name == "dbpool_pgbouncer_database_info":
                        databases[labels.get("pgbouncer", ""), labels.get("database", "")]["mode"] = \
                            labels.get("pool_mode")
                    elif s.name in _DATABASE_GAUGES:
                        databases[labels.get("pgbouncer", ""), labels.get("database", "")][s.name] = s.value
        except Exception as e:
            raise BudgetError(f"{scrub(url)}: not a Prometheus text exposition ({scrub(str(e))[:80]})") from None
        if not seen_dbpool:
            raise BudgetError(f"{scrub(url)}: no dbpool_* metrics there; is it a dbpool-exporter?")
        for (pool, kind, worker), (server, database) in sorted(info.items()):
            # No dbpool_max_connections for a pool with an info line means the pool is unbounded.
            p = Pool(instance, pool, kind, server, limits.get((pool, kind, worker), math.inf), worker, database,
                     behind.get((pool, kind, worker)))
            if kind != PGBOUNCER:
                pools.append(p)
                continue
            same = bouncer_pools.get(p.pgbouncer or (pool, server))
            if same is not None:  # mid-RELOAD two exporters may disagree: plan for the larger pool
                p = replace(same, instance=f"{same.instance},{instance}", max=max(same.max, p.max))
            bouncer_pools[p.pgbouncer or (pool, server)] = p

    servers: dict[str, Server] = {}
    for p in [*pools, *bouncer_pools.values()]:
        servers.setdefault(p.server, Server(p.server)).pools.append(p)
        if p.pgbouncer and p.pgbouncer[1] != FOLDED:  # "other" adds up several databases' caps: no cap
            cap = _whole(databases[p.pgbouncer[:2]].get("dbpool_pgbouncer_database_max_connections", 0))
            if cap:
                servers[p.server].caps[p.pgbouncer[:2]] = cap
    for name, seen in capacity.items():
        target = servers.setdefault(name, Server(name))
        if "dbpool_server_usable_connections" in seen:
            target.usable = _whole(seen["dbpool_server_usable_connections"])
        elif "dbpool_server_max_connections" in seen:
            target.usable = _whole(seen["dbpool_server_max_connections"]
                                   - seen.get("dbpool_server_reserved_connections", 0))
        target.usable_from = "exporter"
    for address, max_client_conn in bouncers.items():
        target = servers.setdefault(address, Server(address))
        target.usable, target.usable_from, target.tier = _whole(max_client_conn), "pgbouncer max_client_conn", PGBOUNCER
    for row in _sessions(pools, list(bouncer_pools.values()), databases):
        servers[row.name] = row
    return servers


_DATABASE_GAUGES = ("dbpool_pgbouncer_database_max_connections", "dbpool_pgbouncer_database_pool_size",
                    "dbpool_pgbouncer_database_reserve_pool_size")


def _sessions(pools: list[Pool], bouncer_pools: list[Pool],
              databases: dict[tuple[str, str], dict[str, Any]]) -> list[Server]:
    """Session-mode PgBouncer databases, with the app pools that name them and their server pools as capacity.

    In session mode a client keeps its server connection until it disconnects, and app pools keep
    their connections open: an app connection beyond the database's server pools waits inside PgBouncer
    at its first query (up to query_wait_timeout) however far below max_client_conn the clients are.
    """
    rows = []
    for (address, database), facts in databases.items():
        users = facts.get("modes", {})
        if users:  # the pools that exist say it best (a user may override the database's pool_mode)
            session_users = {u for u, mode in users.items() if mode == SESSION}
        else:  # PgBouncer opens a pool at a user's first connection: a database nobody used yet has none
            session_users = {""} if facts.get("mode") == SESSION else set()
        clients = [p for p in pools + bouncer_pools if (p.server, p.database) == (address, database)]
        if not session_users or not clients:
            continue
        if users:
            capacity: float | None = sum(p.max for p in bouncer_pools if p.pgbouncer
                                         and p.pgbouncer[:2] == (address, database) and p.pgbouncer[2] in session_users)
        elif "dbpool_pgbouncer_database_pool_size" in facts:
            capacity = facts["dbpool_pgbouncer_database_pool_size"] + facts.get(
                "dbpool_pgbouncer_database_reserve_pool_size", 0)
        else:
            capacity = None
        cap = _whole(facts.get("dbpool_pgbouncer_database_max_connections", 0))
        if capacity is not None and cap and database != FOLDED:
            capacity = min(capacity, cap)
        rows.append(Server(f"{address}/{database}", clients, None if capacity is None else _whole(capacity),
                           "pgbouncer session pools", SESSION))
    return rows


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


def _status(s: Server) -> str:
    if s.overcommitted:
        return "OVERCOMMIT"
    if s.usable is None:
        return "unknown capacity (--server-max SERVER=N)"
    return "ok" if s.pools else "ok (no pool uses this server label)"


def _servers(servers: Iterable[Server], usable: str) -> list[str]:
    rows = []
    for s in sorted(servers, key=lambda s: s.name):
        capacity = f"{s.usable} ({s.usable_from})" if s.usable is not None else UNKNOWN
        rows.append([s.name, str(len(s.pools)), _n(s.total), capacity, _n(s.headroom), _status(s)])
    return _table(["SERVER", "POOLS", "TOTAL MAX", usable, "HEADROOM", "STATUS"], rows, {1, 2, 4})


TIER_1 = ("Tier 1, app pools -> PgBouncer: against max_client_conn, and per session-mode database against "
          "its server pools")
TIER_2 = "Tier 2, pools -> PostgreSQL: PgBouncer's server pools count pool_size + reserve, capped by max_db_connections"


def render(servers: dict[str, Server]) -> str:
    pools = sorted((p for s in servers.values() if s.tier != SESSION for p in s.pools),
                   key=lambda p: (p.server, p.instance, p.pool, p.kind, p.worker))
    lines = _table(["INSTANCE", "WORKER", "POOL", "KIND", "SERVER", "MAX"],
                   [[p.instance, p.worker or "-", p.pool, p.kind, p.server, _n(p.max)] for p in pools], {5})
    for s in sorted(servers.values(), key=lambda s: s.name):
        for (address, database), (total, cap) in sorted(s.capped().items()):
            lines.append(f"(PgBouncer {address} database {database}: its server pools add up to {_n(total)}, "
                         f"max_db_connections caps them at {cap})")
    lines.append("")
    postgres = [s for s in servers.values() if s.tier == POSTGRES]
    if len(postgres) == len(servers):  # no PgBouncer in sight: one table, as before
        lines += _servers(postgres, "USABLE")
    else:
        lines += [TIER_1, *_servers((s for s in servers.values() if s.tier != POSTGRES), "CAPACITY"), ""]
        lines += [TIER_2, *_servers(postgres, "USABLE")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
