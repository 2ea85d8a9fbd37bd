"""The metric catalogue: every family the exporter emits, declared once (name, type, help, labels, unit).

Sources and self-metrics emit through these entries (``Families.gauge(POOL_MIN, ...)``), so help text
lives here only; the README tables and the dashboards' and alert rules' vocabulary are checked against
``CATALOGUE`` by tests. Names and label sets are a contract with every dashboard and rule: never rename.
Labels the reader adds (``worker`` in multi-process mode, const labels) are not part of an entry.
This module imports nothing from the package, so anything may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

TYPES = ("gauge", "counter", "info", "histogram")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One family: ``name`` without the ``_total``/``_info`` suffix the exposition adds."""

    name: str
    type: str
    help: str
    labels: tuple[str, ...]
    # Labels present only when known (a pool without a server has no ``server`` label).
    optional: tuple[str, ...] = ()
    unit: str = ""

    @property
    def exposed(self) -> str:
        """The name as scraped and listed in README: ``_total`` for counters, ``_info`` for info."""
        return self.name + {"counter": "_total", "info": "_info"}.get(self.type, "")

    @property
    def samples(self) -> tuple[str, ...]:
        """Every sample name a query may use."""
        if self.type == "histogram":
            return tuple(f"{self.name}_{s}" for s in ("bucket", "count", "sum"))
        return (self.exposed,)

    def label_problem(self, labels: Iterable[str]) -> str | None:
        """Why ``labels`` (a sample's label names, or its label dict) do not fit this entry, or ``None``."""
        names = set(labels)
        if self.type == "histogram":
            names.discard("le")
        missing, extra = set(self.labels) - names, names - set(self.labels) - set(self.optional)
        if missing or extra:
            return f"{self.name}: labels {sorted(names)}, missing {sorted(missing)}, undeclared {sorted(extra)}"
        return None


CATALOGUE: dict[str, MetricSpec] = {}


def _m(name: str, typ: str, help: str, labels: tuple[str, ...], *, optional: tuple[str, ...] = (),
       unit: str = "") -> MetricSpec:
    assert typ in TYPES and name not in CATALOGUE, name
    spec = CATALOGUE[name] = MetricSpec(name, typ, help, labels, optional, unit)
    return spec


