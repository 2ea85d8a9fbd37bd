"""The server dashboard: PostgreSQL connections by state, application, user and database; transactions."""

from __future__ import annotations

from grafanalib import core as g

from .common import (
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
    return layout([("Connections", connections), ("Transactions", transactions), ("Exporter", exporter)])


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
        ]),
        panels=panels(),
    )
