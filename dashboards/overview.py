"""The overview dashboard: every pool against its limit, waits and who holds the connections, the server budget.

In multi-worker mode every pool series carries a `worker` label (one pool per process): the pool
panels show each pool summed over its workers, and the "Per worker" row breaks them down.
"""

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
    "* on (job, instance, worker, pool, kind) group_left (server)\n"
    f'dbpool_pool_info{{{SS}, server!=""}}'
)
USABLE = f"max by (server) (dbpool_server_usable_connections{{{SS}}})"
# Several exporters may watch one server: sum per exporter, then take one of them.
IN_USE = f"max by (server) (sum by (server, job, instance, worker) (dbpool_server_connections{{{SS}}}))"
# A pool over all its worker processes (a no-op without the worker label).
CHECKED_OUT = f'sum without (worker, state) (dbpool_connections{{{S}, state="checked_out"}})'
MAX = f"sum without (worker) (dbpool_max_connections{{{S}}})"


def _quantiles(metric: str) -> list[g.Target]:
    return [
        target(f"histogram_quantile({q}, sum by (job, instance, pool, le) "
               f"(rate({metric}_bucket{{{S}}}[$__rate_interval])))", f"{{{{pool}}}} p{int(q * 100)} {{{{instance}}}}")
        for q in (0.5, 0.95, 0.99)
    ]