def get(name: str) -> MetricSpec:
    """The entry named ``name`` (without ``_total``); a ``KeyError`` names an undeclared metric."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not in dbpool_exporter.metrics") from None


POOL = ("pool", "kind")
SOURCE = ("source", "kind")
SERVER = ("server",)
BOUNCER = ("pgbouncer",)

# --- pools (snapshot.PoolSnapshot, every pool kind) ---------------------------------------------------
POOL_INFO = _m("dbpool_pool", "info", "Static facts about a pool: class, server (host:port) and database.",
               (*POOL, "pool_class"), optional=("server", "database"))
CONNECTIONS = _m("dbpool_connections", "gauge", "Open connections by state (checked_out + idle = open).",
                 (*POOL, "state"))
OVERFLOW = _m("dbpool_overflow_connections", "gauge", "Open connections beyond the pool's base size (never negative).",
              POOL)
MIN = _m("dbpool_min_connections", "gauge", "Base size of the pool (pool_size, min_size).", POOL)
MAX = _m("dbpool_max_connections", "gauge",
         "Hard limit on open connections (pool_size + max_overflow, max_size); absent when unbounded.", POOL)
USAGE_RATIO = _m("dbpool_usage_ratio", "gauge",
                 "checked_out / max_connections, 0..1; absent when the pool is unbounded.", POOL, unit="ratio")
ACQUIRE_TIMEOUT = _m("dbpool_acquire_timeout_seconds", "gauge",
                     "How long an acquire waits before the pool gives up (pool_timeout, timeout).", POOL,
                     unit="seconds")
PENDING = _m("dbpool_pending_acquires", "gauge", "Callers waiting for a connection right now.", POOL)
CHECKED_OUT_PEAK = _m("dbpool_checked_out_peak", "gauge", "Highest checked-out count seen in the recent window.",
                      POOL)
PENDING_PEAK = _m("dbpool_pending_acquires_peak", "gauge",
                  "Highest number of waiting callers seen in the recent window.", POOL)
OLDEST_CHECKOUT_AGE = _m("dbpool_oldest_checkout_age_seconds", "gauge",
                         "Age of the longest-held checked-out connection (0 when none is out).", POOL, unit="seconds")
OLDEST_PENDING_AGE = _m("dbpool_oldest_pending_acquire_age_seconds", "gauge",
                        "How long the longest-waiting caller has been waiting for a connection (0 when none waits).",
                        POOL, unit="seconds")
ACQUIRE_TIMEOUTS = _m("dbpool_acquire_timeouts", "counter", "Acquires that failed because the pool timed out.", POOL)
LEAKED = _m("dbpool_leaked_connections", "counter", "Checkouts held past the pool's leak-detection threshold.", POOL)
SITE_CHECKED_OUT = _m("dbpool_site_checked_out_connections", "gauge",
                      "Connections checked out now, by the application code that took them (top sites, then other).",
                      (*POOL, "site"))
SITE_OLDEST_AGE = _m("dbpool_site_oldest_checkout_age_seconds", "gauge",
                     "Age of the oldest connection checked out by each site (0 when it holds none).", (*POOL, "site"),
                     unit="seconds")
ACQUIRE_WAIT = _m("dbpool_acquire_wait_seconds", "histogram",
                  "Time from asking for a connection to getting one, or to the pool timeout.", POOL, unit="seconds")
HOLD = _m("dbpool_connection_hold_seconds", "histogram", "Time from checkout to checkin.", POOL, unit="seconds")

# --- psycopg_pool get_stats() counters (sources/psycopg.py maps the raw keys) ---------------------------
PSYCOPG_REQUESTS = _m("dbpool_psycopg_requests", "counter", "Connection requests made to the pool.", POOL)
PSYCOPG_REQUESTS_QUEUED = _m("dbpool_psycopg_requests_queued", "counter",
                             "Requests that had to wait in the queue because no connection was ready.", POOL)
PSYCOPG_REQUESTS_WAIT = _m("dbpool_psycopg_requests_wait_seconds", "counter",
                           "Total time requests spent waiting in the queue.", POOL, unit="seconds")
PSYCOPG_REQUESTS_ERRORS = _m("dbpool_psycopg_requests_errors", "counter",
                             "Requests that failed: timeouts, or rejected with a full queue.", POOL)
PSYCOPG_USAGE = _m("dbpool_psycopg_usage_seconds", "counter", "Total time connections spent out of the pool.", POOL,
                   unit="seconds")
PSYCOPG_RETURNS_BAD = _m("dbpool_psycopg_returns_bad", "counter",
                         "Connections returned in a bad state (closed, in a transaction).", POOL)
PSYCOPG_CONNECTIONS = _m("dbpool_psycopg_connections", "counter", "Connection attempts made to the server.", POOL)
PSYCOPG_CONNECTIONS_TIME = _m("dbpool_psycopg_connections_seconds", "counter", "Total time spent connecting.", POOL,
                              unit="seconds")
PSYCOPG_CONNECTIONS_ERRORS = _m("dbpool_psycopg_connections_errors", "counter", "Failed connection attempts.", POOL)
PSYCOPG_CONNECTIONS_LOST = _m("dbpool_psycopg_connections_lost", "counter",
                              "Connections found broken by the pool's check.", POOL)

# --- the poller's health per source (collector.py) -----------------------------------------------------
SOURCE_UP = _m("dbpool_source_up", "gauge", "1 if the source's last poll succeeded, else 0.", SOURCE)
SOURCE_POLL_DURATION = _m("dbpool_source_poll_duration_seconds", "gauge", "How long the source's last poll took.",
                          SOURCE, unit="seconds")
SOURCE_LAST_SUCCESS = _m("dbpool_source_last_success_timestamp_seconds", "gauge",
                         "Unix time of the source's last successful poll (0 if never).", SOURCE, unit="seconds")
SOURCE_POLLS = _m("dbpool_source_polls", "counter", "Polls of the source.", SOURCE)
SOURCE_ERRORS = _m("dbpool_source_errors", "counter", "Polls of the source that failed.", SOURCE)

# --- PostgreSQL server (sources/postgres.py); no `source` label: they join pools on `server` ------------
SERVER_MAX = _m("dbpool_server_max_connections", "gauge", "The server's max_connections setting.", SERVER)
SERVER_RESERVED = _m("dbpool_server_reserved_connections", "gauge",
                     "Connection slots reserved for superusers and, from PostgreSQL 16, pg_use_reserved_connections.",
                     SERVER)
SERVER_USABLE = _m("dbpool_server_usable_connections", "gauge",
                   "Connection slots ordinary roles can use: max_connections minus the reserved ones.", SERVER)
SERVER_CONNECTIONS = _m("dbpool_server_connections", "gauge", "Client backends in pg_stat_activity, by state.",
                        (*SERVER, "database", "user", "application_name", "state"))
SERVER_OLDEST_XACT = _m("dbpool_server_oldest_transaction_age_seconds", "gauge",
                        "Age of the oldest open transaction (0 when none is open).",
                        (*SERVER, "database", "application_name"), unit="seconds")
SERVER_OLDEST_IDLE_XACT = _m("dbpool_server_oldest_idle_in_transaction_age_seconds", "gauge",
                             "How long the longest idle-in-transaction backend has been idle (0 when none is).",
                             (*SERVER, "database", "application_name"), unit="seconds")
SERVER_LOCK_WAITING = _m("dbpool_server_lock_waiting_connections", "gauge", "Client backends waiting on a lock.",
                         (*SERVER, "database"))
SERVER_FOLDED = _m("dbpool_server_folded_values", "gauge",
                   "Distinct label values folded into 'other' by the cardinality cap.", (*SERVER, "label"))

# --- PgBouncer (sources/pgbouncer.py; its pools also emit the pool families above) ----------------------
BOUNCER_INFO = _m("dbpool_pgbouncer", "info", "Static facts about a PgBouncer: its version and default pool_mode.",
                  (*BOUNCER, "version", "pool_mode"))
BOUNCER_MAX_CLIENT_CONNECTIONS = _m(
    "dbpool_pgbouncer_max_client_connections", "gauge",
    "max_client_conn: client connections PgBouncer accepts before refusing more.", BOUNCER)
BOUNCER_DEFAULT_POOL_SIZE = _m(
    "dbpool_pgbouncer_default_pool_size", "gauge",
    "default_pool_size: server connections per database/user pool unless overridden.", BOUNCER)
BOUNCER_MAX_DB_CONNECTIONS = _m(
    "dbpool_pgbouncer_max_db_connections", "gauge",
    "max_db_connections default: server connections per database (0 = no limit).", BOUNCER)
BOUNCER_MAX_USER_CONNECTIONS = _m(
    "dbpool_pgbouncer_max_user_connections", "gauge",
    "max_user_connections default: server connections per user (0 = no limit).", BOUNCER)
BOUNCER_RESERVE_POOL_SIZE = _m(
    "dbpool_pgbouncer_reserve_pool_size", "gauge",
    "reserve_pool_size default: extra server connections a pool may open under pressure.", BOUNCER)
BOUNCER_MAX_DB_CLIENT_CONNECTIONS = _m(
    "dbpool_pgbouncer_max_db_client_connections", "gauge",
    "max_db_client_connections default: client connections per database (0 = no limit).", BOUNCER)
BOUNCER_CLIENT_CONNECTIONS = _m(
    "dbpool_pgbouncer_client_connections", "gauge",
    "Client connections to PgBouncer now (SHOW LISTS used_clients), compared with max_client_conn.", BOUNCER)
BOUNCER_CLIENT_USAGE_RATIO = _m("dbpool_pgbouncer_client_usage_ratio", "gauge",
                                "Client connections / max_client_conn, 0..1.", BOUNCER, unit="ratio")
BOUNCER_LIST_ITEMS = _m("dbpool_pgbouncer_list_items", "gauge", "SHOW LISTS: PgBouncer's internal object counts.",
                        (*BOUNCER, "list"))
BOUNCER_DATABASE = (*BOUNCER, "database")
BOUNCER_DATABASE_INFO = _m(
    "dbpool_pgbouncer_database", "info",
    "A PgBouncer database entry: the real server (host:port) and database behind it.",
    (*BOUNCER_DATABASE, "server", "server_database", "pool_mode"))
BOUNCER_DATABASE_POOL_SIZE = _m(
    "dbpool_pgbouncer_database_pool_size", "gauge",
    "Server connections per pool of this database (pool_size, else default_pool_size).", BOUNCER_DATABASE)
BOUNCER_DATABASE_MIN_POOL_SIZE = _m(
    "dbpool_pgbouncer_database_min_pool_size", "gauge",
    "Server connections PgBouncer keeps open per pool of this database.", BOUNCER_DATABASE)
BOUNCER_DATABASE_RESERVE_POOL_SIZE = _m(
    "dbpool_pgbouncer_database_reserve_pool_size", "gauge",
    "Extra server connections per pool of this database once clients wait reserve_pool_timeout.", BOUNCER_DATABASE)
BOUNCER_DATABASE_MAX_CONNECTIONS = _m(
    "dbpool_pgbouncer_database_max_connections", "gauge",
    "Server connections this database may open across its pools (max_db_connections, 0 = no limit).",
    BOUNCER_DATABASE)
BOUNCER_DATABASE_SERVER_CONNECTIONS = _m(
    "dbpool_pgbouncer_database_server_connections", "gauge", "Server connections this database has open now.",
    BOUNCER_DATABASE)
BOUNCER_DATABASE_PAUSED = _m("dbpool_pgbouncer_database_paused", "gauge", "1 while the database is PAUSEd.",
                             BOUNCER_DATABASE)
BOUNCER_DATABASE_DISABLED = _m("dbpool_pgbouncer_database_disabled", "gauge", "1 while the database is DISABLEd.",
                               BOUNCER_DATABASE)
# SHOW STATS totals, per database.
BOUNCER_TRANSACTIONS = _m("dbpool_pgbouncer_transactions", "counter", "SQL transactions pooled.", BOUNCER_DATABASE)
BOUNCER_QUERIES = _m("dbpool_pgbouncer_queries", "counter", "SQL commands pooled.", BOUNCER_DATABASE)
BOUNCER_RECEIVED = _m("dbpool_pgbouncer_received_bytes", "counter", "Network traffic received from clients.",
                      BOUNCER_DATABASE, unit="bytes")
BOUNCER_SENT = _m("dbpool_pgbouncer_sent_bytes", "counter", "Network traffic sent to clients.", BOUNCER_DATABASE,
                  unit="bytes")
BOUNCER_TRANSACTION_TIME = _m(
    "dbpool_pgbouncer_transaction_seconds", "counter",
    "Time connected to PostgreSQL in a transaction (idle in transaction or querying).", BOUNCER_DATABASE,
    unit="seconds")
BOUNCER_QUERY_TIME = _m("dbpool_pgbouncer_query_seconds", "counter", "Time actively executing queries on PostgreSQL.",
                        BOUNCER_DATABASE, unit="seconds")
BOUNCER_CLIENT_WAIT_TIME = _m(
    "dbpool_pgbouncer_client_wait_seconds", "counter",
    "Time clients spent waiting for a server connection (counted when they get one).", BOUNCER_DATABASE,
    unit="seconds")
BOUNCER_SERVER_ASSIGNMENTS = _m("dbpool_pgbouncer_server_assignments", "counter",
                                "Times a server connection was assigned to a client.", BOUNCER_DATABASE)
BOUNCER_CLIENT_PARSES = _m("dbpool_pgbouncer_client_parses", "counter", "Prepared statements created by clients.",
                           BOUNCER_DATABASE)
BOUNCER_SERVER_PARSES = _m("dbpool_pgbouncer_server_parses", "counter",
                           "Prepared statements PgBouncer created on servers.", BOUNCER_DATABASE)
BOUNCER_BINDS = _m("dbpool_pgbouncer_binds", "counter", "Prepared statements bound by clients.", BOUNCER_DATABASE)
BOUNCER_CLIENT_LOGINS = _m("dbpool_pgbouncer_client_logins", "counter", "Successful client logins.",
                           BOUNCER_DATABASE)
BOUNCER_POOL_INFO = _m("dbpool_pgbouncer_pool", "info",
                       "Which PgBouncer, database and user a pgbouncer pool belongs to.",
                       (*POOL, *BOUNCER, "database", "user", "pool_mode"))
BOUNCER_POOL_CLIENTS = _m("dbpool_pgbouncer_pool_clients", "gauge",
                          "Client connections of a PgBouncer pool, by state.", (*POOL, "state"))
BOUNCER_POOL_SERVERS = _m("dbpool_pgbouncer_pool_servers", "gauge",
                          "Server connections of a PgBouncer pool, by state.", (*POOL, "state"))
BOUNCER_FOLDED = _m("dbpool_pgbouncer_folded_values", "gauge",
                    "Distinct label values folded into 'other' by the cardinality cap.", (*BOUNCER, "label"))

# --- processes: workers sharing a directory (workers.py), the daemon (daemon.py) ------------------------
WORKER_UP = _m("dbpool_worker_up", "gauge",
               "1 per live worker process publishing its pools; 0 while it is alive but has not published for a few "
               "intervals (a blocked event loop, a hung process).", ("worker",))
EXPORTER_BUILD_INFO = _m("dbpool_exporter_build_info", "gauge", "Always 1; the exporter's version as a label.",
                         ("version",))
EXPORTER_RELOAD_OK = _m("dbpool_exporter_config_last_reload_successful", "gauge",
                        "1 if the last config (re)load succeeded, 0 if the daemon kept an older config.", ())
EXPORTER_RELOAD_AT = _m("dbpool_exporter_config_last_reload_success_timestamp_seconds", "gauge",
                        "Unix time of the last successful config (re)load.", (), unit="seconds")


def sample_names() -> set[str]:
    """Every sample name the exporter can produce: the vocabulary of dashboards and alert rules."""
    return {s for spec in CATALOGUE.values() for s in spec.samples}
