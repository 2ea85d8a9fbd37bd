"""PostgreSQL server source: client backends from ``pg_stat_activity`` and connection capacity (asyncpg)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping
from urllib.parse import urlencode

from .. import metrics as m
from ..families import Families
from ..redact import parse_dsn, redact, secrets, server_label

if TYPE_CHECKING:
    # Imported where a connection is made: validating a config, or a daemon watching only PgBouncers,
    # never loads asyncpg (4 MB resident).
    import asyncpg

APPLICATION_NAME = "dbpool-exporter"

# Every state pg_stat_activity reports for a client backend, in its own spelling; each is exported
# (0 included) so a rate or ratio over a state never sees a series vanish.
STATES = ("active", "idle", "idle in transaction", "idle in transaction (aborted)",
          "fastpath function call", "disabled")
# Rows whose state we cannot see: the exporter's role lacks pg_read_all_stats (grant pg_monitor).
UNKNOWN_STATE = "unknown"
OTHER = "other"
# A real user or application_name spelled like the folded bucket ("other", "other'", ...) gets one more
# quote, so it never merges with the values folded into OTHER.
_LIKE_OTHER = re.compile(r"other'*")

# One round trip per poll. Grouped in SQL so the result stays small however many backends there are;
# the per-(database, application_name) and per-database figures are folded from these rows in Python.
ACTIVITY_SQL = """
SELECT
    -- NULL for a backend still authenticating; '' keeps it a valid label value.
    coalesce(datname, '') AS database,
    coalesce(usename, '') AS "user",
    coalesce(application_name, '') AS application_name,
    -- NULL when our role may not see other roles' state (no pg_read_all_stats).
    state,
    count(*) AS connections,
    -- now() is our statement's start; pg_stat_activity is sampled just after it, so a transaction
    -- begun in between would come out slightly negative: clamp at 0.
    greatest(max(extract(epoch FROM now() - xact_start)), 0)::float8 AS oldest_xact_age,
    -- state_change is when the backend went idle in transaction: the time it has held locks for nothing.
    greatest(max(extract(epoch FROM now() - state_change))
             FILTER (WHERE state IN ('idle in transaction', 'idle in transaction (aborted)')), 0)::float8
        AS oldest_idle_xact_age,
    count(*) FILTER (WHERE wait_event_type = 'Lock') AS lock_waiting
FROM pg_stat_activity
-- Client backends only: autovacuum, walsenders and background workers don't take pool slots the same way.
WHERE (backend_type = 'client backend'
       -- Without pg_read_all_stats, other roles' rows hide backend_type (and state) too. A row still
       -- showing a database and a role is a client backend (or, rarely, a parallel worker): count it,
       -- as state 'unknown', rather than silently undercount the server.
       OR (backend_type IS NULL AND datname IS NOT NULL AND usesysid IS NOT NULL))
  -- Our own connection would always show as one active backend under our application_name.
  AND pid <> pg_backend_pid()
GROUP BY 1, 2, 3, 4
"""

# All three are postmaster-context settings: they change only with a restart, which also drops our
# connection, so they are read once per connection rather than once per poll.
# reserved_connections exists from PostgreSQL 16 on; on older servers the row is simply absent.
CAPACITY_SQL = """
SELECT name, setting::int AS value
FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')
"""

MAX_LABEL_LENGTH = 128
# How long one connection attempt may go on in the background before it is given up (see _connect).
CONNECT_ATTEMPT_MAX = 60.0
LIBPQ_CLIENT_ONLY = frozenset({
    "application_name", "fallback_application_name", "connect_timeout", "hostaddr", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "channel_binding",
    "gssencmode", "sslcompression", "sslsni", "requirepeer", "require_auth", "load_balance_hosts",
    "client_encoding", "replication", "gssdelegation", "sslcertmode",
})


def sanitize(value: str, limit: int = MAX_LABEL_LENGTH) -> str:
    """Keep a label value bounded: any string is valid in Prometheus, but not any length."""
    value = "".join(ch if ch.isprintable() else "?" for ch in value[:limit])
    return value


def _apart_from_other(value: str) -> str:
    return value + "'" if _LIKE_OTHER.fullmatch(value) else value


class ServerUnavailable(Exception):
    """Raised while the source is waiting to reconnect; carries the last connect error, unchanged."""


def describe(e: BaseException, timeout: str) -> str:
    """One line for a failed connect or query: ``timeout`` for an asyncio timeout, else the error's first line."""
    if isinstance(e, asyncio.TimeoutError):
        return timeout
    return f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__


