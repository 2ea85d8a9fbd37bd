"""PgBouncer source: pools, databases, stats and capacity from the admin console (psycopg, simple query protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Awaitable, Iterable, Mapping, TypeVar

from .. import conninfo
from ..families import Families
from ..redact import scrub, server_label
from ..snapshot import PoolSnapshot
from .postgres import APPLICATION_NAME, OTHER, ServerUnavailable, sanitize

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

# SHOW STATS totals -> (counter name without _total, factor to base units, help). PgBouncer reports
# times in microseconds. Columns absent from the running version are simply not exported.
STATS_COLUMNS: dict[str, tuple[str, float, str]] = {
    "total_xact_count": ("dbpool_pgbouncer_transactions", 1.0, "SQL transactions pooled."),
    "total_query_count": ("dbpool_pgbouncer_queries", 1.0, "SQL commands pooled."),
    "total_received": ("dbpool_pgbouncer_received_bytes", 1.0, "Network traffic received from clients."),
    "total_sent": ("dbpool_pgbouncer_sent_bytes", 1.0, "Network traffic sent to clients."),
    "total_xact_time": ("dbpool_pgbouncer_transaction_seconds", 1e-6,
                        "Time connected to PostgreSQL in a transaction (idle in transaction or querying)."),
    "total_query_time": ("dbpool_pgbouncer_query_seconds", 1e-6, "Time actively executing queries on PostgreSQL."),
    "total_wait_time": ("dbpool_pgbouncer_client_wait_seconds", 1e-6,
                        "Time clients spent waiting for a server connection (counted when they get one)."),
    # 1.23+
    "total_server_assignment_count": ("dbpool_pgbouncer_server_assignments", 1.0,
                                      "Times a server connection was assigned to a client."),
    # 1.24+ (prepared statement tracking, max_prepared_statements)
    "total_client_parse_count": ("dbpool_pgbouncer_client_parses", 1.0, "Prepared statements created by clients."),
    "total_server_parse_count": ("dbpool_pgbouncer_server_parses", 1.0,
                                 "Prepared statements PgBouncer created on servers."),
    "total_bind_count": ("dbpool_pgbouncer_binds", 1.0, "Prepared statements bound by clients."),
    # 1.25+
    "total_client_login_count": ("dbpool_pgbouncer_client_logins", 1.0, "Successful client logins."),
}

# SHOW POOLS state columns, in PgBouncer's own spelling minus the prefix. The cancel columns exist from 1.18.
CLIENT_STATES = ("active", "waiting", "active_cancel_req", "waiting_cancel_req")
SERVER_STATES = ("active", "idle", "used", "tested", "login", "active_cancel", "being_canceled")
# Server connections that are open but not serving a client: they fill the pool's slots all the same.
# sv_active_cancel is left out: a short-lived extra connection that carries a cancel request, outside pool_size.
_SERVER_NOT_ACTIVE = ("idle", "used", "tested", "login", "being_canceled")

# SHOW CONFIG keys exported as capacity gauges (0 means "no limit" for the max_* ones, as in pgbouncer.ini).
CONFIG_GAUGES: dict[str, tuple[str, str]] = {
    "max_client_conn": ("dbpool_pgbouncer_max_client_connections",
                        "max_client_conn: client connections PgBouncer accepts before refusing more."),
    "default_pool_size": ("dbpool_pgbouncer_default_pool_size",
                          "default_pool_size: server connections per database/user pool unless overridden."),
    "max_db_connections": ("dbpool_pgbouncer_max_db_connections",
                           "max_db_connections default: server connections per database (0 = no limit)."),
    "max_user_connections": ("dbpool_pgbouncer_max_user_connections",
                             "max_user_connections default: server connections per user (0 = no limit)."),
    "reserve_pool_size": ("dbpool_pgbouncer_reserve_pool_size",
                          "reserve_pool_size default: extra server connections a pool may open under pressure."),
    # 1.24+
    "max_db_client_connections": ("dbpool_pgbouncer_max_db_client_connections",
                                  "max_db_client_connections default: client connections per database (0 = no "
                                  "limit)."),
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
        out.info("dbpool_pgbouncer", "Static facts about a PgBouncer: its version and default pool_mode.",
                 {**me, "version": self.version, "pool_mode": self.pool_mode})
        config = dict(self.config)
        for key, (metric, doc) in CONFIG_GAUGES.items():
            if key in config:
                out.gauge(metric, doc, me, config[key])
        out.gauge("dbpool_pgbouncer_client_connections",
                  "Client connections to PgBouncer now (SHOW LISTS used_clients), compared with max_client_conn.",
                  me, self.client_connections)
        if config.get("max_client_conn"):
            out.gauge("dbpool_pgbouncer_client_usage_ratio", "Client connections / max_client_conn, 0..1.", me,
                      self.client_connections / config["max_client_conn"])
        for item, count in self.lists:
            out.gauge("dbpool_pgbouncer_list_items", "SHOW LISTS: PgBouncer's internal object counts.",
                      {**me, "list": item}, count)
        for db in self.databases:
            labels = {**me, "database": db.name}
            out.info("dbpool_pgbouncer_database",
                     "A PgBouncer database entry: the real server (host:port) and database behind it.",
                     {**labels, "server": db.server, "server_database": db.server_database,
                      "pool_mode": db.pool_mode})
            for metric, value, doc in (
                ("dbpool_pgbouncer_database_pool_size", db.pool_size,
                 "Server connections per pool of this database (pool_size, else default_pool_size)."),
                ("dbpool_pgbouncer_database_min_pool_size", db.min_pool_size,
                 "Server connections PgBouncer keeps open per pool of this database."),
                ("dbpool_pgbouncer_database_reserve_pool_size", db.reserve_pool_size,
                 "Extra server connections per pool of this database once clients wait reserve_pool_timeout."),
                ("dbpool_pgbouncer_database_max_connections", db.max_connections,
                 "Server connections this database may open across its pools (max_db_connections, 0 = no limit)."),
                ("dbpool_pgbouncer_database_server_connections", db.current_connections,
                 "Server connections this database has open now."),
                ("dbpool_pgbouncer_database_paused", db.paused, "1 while the database is PAUSEd."),
                ("dbpool_pgbouncer_database_disabled", db.disabled, "1 while the database is DISABLEd."),
            ):
                out.gauge(metric, doc, labels, value)
        for database, metric, value in self.stats:
            out.counter(metric, STATS_HELP[metric], {**me, "database": database}, value)
        for pool in self.pools:
            pool_name = f"{name}/{pool.database}/{pool.user}"
            pool.view.emit(pool_name, out)
            labels = {"pool": pool_name, "kind": KIND}
            out.info("dbpool_pgbouncer_pool", "Which PgBouncer, database and user a pgbouncer pool belongs to.",
                     {**labels, **me, "database": pool.database, "user": pool.user, "pool_mode": pool.pool_mode})
            out.gauge("dbpool_oldest_pending_acquire_age_seconds",
                      "How long the longest-waiting caller has been waiting for a connection (0 when none waits).",
                      labels, pool.maxwait)
            for state, count in pool.clients:
                out.gauge("dbpool_pgbouncer_pool_clients", "Client connections of a PgBouncer pool, by state.",
                          {**labels, "state": state}, count)
            for state, count in pool.servers:
                out.gauge("dbpool_pgbouncer_pool_servers", "Server connections of a PgBouncer pool, by state.",
                          {**labels, "state": state}, count)
        for label, count in self.folded:
            out.gauge("dbpool_pgbouncer_folded_values",
                      "Distinct label values folded into 'other' by the cardinality cap.", {**me, "label": label},
                      count)


STATS_HELP = {metric: doc for metric, _, doc in STATS_COLUMNS.values()}


def _top(counts: Mapping[str, float], cap: int) -> set[str]:
    # Busiest first; ties broken by name so the kept set does not flap between polls.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {value for value, _ in ranked[:cap]}


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
    keep_db, keep_user = _top(activity_db, max_label_values), _top(activity_user, max_label_values)

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
        for column, (metric, factor, _) in STATS_COLUMNS.items():
            if column in r:
                stats_acc[(database, metric)] += _num(r[column]) * factor

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
    try:
        params = conninfo.parse(dsn)  # libpq's grammar; psycopg is loaded only when the source connects
    except ValueError:
        raise ValueError("not a valid PostgreSQL connection string (URI or key=value conninfo)") from None
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
        self._secrets = tuple(s for s in (dsn, self._params.get("password")) if s and len(s) >= 4)
        self._conn: Any = None  # psycopg.AsyncConnection
        self._version = ""
        self._failures = 0
        self._retry_at = 0.0
        self._connect_error = ""

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return scrub(text)

    @staticmethod
    def _detail(e: BaseException) -> str:
        return f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__

    async def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        if self._conn is not None and not self._conn.closed:
            return self._conn
        if time.monotonic() < self._retry_at:
            # Same message as the failure that started the wait, so the poller logs it only once.
            raise ServerUnavailable(self._connect_error)
        params = {**self._params, "application_name": APPLICATION_NAME,
                  # libpq rounds below 2 s up to 2; the asyncio bound below is the exact one.
                  "connect_timeout": str(max(2, round(self.connect_timeout)))}
        conn = None
        try:
            # autocommit: otherwise psycopg sends BEGIN first ("invalid command 'BEGIN'", says the console).
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(autocommit=True, prepare_threshold=None, row_factory=dict_row,
                                                **params),
                self.connect_timeout)
            rows = await self._bounded(conn, self._show(conn, "VERSION"), self.connect_timeout)
        except Exception as e:  # refused, timed out, auth, not a PgBouncer: all mean "retry later"
            if conn is not None:
                conn.pgconn.finish()
            self._failures += 1
            delay = self.interval * 2 ** min(self._failures - 1, 32)
            self._retry_at = time.monotonic() + min(self.backoff_max, delay)
            if isinstance(e, asyncio.TimeoutError):
                detail = f"no reply within {self.connect_timeout:g} s (connect_timeout)"
            else:
                detail = self._detail(e)
            self._connect_error = self._redact(f"cannot connect to PgBouncer {self.pgbouncer}: {detail}")
            raise ServerUnavailable(self._connect_error) from None
        match = _VERSION.search(str(rows[0]["version"])) if rows else None
        self._version = match.group(1) if match else ""
        self._conn = conn
        self._failures, self._retry_at, self._connect_error = 0, 0.0, ""
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
            if isinstance(e, asyncio.TimeoutError):
                detail = f"no reply within {self.statement_timeout:g} s (statement_timeout)"
            else:
                detail = self._detail(e)
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
