"""PgBouncer source: pools, databases, stats and capacity from the admin console (psycopg, simple query protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Awaitable, Iterable, Mapping, TypeVar

from .. import metrics as m
from ..families import Families
from ..metrics import MetricSpec
from ..redact import parse_dsn, redact, secrets, server_label
from ..snapshot import PoolSnapshot
from .postgres import APPLICATION_NAME, OTHER, Backoff, ServerUnavailable, describe, sanitize, top_values

T = TypeVar("T")
ADMIN_DATABASE = "pgbouncer"
KIND = "pgbouncer"

# The admin console speaks only the simple query protocol ("extended query protocol not supported by
# admin console"): asyncpg's fetch() always uses the extended one, and its simple-protocol execute()
# drops the rows. psycopg 3 sends a query that has no parameters with the simple protocol, so each
# command below goes out as one plain Query message -- as long as automatic preparation is off
# (prepare_threshold=None): by default psycopg prepares a query on its 5th run, which the console
# refuses with the same error.
QUERIES = ("POOLS", "DATABASES", "STATS", "CONFIG", "LISTS", "USERS")

# SHOW STATS totals -> (catalogue entry, factor to base units). PgBouncer reports times in microseconds.
# Columns absent from the running version are simply not exported.
STATS_COLUMNS: dict[str, tuple[MetricSpec, float]] = {
    "total_xact_count": (m.BOUNCER_TRANSACTIONS, 1.0),
    "total_query_count": (m.BOUNCER_QUERIES, 1.0),
    "total_received": (m.BOUNCER_RECEIVED, 1.0),
    "total_sent": (m.BOUNCER_SENT, 1.0),
    "total_xact_time": (m.BOUNCER_TRANSACTION_TIME, 1e-6),
    "total_query_time": (m.BOUNCER_QUERY_TIME, 1e-6),
    "total_wait_time": (m.BOUNCER_CLIENT_WAIT_TIME, 1e-6),
    # 1.23+
    "total_server_assignment_count": (m.BOUNCER_SERVER_ASSIGNMENTS, 1.0),
    # 1.24+ (prepared statement tracking, max_prepared_statements)
    "total_client_parse_count": (m.BOUNCER_CLIENT_PARSES, 1.0),
    "total_server_parse_count": (m.BOUNCER_SERVER_PARSES, 1.0),
    "total_bind_count": (m.BOUNCER_BINDS, 1.0),
    # 1.25+
    "total_client_login_count": (m.BOUNCER_CLIENT_LOGINS, 1.0),
}

# SHOW POOLS state columns, in PgBouncer's own spelling minus the prefix. The cancel columns exist from 1.18.
CLIENT_STATES = ("active", "waiting", "active_cancel_req", "waiting_cancel_req")
SERVER_STATES = ("active", "idle", "used", "tested", "login", "active_cancel", "being_canceled")
# Server connections that are open but not serving a client: they fill the pool's slots all the same.
# sv_active_cancel is left out: a short-lived extra connection that carries a cancel request, outside pool_size.
_SERVER_NOT_ACTIVE = ("idle", "used", "tested", "login", "being_canceled")

# SHOW CONFIG keys exported as capacity gauges (0 means "no limit" for the max_* ones, as in pgbouncer.ini).
CONFIG_GAUGES: dict[str, MetricSpec] = {
    "max_client_conn": m.BOUNCER_MAX_CLIENT_CONNECTIONS,
    "default_pool_size": m.BOUNCER_DEFAULT_POOL_SIZE,
    "max_db_connections": m.BOUNCER_MAX_DB_CONNECTIONS,
    "max_user_connections": m.BOUNCER_MAX_USER_CONNECTIONS,
    "reserve_pool_size": m.BOUNCER_RESERVE_POOL_SIZE,
    # 1.24+
    "max_db_client_connections": m.BOUNCER_MAX_DB_CLIENT_CONNECTIONS,
}

_VERSION = re.compile(r"(\d+\.\d+(?:\.\d+)?)")


def _num(value: Any) -> float:
    """PgBouncer sends counts as int4/int8 and, from 1.8 on, stats as numeric (Decimal to psycopg)."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, (int, float, Decimal)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return 0.0