class Backoff:
    """After a failed connect, wait ``interval``, then twice that, ... up to ``cap`` before the next attempt.

    While waiting, polls fail with the message of the failure that started the wait, so the poller logs it once.
    """

    def __init__(self, interval: float, cap: float) -> None:
        self.interval, self.cap = interval, cap
        self.failures, self.retry_at, self.error = 0, 0.0, ""

    def check(self) -> None:
        if time.monotonic() < self.retry_at:
            raise ServerUnavailable(self.error)

    def failed(self, message: str) -> ServerUnavailable:
        self.failures += 1
        # Exponent capped: a server down for days must not overflow the float.
        delay = self.interval * 2 ** min(self.failures - 1, 32)
        self.retry_at, self.error = time.monotonic() + min(self.cap, delay), message
        return ServerUnavailable(message)

    def succeeded(self) -> None:
        self.failures, self.retry_at, self.error = 0, 0.0, ""


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """One server at one instant: capacity, client backends by labels, transaction ages, lock waiters."""

    server: str
    max_connections: int
    reserved_connections: int
    # (database, user, application_name, state) -> count; every known state present.
    connections: tuple[tuple[str, str, str, str, int], ...]
    # (database, application_name) -> seconds
    oldest_xact_age: tuple[tuple[str, str, float], ...]
    oldest_idle_xact_age: tuple[tuple[str, str, float], ...]
    # database -> backends waiting on a heavyweight lock
    lock_waiting: tuple[tuple[str, int], ...]
    # label name -> distinct values folded into "other"
    folded: tuple[tuple[str, int], ...]

    @property
    def usable_connections(self) -> int:
        return max(0, self.max_connections - self.reserved_connections)

    def emit(self, name: str, out: Families) -> None:
        # No `source` label: server series join pool series on `server` alone, whichever source read them.
        server = {"server": self.server}
        out.gauge(m.SERVER_MAX, server, self.max_connections)
        out.gauge(m.SERVER_RESERVED, server, self.reserved_connections)
        out.gauge(m.SERVER_USABLE, server, self.usable_connections)
        for database, user, app, state, count in self.connections:
            out.gauge(m.SERVER_CONNECTIONS,
                      {**server, "database": database, "user": user, "application_name": app, "state": state},
                      count)
        for database, app, age in self.oldest_xact_age:
            out.gauge(m.SERVER_OLDEST_XACT, {**server, "database": database, "application_name": app}, age)
        for database, app, age in self.oldest_idle_xact_age:
            out.gauge(m.SERVER_OLDEST_IDLE_XACT, {**server, "database": database, "application_name": app}, age)
        for database, count in self.lock_waiting:
            out.gauge(m.SERVER_LOCK_WAITING, {**server, "database": database}, count)
        for label, count in self.folded:
            out.gauge(m.SERVER_FOLDED, {**server, "label": label}, count)


def top_values(counts: Mapping[str, float], cap: int) -> set[str]:
    # Busiest first; ties broken by name so the kept set does not flap between polls.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {value for value, _ in ranked[:cap]}


