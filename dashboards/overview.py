"""The overview dashboard: every pool against its limit, acquire waits, and the server budget."""

from __future__ import annotations

from grafanalib import core as g

from .common import (
    GREEN,
    ORANGE,
    POOL_SELECTOR,
    RED,
    SERVER_SELECTOR,
    dashed,
    datasource_variable,
    layout,
    stat,
    steps,
    target,
    timeseries,
    variable,
)

UID = "dbpool-overview"
S = POOL_SELECTOR
SS = SERVER_SELECTOR
# Each pool's max with the server it points at, over every replica: the job/instance variables do
# not apply, because the budget is shared by all of them.
POOL_MAX_BY_SERVER = (
    "dbpool_max_connections\n"
    "* on (job, instance, pool, kind) group_left (server)\n"
    f'dbpool_pool_info{{{SS}, server!=""}}'
)
USABLE = f"max by (server) (dbpool_server_usable_connections{{{SS}}})"
# Several exporters may watch one server: sum per exporter, then take one of them.
IN_USE = f"max by (server) (sum by (server, job, instance) (dbpool_server_connections{{{SS}}}))"


def _quantiles(metric: str) -> list[g.Target]:
    return [
        target(f"histogram_quantile({q}, sum by (job, instance, pool, le) "
               f"(rate({metric}_bucket{{{S}}}[$__rate_interval])))", f"{{{{pool}}}} p{int(q * 100)} {{{{instance}}}}")
        for q in (0.5, 0.95, 0.99)
    ]