def _int(value: Any) -> int:
    return int(_num(value))


@dataclass(frozen=True, slots=True)
class PgBouncerPool:
    """One PgBouncer pool (a database/user pair): its pool-vocabulary view and PgBouncer's own counts."""

    database: str
    user: str
    clients: tuple[tuple[str, int], ...]
    servers: tuple[tuple[str, int], ...]
    maxwait: float
    pool_mode: str
    view: PoolSnapshot


@dataclass(frozen=True, slots=True)
class PgBouncerDatabase:
    """One [databases] entry: where it points and its limits."""

    name: str
    server: str
    server_database: str
    pool_mode: str
    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    max_connections: int
    current_connections: int
    paused: int
    disabled: int


@dataclass(frozen=True, slots=True)
class PgBouncerSnapshot:
    """One PgBouncer at one instant."""

    pgbouncer: str  # its own host:port, as the application pools that connect to it name it
    version: str
    pool_mode: str
    config: tuple[tuple[str, float], ...]
    lists: tuple[tuple[str, int], ...]
    pools: tuple[PgBouncerPool, ...]
    databases: tuple[PgBouncerDatabase, ...]
    # (database, counter name, value in base units)
    stats: tuple[tuple[str, str, float], ...]
    folded: tuple[tuple[str, int], ...]

    @property
    def client_connections(self) -> int:
        # used_clients counts every client connection, logging in or not (our own included): the
        # figure PgBouncer compares with max_client_conn.
        return dict(self.lists).get("used_clients", 0)

    def emit(self, name: str, out: Families) -> None:
        me = {"pgbouncer": self.pgbouncer}
        out.info(m.BOUNCER_INFO, {**me, "version": self.version, "pool_mode": self.pool_mode})
        config = dict(self.config)
        for key, spec in CONFIG_GAUGES.items():
            if key in config:
                out.gauge(spec, me, config[key])
        out.gauge(m.BOUNCER_CLIENT_CONNECTIONS, me, self.client_connections)
        if config.get("max_client_conn"):
            out.gauge(m.BOUNCER_CLIENT_USAGE_RATIO, me, self.client_connections / config["max_client_conn"])
        for item, count in self.lists:
            out.gauge(m.BOUNCER_LIST_ITEMS, {**me, "list": item}, count)
        for db in self.databases:
            labels = {**me, "database": db.name}
            out.info(m.BOUNCER_DATABASE_INFO, {**labels, "server": db.server, "server_database": db.server_database,
                                               "pool_mode": db.pool_mode})
            for spec, value in (
                (m.BOUNCER_DATABASE_POOL_SIZE, db.pool_size),
                (m.BOUNCER_DATABASE_MIN_POOL_SIZE, db.min_pool_size),
                (m.BOUNCER_DATABASE_RESERVE_POOL_SIZE, db.reserve_pool_size),
                (m.BOUNCER_DATABASE_MAX_CONNECTIONS, db.max_connections),
                (m.BOUNCER_DATABASE_SERVER_CONNECTIONS, db.current_connections),
                (m.BOUNCER_DATABASE_PAUSED, db.paused),
                (m.BOUNCER_DATABASE_DISABLED, db.disabled),
            ):
                out.gauge(spec, labels, value)
        for database, metric, total in self.stats:
            out.counter(m.get(metric), {**me, "database": database}, total)
        for pool in self.pools:
            pool_name = f"{name}/{pool.database}/{pool.user}"
            pool.view.emit(pool_name, out)
            labels = {"pool": pool_name, "kind": KIND}
            out.info(m.BOUNCER_POOL_INFO,
                     {**labels, **me, "database": pool.database, "user": pool.user, "pool_mode": pool.pool_mode})
            out.gauge(m.OLDEST_PENDING_AGE, labels, pool.maxwait)
            for state, count in pool.clients:
                out.gauge(m.BOUNCER_POOL_CLIENTS, {**labels, "state": state}, count)
            for state, count in pool.servers:
                out.gauge(m.BOUNCER_POOL_SERVERS, {**labels, "state": state}, count)
        for label, count in self.folded:
            out.gauge(m.BOUNCER_FOLDED, {**me, "label": label}, count)


def _limit(*caps: int) -> int | None:
    real = [c for c in caps if c > 0]
    return min(real) if real else None


