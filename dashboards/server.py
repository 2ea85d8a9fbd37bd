"""The server dashboard: PostgreSQL connections by state, application, user and database; transactions; PgBouncer."""

from __future__ import annotations

from grafanalib import core as g

from .common import (
    DATASOURCE,
    GREEN,
    ORANGE,
    RED,
    SERVER_SELECTOR,
    dashed,
    datasource_variable,
    layout,
    steps,
    target,
    timeseries,
    variable,
)

UID = "dbpool-server"
SS = SERVER_SELECTOR
USABLE = f"max by (server) (dbpool_server_usable_connections{{{SS}}})"


def _by(labels: str) -> str:
    # Sum per exporter first, then keep one exporter's view: several may watch the same server.
    return (f"max by (server, {labels}) (\n"
            f"  sum by (server, {labels}, job, instance) (dbpool_server_connections{{{SS}}})\n)")


def _connections(title: str, labels: str, legend: str, description: str) -> g.TimeSeries:
    return timeseries(title, description, [target(_by(labels), legend + " ({{server}})"),
                                           target(USABLE, "usable ({{server}})")],
                      stack=True, overrides=[dashed("usable .*")])


PS = 'pgbouncer=~"$pgbouncer"'
# A PgBouncer pool's series name it by pool only; its info line adds PgBouncer, database and user. Several
# exporters may watch one PgBouncer (under different source names): max by keeps one view of each pool.
POOL_INFO = f"dbpool_pgbouncer_pool_info{{{PS}}}"


BOUNCER_MAX = 'dbpool_max_connections{kind="pgbouncer"}'


def _bouncer_pool(metric: str, by: str = "") -> str:
    extra = f", {by}" if by else ""
    return (f"max by (pgbouncer, database, user{extra}) (\n  {metric}\n"
            f"  * on (job, instance, worker, pool, kind) group_left (pgbouncer, database, user)\n  {POOL_INFO}\n)")


def _per_database(counter: str) -> str:
    return f"max by (pgbouncer, database) (rate({counter}{{{PS}}}[$__rate_interval]))"


def pgbouncer_panels() -> list[tuple[g.Panel, int, int]]:
    waiting = _bouncer_pool('dbpool_pgbouncer_pool_clients{state="waiting"}')
    wait = _per_database("dbpool_pgbouncer_client_wait_seconds_total")
    return [
        (timeseries(
            "PgBouncer client connections", "Client connections (SHOW LISTS used_clients, the exporter's own "
            "included) against max_client_conn. DbpoolPgBouncerClientConnectionsHigh fires above 80% for 5m; "
            "at 100% PgBouncer refuses new clients.",
            [target(f"max by (pgbouncer) (dbpool_pgbouncer_client_connections{{{PS}}})", "clients ({{pgbouncer}})"),
             target(f"max by (pgbouncer) (dbpool_pgbouncer_max_client_connections{{{PS}}})",
                    "max_client_conn ({{pgbouncer}})")],
            overrides=[dashed("max_client_conn .*")]), 8, 8),
        (timeseries(
            "PgBouncer waiting clients", "Clients queued inside PgBouncer for a server connection (cl_waiting), "
            "per database/user pool: the app pools see them as slow queries, not as waits.",
            [target(waiting, "{{database}}/{{user}} ({{pgbouncer}})")], stack=True), 8, 8),
        (timeseries(
            "PgBouncer oldest client wait", "How long the oldest queued client of each pool has waited (maxwait), "
            "against a quarter of query_wait_timeout (DbpoolAcquireWaitNearTimeout). "
            "DbpoolPgBouncerPoolSaturated fires above 1 s with every server connection busy.",
            [target(_bouncer_pool('dbpool_oldest_pending_acquire_age_seconds{kind="pgbouncer"}'),
                    "{{database}}/{{user}} ({{pgbouncer}})"),
             target(_bouncer_pool('0.25 * dbpool_acquire_timeout_seconds{kind="pgbouncer"}'),
                    "timeout/4 {{database}}/{{user}} ({{pgbouncer}})")],
            unit="s", overrides=[dashed("timeout/4 .*", ORANGE)]), 8, 8),
        (timeseries(
            "PgBouncer server pool usage", "Server connections serving a client (sv_active) / what the pool may "
            "open (pool_size + reserve, capped by max_db_connections and max_user_connections).",
            [target(_bouncer_pool('dbpool_usage_ratio{kind="pgbouncer"}'), "{{database}}/{{user}} ({{pgbouncer}})")],
            unit="percentunit", max_value=1, thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 1))), 8, 8),
        (timeseries(
            "PgBouncer server connections by state", "PgBouncer's connections to PostgreSQL by state (SHOW POOLS "
            "sv_*), stacked, against the Σ of its pools' limits (before max_db_connections caps them).",
            [target(f"sum by (pgbouncer, state) (\n{_bouncer_pool('dbpool_pgbouncer_pool_servers', 'state')}\n)",
                    "{{state}} ({{pgbouncer}})"),
             target(f"sum by (pgbouncer) (\n{_bouncer_pool(BOUNCER_MAX)}\n)",
                    "Σ pool max ({{pgbouncer}})")],
            stack=True, overrides=[dashed("Σ pool max .*")]), 8, 8),
        (timeseries(
            "PgBouncer transactions and queries", "Transactions and queries PgBouncer passed on, per second, "
            "per database (SHOW STATS).",
            [target(_per_database("dbpool_pgbouncer_transactions_total"), "transactions {{database}} ({{pgbouncer}})"),
             target(_per_database("dbpool_pgbouncer_queries_total"), "queries {{database}} ({{pgbouncer}})")],
            unit="reqps"), 8, 8),
        (timeseries(
            "PgBouncer average client wait", "Seconds clients waited for a server connection, per server "
            "assignment (PgBouncer 1.23+), else per transaction: total_wait_time counts a wait when it ends.",
            [target(f"{wait}\n/ ({_per_database('dbpool_pgbouncer_server_assignments_total')} > 0)\nor\n"
                    f"{wait}\n/ ({_per_database('dbpool_pgbouncer_transactions_total')} > 0)",
                    "{{database}} ({{pgbouncer}})")], unit="s"), 8, 8),
        (g.Table(
            title="PgBouncer databases", dataSource=DATASOURCE,
            description="Each PgBouncer database, the PostgreSQL server and database behind it (the `server` "
                        "of its pools), its pool mode, pool_size and server connections now.",
            targets=[
                g.Target(expr=f"max by (pgbouncer, database, server, server_database, pool_mode) "
                              f"(dbpool_pgbouncer_database_info{{{PS}}})",
                         format="table", instant=True),
                g.Target(expr=f"max by (pgbouncer, database) (dbpool_pgbouncer_database_pool_size{{{PS}}})",
                         format="table", instant=True),
                g.Target(expr=f"max by (pgbouncer, database) "
                              f"(dbpool_pgbouncer_database_server_connections{{{PS}}})",
                         format="table", instant=True)],
            transformations=[
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {
                    "excludeByName": {"Time": True, "Value #A": True},
                    "renameByName": {"Value #B": "pool_size", "Value #C": "server connections"}}},
            ]), 16, 8),
    ]