def panels() -> list[g.Panel]:
    now = [
        (stat("Highest pool usage", "The fullest selected pool (or worker's pool): checked out / max.",
              f"max(dbpool_usage_ratio{{{S}}})", unit="percentunit",
              thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))), 4, 4),
        (stat("Callers waiting", "Callers waiting for a connection right now, all selected pools.",
              f"sum(dbpool_pending_acquires{{{S}}})", thresholds=steps((GREEN, None), (RED, 1))), 3, 4),
        (stat("Longest wait now", "How long the longest-waiting caller has been waiting, as a share of its "
              "pool's acquire timeout. DbpoolAcquireWaitNearTimeout fires above 25%: at 100% it fails.",
              f"max(dbpool_oldest_pending_acquire_age_seconds{{{S}}}\n"
              f"/ on (job, instance, worker, pool, kind) (dbpool_acquire_timeout_seconds{{{S}}} > 0))",
              unit="percentunit", thresholds=steps((GREEN, None), (ORANGE, 0.1), (RED, 0.25))), 4, 4),
        (stat("Acquire timeouts (1h)", "Acquires that failed with the pool's timeout in the last hour.",
              f"sum(increase(dbpool_acquire_timeouts_total{{{S}}}[1h]))",
              thresholds=steps((GREEN, None), (RED, 1))), 3, 4),
        (stat("Oldest checkout now", "The longest-held connection among the selected pools.",
              f"max(dbpool_oldest_checkout_age_seconds{{{S}}})", unit="s",
              thresholds=steps((GREEN, None), (ORANGE, 60), (RED, 300))), 3, 4),
        (stat("Server connections used", "Client backends / usable connections, fullest selected server.",
              f"max({IN_USE} / on (server) ({USABLE} > 0))", unit="percentunit",
              thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 0.95))), 3, 4),
        (stat("Pool budget", "Σ pool max over all replicas and workers / usable server connections, worst "
              "server. Above 100% the pools together can ask for more connections than the server accepts.",
              f"max(sum by (server) ({POOL_MAX_BY_SERVER}) / on (server) ({USABLE} > 0))", unit="percentunit",
              thresholds=steps((GREEN, None), (ORANGE, 0.8), (RED, 1))), 4, 4),
    ]
    pools = [
        (timeseries(
            "Pool usage", "Checked out / max per pool (over all its workers), and the highest value of the "
            "exporter's last 60 s (bursts between scrapes). DbpoolPoolUsageHigh fires above 80% for 5m.",
            [target(f"{CHECKED_OUT}\n/ ({MAX} > 0)", "{{pool}} {{instance}}"),
             target(f"sum without (worker) (dbpool_checked_out_peak{{{S}}})\n/ ({MAX} > 0)",
                    "{{pool}} peak {{instance}}")],
            unit="percentunit", max_value=1, thresholds=steps((GREEN, None), (RED, 0.8))), 12, 8),
        (timeseries(
            "Connections: checked out, idle, overflow", "Open connections by state, overflow beyond the base "
            "size, and the pool's hard limit (dashed), each summed over the pool's workers.",
            [target(f"sum without (worker) (dbpool_connections{{{S}}})", "{{pool}} {{state}} {{instance}}"),
             target(f"sum without (worker) (dbpool_overflow_connections{{{S}}})", "{{pool}} overflow {{instance}}"),
             target(MAX, "{{pool}} max {{instance}}")],
            overrides=[dashed(".* max .*")]), 12, 8),
        (timeseries(
            "Waiting callers", "Callers waiting for a connection now, and the most seen in the exporter's "
            "last 60 s. Anyone waiting means the pool is full.",
            [target(f"sum without (worker) (dbpool_pending_acquires{{{S}}})", "{{pool}} {{instance}}"),
             target(f"sum without (worker) (dbpool_pending_acquires_peak{{{S}}})", "{{pool}} peak {{instance}}")],
            thresholds=steps((GREEN, None), (RED, 1))), 12, 8),
        (timeseries(
            "Oldest waiting caller", "How long the longest-waiting caller has been waiting right now, against "
            "a quarter of the pool's acquire timeout (dashed): DbpoolAcquireWaitNearTimeout fires above it, before the "
            "timeout turns the wait into an error.",
            [target(f"max without (worker) (dbpool_oldest_pending_acquire_age_seconds{{{S}}})",
                    "{{pool}} {{instance}}"),
             target(f"0.25 * max without (worker) (dbpool_acquire_timeout_seconds{{{S}}})",
                    "{{pool}} alert line {{instance}}")],
            unit="s", overrides=[dashed(".* alert line .*")]), 12, 8),
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
        (timeseries(
            "Held-connection floor", "Connections held through a whole minute (the minimum of checked out over "
            "1m), against the limit (dashed). Bursts do not move it; a leak raises it steadily, and "
            "DbpoolPoolExhaustionForecast fires when its 10m trend reaches the limit within 30m, "
            "DbpoolPoolExhaustionImminent when, from 70% and with one site holding ever more, its 2m trend "
            "does within 10m.",
            [target(f'sum without (worker, state) (min_over_time(dbpool_connections{{{S}, state="checked_out"}}[1m]))',
                    "{{pool}} {{instance}}"),
             target(MAX, "{{pool}} max {{instance}}")],
            overrides=[dashed(".* max .*")]), 24, 8),
    ]
    holders = [
        (timeseries(
            "Connections held by code site", "Checked-out connections by the application code that took them "
            "(function and file:line; top 5 per pool, then other). Sites are captured while a pool is at least "
            "half used or holds a connection past 10 s; the rest count as other.",
            [target(f"sum by (job, instance, pool, site) (dbpool_site_checked_out_connections{{{S}}})",
                    "{{pool}} {{site}} {{instance}}")],
            stack=True), 12, 9),
        (timeseries(
            "Oldest checkout by code site", "Age of the oldest connection each site holds: a site whose age "
            "keeps growing is holding connections it never gives back.",
            [target(f"max by (job, instance, pool, site) (dbpool_site_oldest_checkout_age_seconds{{{S}}})",
                    "{{pool}} {{site}} {{instance}}")],
            unit="s", thresholds=steps((GREEN, None), (RED, 300))), 12, 9),
    ]
    workers = [
        (timeseries(
            "Usage per worker", "Each worker process's own pool: one exhausted worker is hidden in the pool "
            "totals above (without a worker label, one line per pool).",
            [target(f"dbpool_usage_ratio{{{S}}}", "{{pool}} {{instance}} {{worker}}")],
            unit="percentunit", max_value=1, thresholds=steps((GREEN, None), (RED, 0.8))), 8, 8),
        (timeseries(
            "Waiting callers per worker", "Callers waiting for a connection in each worker's pool.",
            [target(f"dbpool_pending_acquires{{{S}}}", "{{pool}} {{instance}} {{worker}}")],
            thresholds=steps((GREEN, None), (RED, 1))), 8, 8),
        (timeseries(
            "Oldest waiting caller per worker", "The longest wait in each worker's pool right now.",
            [target(f"dbpool_oldest_pending_acquire_age_seconds{{{S}}}", "{{pool}} {{instance}} {{worker}}")],
            unit="s"), 8, 8),
    ]
    server = [
        (timeseries(
            "Server connections by application and state", "Client backends in pg_stat_activity by "
            "application_name and state, against usable connections (max_connections - reserved) and "
            "max_connections (dashed).",
            [target(f"max by (server, application_name, state) (\n"
                    f"  sum by (server, application_name, state, job, instance, worker) "
                    f"(dbpool_server_connections{{{SS}}})\n)",
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
    return layout([("Now", now), ("Pools", pools), ("Who holds the connections", holders),
                   ("Per worker", workers), ("Server and budget", server)])


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