def panels() -> list[g.Panel]:
    now = [
        (stat("Highest pool usage", "The fullest selected pool: checked out / max.",
              f"max(dbpool_usage_ratio{{{S}}})", unit="percentunit",
              thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))), 4, 4),
        (stat("Callers waiting", "Callers waiting for a connection right now, all selected pools.",
              f"sum(dbpool_pending_acquires{{{S}}})", thresholds=steps((GREEN, None), (RED, 1))), 4, 4),
        (stat("Acquire timeouts (1h)", "Acquires that failed with the pool's timeout in the last hour.",
              f"sum(increase(dbpool_acquire_timeouts_total{{{S}}}[1h]))",
              thresholds=steps((GREEN, None), (RED, 1))), 4, 4),
        (stat("Oldest checkout now", "The longest-held connection among the selected pools.",
              f"max(dbpool_oldest_checkout_age_seconds{{{S}}})", unit="s",
              thresholds=steps((GREEN, None), (ORANGE, 60), (RED, 300))), 4, 4),
        (stat("Server connections used", "Client backends / usable connections, fullest selected server.",
              f"max({IN_USE} / on (server) ({USABLE} > 0))", unit="percentunit",
              thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))), 4, 4),
        (stat("Pool budget", "Σ pool max over all replicas / usable server connections, worst server. "
              "Above 100% the pools together can ask for more connections than the server accepts.",
              f"max(sum by (server) ({POOL_MAX_BY_SERVER}) / on (server) ({USABLE} > 0))", unit="percentunit",
              thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 1))), 4, 4),
    ]
    pools = [
        (timeseries(
            "Pool usage", "Checked out / max per pool, and the highest value of the exporter's last 60 s "
            "(bursts between scrapes). DbpoolPoolUsageHigh fires above 80% for 5m.",
            [target(f"dbpool_usage_ratio{{{S}}}", "{{pool}} {{instance}}"),
             target(f"dbpool_checked_out_peak{{{S}}} / (dbpool_max_connections{{{S}}} > 0)",
                    "{{pool}} peak {{instance}}")],
            unit="percentunit", max_value=1, thresholds=steps((GREEN, None), (RED, 0.8))), 12, 8),
        (timeseries(
            "Connections: checked out, idle, overflow", "Open connections by state, overflow beyond the base "
            "size, and the pool's hard limit (dashed).",
            [target(f"dbpool_connections{{{S}}}", "{{pool}} {{state}} {{instance}}"),
             target(f"dbpool_overflow_connections{{{S}}}", "{{pool}} overflow {{instance}}"),
             target(f"dbpool_max_connections{{{S}}}", "{{pool}} max {{instance}}")],
            overrides=[dashed(".* max .*")]), 12, 8),
        (timeseries(
            "Waiting callers", "Callers waiting for a connection now, and the most seen in the exporter's "
            "last 60 s. Anyone waiting means the pool is full.",
            [target(f"dbpool_pending_acquires{{{S}}}", "{{pool}} {{instance}}"),
             target(f"dbpool_pending_acquires_peak{{{S}}}", "{{pool}} peak {{instance}}")],
            thresholds=steps((GREEN, None), (RED, 1))), 12, 8),
        (timeseries(
            "Acquire wait", "Time to get a connection (p50/p95/p99 of dbpool_acquire_wait_seconds), and for "
            "psycopg pools psycopg's mean wait of queued requests. DbpoolAcquireWaitSlow fires above 5 s.",
            [*_quantiles("dbpool_acquire_wait_seconds"),
             target(f"rate(dbpool_psycopg_requests_wait_seconds_total{{{S}}}[$__rate_interval])\n"
                    f"/ (rate(dbpool_psycopg_requests_queued_total{{{S}}}[$__rate_interval]) > 0)",
                    "{{pool}} psycopg mean {{instance}}")],
            unit="s", thresholds=steps((GREEN, None), (RED, 5))), 12, 8),
        (timeseries(
            "Acquire timeouts", "Acquires that gave up after the pool's timeout (dbpool_acquire_timeout_seconds).",
            [target(f"increase(dbpool_acquire_timeouts_total{{{S}}}[$__rate_interval])", "{{pool}} {{instance}}")],
            bars=True), 8, 8),
        (timeseries(
            "Connection hold time", "Checkout to checkin (p50/p95/p99 of dbpool_connection_hold_seconds). "
            "Longer holds with the same traffic mean a fuller pool.",
            _quantiles("dbpool_connection_hold_seconds"), unit="s"), 8, 8),
        (timeseries(
            "Oldest checkout", "Age of the longest-held connection, and connections reported by the leak "
            "detector. DbpoolConnectionLeak fires above 300 s.",
            [target(f"dbpool_oldest_checkout_age_seconds{{{S}}}", "{{pool}} {{instance}}"),
             target(f"increase(dbpool_leaked_connections_total{{{S}}}[$__rate_interval])",
                    "{{pool}} leaks reported {{instance}}")],
            unit="s", thresholds=steps((GREEN, None), (RED, 300))), 8, 8),
    ]
    server = [
        (timeseries(
            "Server connections by application and state", "Client backends in pg_stat_activity by "
            "application_name and state, against usable connections (max_connections - reserved) and "
            "max_connections (dashed).",
            [target(f"max by (server, application_name, state) (\n"
                    f"  sum by (server, application_name, state, job, instance) (dbpool_server_connections{{{SS}}})\n)",
                    "{{application_name}} {{state}} ({{server}})"),
             target(USABLE, "usable ({{server}})"),
             target(f"max by (server) (dbpool_server_max_connections{{{SS}}})", "max_connections ({{server}})")],
            stack=True, overrides=[dashed("(usable|max_connections) .*")]), 12, 9),
        (timeseries(
            "Pool budget: Σ pool max vs usable server connections", "The sum of every pool's max over all "
            "replicas and processes pointing at the server, against what the server accepts and what it uses "
            "now. DbpoolPoolOvercommit fires when the sum stays above usable for 15m.",
            [target(f"sum by (server) (\n{POOL_MAX_BY_SERVER}\n)", "Σ pool max, all replicas ({{server}})"),
             target(IN_USE, "in use ({{server}})"),
             target(USABLE, "usable ({{server}})")],
            overrides=[dashed("usable .*")]), 12, 9),
        (timeseries(
            "Budget by pool", "Each job's pools' share of the server budget (max connections, summed over "
            "replicas), stacked up to the usable line.",
            [target(f"sum by (server, job, pool) (\n{POOL_MAX_BY_SERVER}\n)", "{{job}}/{{pool}} ({{server}})"),
             target(USABLE, "usable ({{server}})")],
            stack=True, overrides=[dashed("usable .*")]), 24, 8),
    ]
    return layout([("Now", now), ("Pools", pools), ("Server and budget", server)])


def dashboard() -> g.Dashboard:
    return g.Dashboard(
        title="dbpool: connection pools overview",
        uid=UID,
        description="Python connection pools (SQLAlchemy, psycopg_pool) and the PostgreSQL servers they share.",
        tags=["dbpool", "postgresql", "connection-pool"],
        timezone="browser",
        refresh="30s",
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        time=g.Time("now-3h", "now"),
        templating=g.Templating(list=[
            datasource_variable(),
            variable("job", "Job", "label_values(dbpool_pool_info, job)"),
            variable("instance", "Instance", 'label_values(dbpool_pool_info{job=~"$job"}, instance)'),
            variable("pool", "Pool", 'label_values(dbpool_pool_info{job=~"$job", instance=~"$instance"}, pool)'),
            variable("server", "Server",
                     'label_values({__name__=~"dbpool_pool_info|dbpool_server_usable_connections"}, server)'),
        ]),
        panels=panels(),
    )