def panels() -> list[g.Panel]:
    connections = [
        (timeseries(
            "Usable connections in use", "Client backends / (max_connections - reserved). "
            "DbpoolServerConnectionsHigh fires above 80% for 5m.",
            [target(f"max by (server) (sum by (server, job, instance, worker) (dbpool_server_connections{{{SS}}}))\n"
                    f"/ on (server) ({USABLE} > 0)", "{{server}}")],
            unit="percentunit", max_value=1, thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))), 12, 8),
        (_connections("Connections by state", "state", "{{state}}",
                      "Client backends by pg_stat_activity state, stacked, against usable connections."), 12, 8),
        (_connections("Connections by application", "application_name", "{{application_name}}",
                      "Client backends by application_name (rare values folded into 'other')."), 8, 8),
        (_connections("Connections by user", "user", "{{user}}", "Client backends by role."), 8, 8),
        (_connections("Connections by database", "database", "{{database}}", "Client backends by database."), 8, 8),
    ]
    transactions = [
        (timeseries(
            "Oldest transaction", "Age of the oldest open transaction per database and application.",
            [target(f"max by (server, database, application_name) "
                    f"(dbpool_server_oldest_transaction_age_seconds{{{SS}}})",
                    "{{application_name}} {{database}} ({{server}})")], unit="s"), 8, 8),
        (timeseries(
            "Oldest idle in transaction", "How long the oldest 'idle in transaction' session has been idle. "
            "DbpoolIdleInTransaction fires above 60 s.",
            [target(f"max by (server, database, application_name) "
                    f"(dbpool_server_oldest_idle_in_transaction_age_seconds{{{SS}}})",
                    "{{application_name}} {{database}} ({{server}})")],
            unit="s", thresholds=steps((GREEN, None), (RED, 60))), 8, 8),
        (timeseries(
            "Sessions waiting for a lock", "Client backends whose wait_event_type is Lock.",
            [target(f"max by (server, database) (dbpool_server_lock_waiting_connections{{{SS}}})",
                    "{{database}} ({{server}})")]), 8, 8),
    ]
    exporter = [
        (timeseries(
            "PostgreSQL sources up", "1 when the exporter's last poll of the server succeeded.",
            [target('min by (job, instance, source) (dbpool_source_up{kind="postgres"})',
                    "{{source}} {{instance}}")], max_value=1), 8, 7),
        (timeseries(
            "Poll duration", "How long the last poll of each server took.",
            [target('dbpool_source_poll_duration_seconds{kind="postgres"}', "{{source}} {{instance}}")],
            unit="s"), 8, 7),
        (timeseries(
            "Folded label values", "Distinct user/application_name values folded into 'other' to bound "
            "cardinality.",
            [target(f"max by (server, label) (dbpool_server_folded_values{{{SS}}})", "{{label}} ({{server}})")]),
         8, 7),
    ]
    return layout([("Connections", connections), ("Transactions", transactions), ("PgBouncer", pgbouncer_panels()),
                   ("Exporter", exporter)])


def dashboard() -> g.Dashboard:
    return g.Dashboard(
        title="dbpool: PostgreSQL server connections",
        uid=UID,
        description="PostgreSQL connections by state, application, user and database, as dbpool-exporter sees them.",
        tags=["dbpool", "postgresql"],
        timezone="browser",
        refresh="30s",
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        time=g.Time("now-3h", "now"),
        templating=g.Templating(list=[
            datasource_variable(),
            variable("server", "Server", "label_values(dbpool_server_usable_connections, server)"),
            variable("pgbouncer", "PgBouncer", "label_values(dbpool_pgbouncer_info, pgbouncer)"),
        ]),
        panels=panels(),
    )