def build_snapshot(pgbouncer: str, *, version: str, pools: Iterable[Mapping[str, Any]],
                   databases: Iterable[Mapping[str, Any]], stats: Iterable[Mapping[str, Any]],
                   config: Iterable[Mapping[str, Any]], lists: Iterable[Mapping[str, Any]],
                   users: Iterable[Mapping[str, Any]] = (), max_label_values: int = 50) -> PgBouncerSnapshot:
    """Fold the SHOW results (rows as column -> value mappings) into a snapshot, capping database/user values."""
    settings = {str(r["key"]): r["value"] for r in config}
    numeric = {k: _num(settings[k]) for k in CONFIG_GAUGES if k in settings}
    default_mode = str(settings.get("pool_mode") or "session")
    wait_timeout = _num(settings.get("query_wait_timeout"))
    max_user = _int(settings.get("max_user_connections"))

    # The console's own pseudo-database (and our own connection's pool in it) is not a pool anyone sizes.
    dbs = [r for r in databases if r["name"] != ADMIN_DATABASE or r.get("host")]
    pool_rows = [r for r in pools if r["database"] != ADMIN_DATABASE]
    stat_rows = [r for r in stats if r["database"] != ADMIN_DATABASE]

    activity_db: dict[str, float] = defaultdict(float)
    activity_user: dict[str, float] = defaultdict(float)
    for r in pool_rows:
        busy = sum(_num(r.get(f"cl_{s}")) for s in CLIENT_STATES) + sum(_num(r.get(f"sv_{s}")) for s in SERVER_STATES)
        activity_db[sanitize(str(r["database"]))] += busy
        activity_user[sanitize(str(r["user"]))] += busy
    for r in dbs:
        activity_db[sanitize(str(r["name"]))] += _num(r.get("current_connections"))
    for r in stat_rows:
        activity_db.setdefault(sanitize(str(r["database"])), 0.0)
    keep_db, keep_user = top_values(activity_db, max_label_values), top_values(activity_user, max_label_values)

    def db_name(raw: Any) -> str:
        value = sanitize(str(raw))
        return value if value in keep_db else OTHER

    # Per-user pool_size (1.23+) and reserve_pool_size (1.24+) override the database's; NULL when unset.
    user_pool = {str(r["name"]): r for r in users}

    databases_out: dict[str, PgBouncerDatabase] = {}
    by_db: dict[str, Mapping[str, Any]] = {}
    for r in dbs:
        name = db_name(r["name"])
        # reserve_pool until 1.23, reserve_pool_size from 1.24.
        reserve = r.get("reserve_pool_size", r.get("reserve_pool"))
        entry = PgBouncerDatabase(
            name=name, server=server_label(r.get("host"), r.get("port")) or "",
            server_database=sanitize(str(r.get("database") or r["name"])),
            pool_mode=str(r.get("pool_mode") or default_mode), pool_size=_int(r.get("pool_size")),
            min_pool_size=_int(r.get("min_pool_size")), reserve_pool_size=_int(reserve),
            max_connections=_int(r.get("max_connections")), current_connections=_int(r.get("current_connections")),
            paused=_int(r.get("paused")), disabled=_int(r.get("disabled")))
        if name in databases_out:  # folded into "other": add up what adds up
            old = databases_out[name]
            entry = PgBouncerDatabase(
                name=name, server="", server_database="", pool_mode="", pool_size=old.pool_size + entry.pool_size,
                min_pool_size=old.min_pool_size + entry.min_pool_size,
                reserve_pool_size=old.reserve_pool_size + entry.reserve_pool_size,
                max_connections=old.max_connections + entry.max_connections,
                current_connections=old.current_connections + entry.current_connections,
                paused=max(old.paused, entry.paused), disabled=max(old.disabled, entry.disabled))
        databases_out[name] = entry
        by_db.setdefault(sanitize(str(r["name"])), r)

    folded_pools: dict[tuple[str, str], dict[str, Any]] = {}
    for r in pool_rows:
        raw_db, raw_user = sanitize(str(r["database"])), sanitize(str(r["user"]))
        key = (raw_db if raw_db in keep_db else OTHER, raw_user if raw_user in keep_user else OTHER)
        acc = folded_pools.setdefault(key, {"clients": defaultdict(int), "servers": defaultdict(int), "maxwait": 0.0,
                                            "max": 0, "min": 0, "unbounded": False, "modes": set(), "targets": set()})
        for s in CLIENT_STATES:
            acc["clients"][s] += _int(r.get(f"cl_{s}"))
        for s in SERVER_STATES:
            acc["servers"][s] += _int(r.get(f"sv_{s}"))
        acc["maxwait"] = max(acc["maxwait"], _num(r.get("maxwait")) + _num(r.get("maxwait_us")) / 1e6)
        db = by_db.get(raw_db, {})
        override = user_pool.get(str(r["user"]), {})
        size = override.get("pool_size")
        size = _int(size if size is not None else db.get("pool_size", numeric.get("default_pool_size", 0)))
        reserve = override.get("reserve_pool_size")
        if reserve is None:
            reserve = db.get("reserve_pool_size", db.get("reserve_pool", numeric.get("reserve_pool_size", 0)))
        # The pool can open pool_size + reserve, and never more than the database's or the user's cap.
        cap = _limit(_int(db.get("max_connections")), max_user)
        hard = size + _int(reserve)
        acc["max"] += min(hard, cap) if cap is not None else hard
        acc["min"] += _int(db.get("min_pool_size"))
        acc["modes"].add(str(r.get("pool_mode") or db.get("pool_mode") or default_mode))
        acc["targets"].add((server_label(db.get("host"), db.get("port")) if db else None,
                            str(db.get("database") or raw_db) if db else None))

    pools_out = []
    for (database, user), acc in sorted(folded_pools.items()):
        servers = acc["servers"]
        target = next(iter(acc["targets"])) if len(acc["targets"]) == 1 else (None, None)
        mode = next(iter(acc["modes"])) if len(acc["modes"]) == 1 else OTHER
        view = PoolSnapshot(
            kind=KIND, pool_class="PgBouncer", checked_out=servers["active"],
            idle=sum(servers[s] for s in _SERVER_NOT_ACTIVE), min=acc["min"], max=acc["max"],
            # query_wait_timeout is how long a client may queue before PgBouncer disconnects it (0 = forever).
            timeout=wait_timeout or None, pending=acc["clients"]["waiting"],
            server=target[0], database=target[1] and sanitize(target[1]))
        pools_out.append(PgBouncerPool(
            database=database, user=user, clients=tuple((s, acc["clients"][s]) for s in CLIENT_STATES),
            servers=tuple((s, servers[s]) for s in SERVER_STATES), maxwait=acc["maxwait"], pool_mode=mode,
            view=view))

    stats_acc: dict[tuple[str, str], float] = defaultdict(float)
    for r in stat_rows:
        database = db_name(r["database"])
        for column, (spec, factor) in STATS_COLUMNS.items():
            if column in r:
                stats_acc[(database, spec.name)] += _num(r[column]) * factor

    lists_out = tuple((str(r["list"]), _int(r["items"])) for r in lists)
    all_dbs = {sanitize(str(r["name"])) for r in dbs} | set(activity_db)
    folded = (("database", len(all_dbs - keep_db)), ("user", len(set(activity_user) - keep_user)))
    return PgBouncerSnapshot(
        pgbouncer=pgbouncer, version=version, pool_mode=default_mode, config=tuple(sorted(numeric.items())),
        lists=lists_out, pools=tuple(pools_out), databases=tuple(databases_out[k] for k in sorted(databases_out)),
        stats=tuple((db, metric, value) for (db, metric), value in sorted(stats_acc.items())), folded=folded)