def build_snapshot(server: str, rows: Iterable[Any], capacity: dict[str, int], *,
                   max_label_values: int = 50) -> ServerSnapshot:
    """Fold grouped ``ACTIVITY_SQL`` rows into a snapshot, capping user/application_name cardinality."""
    rows = [(sanitize(r["database"]), _apart_from_other(sanitize(r["user"])),
             _apart_from_other(sanitize(r["application_name"])),
             r["state"] if r["state"] is not None else UNKNOWN_STATE, int(r["connections"]),
             float(r["oldest_xact_age"] or 0.0), float(r["oldest_idle_xact_age"] or 0.0), int(r["lock_waiting"]))
            for r in rows]
    by_user: dict[str, int] = defaultdict(int)
    by_app: dict[str, int] = defaultdict(int)
    for _, user, app, _, count, *_ in rows:
        by_user[user] += count
        by_app[app] += count
    keep_users, keep_apps = top_values(by_user, max_label_values), top_values(by_app, max_label_values)

    connections: dict[tuple[str, str, str, str], int] = defaultdict(int)
    xact: dict[tuple[str, str], float] = defaultdict(float)
    idle_xact: dict[tuple[str, str], float] = defaultdict(float)
    locks: dict[str, int] = defaultdict(int)
    for database, user, app, state, count, xact_age, idle_age, waiting in rows:
        user = user if user in keep_users else OTHER
        app = app if app in keep_apps else OTHER
        for known in STATES:
            connections.setdefault((database, user, app, known), 0)
        connections[(database, user, app, state)] += count
        xact[(database, app)] = max(xact[(database, app)], xact_age)
        idle_xact[(database, app)] = max(idle_xact[(database, app)], idle_age)
        locks[database] += waiting
    folded = (("application_name", len(by_app) - len(keep_apps)), ("user", len(by_user) - len(keep_users)))
    max_connections = capacity.get("max_connections", 0)
    reserved = capacity.get("superuser_reserved_connections", 0) + capacity.get("reserved_connections", 0)
    return ServerSnapshot(
        server=server, max_connections=max_connections, reserved_connections=reserved,
        connections=tuple((*key, count) for key, count in sorted(connections.items())),
        oldest_xact_age=tuple((*key, age) for key, age in sorted(xact.items())),
        oldest_idle_xact_age=tuple((*key, age) for key, age in sorted(idle_xact.items())),
        lock_waiting=tuple(sorted(locks.items())), folded=folded)


def connect_params(dsn: str) -> tuple[str, dict[str, str]]:
    """asyncpg DSN and libpq-parsed parameters of a URI or ``key=value`` conninfo.

    libpq's grammar is the one of record, so the ``server`` label comes out exactly as the pools' does
    (:mod:`..conninfo` parses as libpq does, without loading psycopg into the daemon); asyncpg only reads
    URIs, so the parsed parameters are re-encoded as URI query parameters.
    Raises ``ValueError`` with a message that never quotes the DSN.
    """
    params = parse_dsn(dsn)
    # asyncpg would send any parameter it does not know as a server setting, and the server would refuse
    # libpq's client-side ones; application_name is ours, the timeouts come from the config.
    wire = {k: v for k, v in params.items() if k not in LIBPQ_CLIENT_ONLY}
    if "hostaddr" in params and "host" not in params:
        wire["host"] = params["hostaddr"]
    return "postgresql://?" + urlencode(wire), params