def connect_params(dsn: str) -> dict[str, str]:
    """libpq-parsed parameters of the admin console DSN; ``dbname`` must be (and defaults to) ``pgbouncer``.

    Raises ``ValueError`` with a message that never quotes the DSN.
    """
    params = parse_dsn(dsn)
    dbname = params.setdefault("dbname", ADMIN_DATABASE)
    if dbname != ADMIN_DATABASE:
        raise ValueError(f"dbname must be {ADMIN_DATABASE!r} (PgBouncer's admin console), got {sanitize(dbname)!r}")
    return params


class PgBouncerSource:
    """One persistent admin-console connection per PgBouncer, reconnected with capped exponential backoff.

    The role needs to be in PgBouncer's ``stats_users`` (read-only SHOW commands) or ``admin_users``.
    """

    kind = KIND

    def __init__(self, name: str, dsn: str, *, interval: float = 10.0, statement_timeout: float = 5.0,
                 connect_timeout: float = 5.0, max_label_values: int = 50, backoff_max: float = 30.0) -> None:
        self.name = name
        self.interval = interval
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.max_label_values = max_label_values
        self.backoff_max = backoff_max
        self._params = connect_params(dsn)
        self.pgbouncer = server_label(self._params.get("host") or self._params.get("hostaddr"),
                                      self._params.get("port")) or ""
        self._secrets = secrets(dsn, self._params.get("password"))
        self._conn: Any = None  # psycopg.AsyncConnection
        self._version = ""
        self._backoff = Backoff(interval, backoff_max)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    async def _connect(self) -> Any:
        import psycopg
        from psycopg.conninfo import make_conninfo
        from psycopg.rows import dict_row

        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._backoff.check()
        params = {**self._params, "application_name": APPLICATION_NAME,
                  # libpq rounds below 2 s up to 2; the asyncio bound below is the exact one.
                  "connect_timeout": str(max(2, round(self.connect_timeout)))}
        conn = None
        try:
            # autocommit: otherwise psycopg sends BEGIN first ("invalid command 'BEGIN'", says the console).
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(make_conninfo("", **params), autocommit=True,
                                                prepare_threshold=None, row_factory=dict_row),
                self.connect_timeout)
            rows = await self._bounded(conn, self._show(conn, "VERSION"), self.connect_timeout)
        except Exception as e:  # refused, timed out, auth, not a PgBouncer: all mean "retry later"
            if conn is not None:
                conn.pgconn.finish()
            detail = describe(e, f"no reply within {self.connect_timeout:g} s (connect_timeout)")
            message = self._redact(f"cannot connect to PgBouncer {self.pgbouncer}: {detail}")
            raise self._backoff.failed(message) from None
        match = _VERSION.search(str(rows[0]["version"])) if rows else None
        self._version = match.group(1) if match else ""
        self._conn = conn
        self._backoff.succeeded()
        return conn

    @staticmethod
    async def _show(conn: Any, what: str) -> list[dict[str, Any]]:
        # No parameters: psycopg sends this as a simple Query message, the only kind the console accepts.
        cur = await conn.execute(f"SHOW {what}")
        return await cur.fetchall()

    async def _read(self, conn: Any) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for what in QUERIES:
            out[what] = await self._show(conn, what)
        return out

    @staticmethod
    async def _bounded(conn: Any, work: Awaitable[T], timeout: float) -> T:
        """The console has no statement_timeout: bound the round trip here instead."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        finally:
            if not task.done():
                # Close first, cancel second: cancelled mid-query, psycopg would send a cancel request
                # and wait for the query to end, 10 s on a PgBouncer that has stopped answering. On a
                # closed connection it gives up at once.
                conn.pgconn.finish()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task not in done:
            raise asyncio.TimeoutError
        return task.result()

    async def poll(self) -> PgBouncerSnapshot:
        conn = await self._connect()
        try:
            rows = await self._bounded(conn, self._read(conn), self.statement_timeout)
        except Exception as e:
            self._drop()
            detail = describe(e, f"no reply within {self.statement_timeout:g} s (statement_timeout)")
            raise ServerUnavailable(self._redact(f"SHOW failed on PgBouncer {self.pgbouncer}: {detail}")) from None
        return build_snapshot(self.pgbouncer, version=self._version, pools=rows["POOLS"],
                              databases=rows["DATABASES"], stats=rows["STATS"], config=rows["CONFIG"],
                              lists=rows["LISTS"], users=rows["USERS"], max_label_values=self.max_label_values)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            # PQfinish sends Terminate and closes the socket; it never blocks on the peer.
            conn.pgconn.finish()

    async def aclose(self) -> None:
        self._drop()

    def close(self) -> None:
        """Close from any thread: ``AsyncConnection.close`` is ``PQfinish`` underneath, with nothing to await."""
        self._drop()