class PostgresSource:
    """One persistent asyncpg connection per server, reconnected with capped exponential backoff.

    Use it in-process too: ``exporter.register("db", PostgresSource("db", dsn))``.
    """

    kind = "postgres"

    def __init__(self, name: str, dsn: str, *, interval: float = 10.0, statement_timeout: float = 5.0,
                 connect_timeout: float = 5.0, max_label_values: int = 50, backoff_max: float = 30.0) -> None:
        self.name = name
        self.interval = interval
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.max_label_values = max_label_values
        self.backoff_max = backoff_max
        self._dsn, params = connect_params(dsn)
        self.server = server_label(params.get("host") or params.get("hostaddr"), params.get("port")) or ""
        self.database = params.get("dbname")
        # Errors are scrubbed generically by the poller; this also catches the exact secret, whatever quoting.
        self._secrets = secrets(dsn, self._dsn, params.get("password"))
        self._conn: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._capacity: dict[str, int] = {}
        self._backoff = Backoff(interval, backoff_max)
        self._connecting: asyncio.Task[tuple[asyncpg.Connection, list[Any]]] | None = None
        self._closed = False

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        attempt = self._connecting
        if attempt is None:
            self._backoff.check()
            attempt = self._connecting = asyncio.get_running_loop().create_task(self._open())
            attempt.add_done_callback(_retrieve)
        # A connect that gets no answer in connect_timeout fails this poll but is not abandoned: while
        # pg_database is locked, a new backend blocks in its start-up, and a client-side timeout does not
        # free it. Starting a fresh attempt each poll left one more blocked backend every time (4 in 20 s);
        # waiting on the same one leaves at most one. It gives up for good after CONNECT_ATTEMPT_MAX.
        done, _ = await asyncio.wait({attempt}, timeout=self.connect_timeout)
        if not done:
            self._backoff.error = self._redact(
                f"cannot connect to {self.server}: no reply within {self.connect_timeout:g} s (connect_timeout)")
            raise ServerUnavailable(self._backoff.error)
        self._connecting = None
        try:
            conn, rows = attempt.result()
        except Exception as e:  # refused, timed out, auth, TLS, "starting up": all mean "retry later"
            detail = describe(e, f"no reply within {self.connect_timeout:g} s (connect_timeout)")
            raise self._backoff.failed(self._redact(f"cannot connect to {self.server}: {detail}")) from None
        if self._closed:  # closed while the attempt was under way
            conn.terminate()
            raise ServerUnavailable(f"source {self.name} is closed")
        self._conn, self._loop = conn, asyncio.get_running_loop()
        self._capacity = {r["name"]: r["value"] for r in rows}
        self._backoff.succeeded()
        return conn

    async def _open(self) -> tuple[asyncpg.Connection, list[Any]]:
        import asyncpg

        conn = await asyncpg.connect(
            self._dsn, timeout=max(CONNECT_ATTEMPT_MAX, self.connect_timeout),
            server_settings={"application_name": APPLICATION_NAME,
                             # Server-side bound: a query stuck on a lock is cancelled by the server.
                             "statement_timeout": str(max(1, round(self.statement_timeout * 1000)))})
        try:
            rows = await conn.fetch(CAPACITY_SQL, timeout=self._client_timeout)
        except BaseException:
            conn.terminate()
            raise
        return conn, rows

    def _cancel_connecting(self) -> None:
        attempt, self._connecting = self._connecting, None
        if attempt is None or attempt.done():
            return
        loop = attempt.get_loop()
        with contextlib.suppress(RuntimeError):  # its loop is closed: nothing runs it any more
            loop.call_soon_threadsafe(attempt.cancel)

    @property
    def _client_timeout(self) -> float:
        # The server cancels at statement_timeout; this bounds a server or network that stops answering.
        return self.statement_timeout + 1.0

    async def poll(self) -> ServerSnapshot:
        from asyncpg import QueryCanceledError

        conn = await self._connect()
        try:
            rows = await conn.fetch(ACTIVITY_SQL, timeout=self._client_timeout)
        except QueryCanceledError as e:
            # statement_timeout: the connection is healthy, only this poll is lost.
            raise ServerUnavailable(self._redact(f"query cancelled on {self.server}: {e}")) from None
        except Exception as e:
            # Anything else may leave the connection mid-protocol: drop it, reconnect next poll.
            self._drop()
            detail = describe(e, f"no reply within {self._client_timeout:g} s (client-side timeout)")
            raise ServerUnavailable(self._redact(f"query failed on {self.server}: {detail}")) from None
        return build_snapshot(self.server, rows, self._capacity, max_label_values=self.max_label_values)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def aclose(self) -> None:
        """Close politely (a Terminate message, so the server logs no broken connection)."""
        self._closed = True
        self._cancel_connecting()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await _close_politely(conn)

    def close(self) -> None:
        """Synchronous close for ``Exporter.unregister``, from any thread, on the connection's own loop."""
        self._closed = True
        self._cancel_connecting()
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        loop = self._loop
        if loop is None or loop.is_closed() or running is loop:
            conn.terminate()  # on its loop already: the abort completes when this callback returns
            return
        if loop.is_running():
            _close_on(loop, conn)
            return
        # A stopped loop (the poller's private one after shutdown) would never run the socket's
        # close callback: run it here, briefly, so no socket or server backend is left behind.
        with contextlib.suppress(Exception):
            loop.run_until_complete(_close_politely(conn))
            return
        conn.terminate()


def _close_on(loop: asyncio.AbstractEventLoop, conn: asyncpg.Connection) -> None:
    """Close ``conn`` on ``loop`` from another thread, finishing the job here if the loop stops meanwhile."""
    tasks: list[asyncio.Task[None]] = []
    done = threading.Event()

    def start() -> None:
        task = loop.create_task(_close_politely(conn))
        task.add_done_callback(lambda _: done.set())
        tasks.append(task)

    loop.call_soon_threadsafe(start)
    deadline = time.monotonic() + 2.0
    while not done.wait(0.05):
        if not loop.is_running() and not loop.is_closed():
            # Stopped under us (Poller.shutdown stops its loop before sources are closed).
            with contextlib.suppress(Exception):
                loop.run_until_complete(tasks[0] if tasks else _close_politely(conn))
            return
        if time.monotonic() > deadline:
            conn.terminate()
            return


def _retrieve(task: asyncio.Task[Any]) -> None:
    # An attempt nobody awaits any more (its source closed) must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()


async def _close_politely(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=1.0)
    except Exception:
        conn.terminate()
