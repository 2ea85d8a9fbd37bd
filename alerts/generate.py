"""Generate the Prometheus rule files (alerts and recording rules) from one table of thresholds.

Edit ``CONFIG`` (or pass overrides to ``render()``), then run ``python alerts/generate.py`` to
rewrite ``dbpool-alerts.yml`` and ``dbpool-rules.yml``; ``--check`` only reports drift.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# alerts/ is no package (run as a script or loaded by path): make the repository's `scripts` importable.
sys.path.insert(0, str(HERE.parent))

from scripts.generated import write_or_check  # noqa: E402

CONFIG: dict[str, Any] = {
    # Where the runbook lives; each alert links to `<runbook_url>#<alertname in lower case>`.
    "runbook_url": "https://github.com/dbpool-exporter/dbpool-exporter/blob/main/docs/runbook.md",
    # Selects the exporter's own scrape targets for DbpoolExporterDown (the daemon's job). Targets
    # that served dbpool_source_up in the last hour (the in-process exporter, under any job) count too.
    "exporter_selector": 'job=~".*dbpool.*"',
    # Extra label matchers put into every dbpool_* selector, e.g. 'env="prod"'. Empty: all of them.
    "selector": "",
    # Labels that identify one scraped target; pools are joined with their info metric on these
    # plus worker (the process, in multi-worker mode), pool and kind, and server metrics from several
    # exporters watching one server are deduplicated.
    "instance_labels": ["job", "instance"],
    "alerts": {
        # Share of the pool's hard limit checked out (dbpool_usage_ratio).
        "DbpoolPoolUsageHigh": {"severity": "warning", "threshold": 0.8, "for": "5m"},
        # Usage (peak within the exporter's 60 s window) at least this, with callers waiting. Shorter
        # than a 30 s pool timeout; DbpoolAcquireWaitNearTimeout is the one that beats the first error.
        "DbpoolPoolExhausted": {"severity": "critical", "threshold": 0.95, "for": "15s"},
        # A caller has waited longer than this share of the pool's own acquire timeout and still
        # waits: it fails when the timeout runs out. No `for:`, so one scrape that sees it is enough.
        # A quarter leaves room for a 15 s scrape and a 15 s evaluation within a 30 s timeout.
        "DbpoolAcquireWaitNearTimeout": {"severity": "critical", "threshold": 0.25, "for": "0s"},
        # Leak-shaped growth: the floor of checked-out connections (its 1m minimum) rose by at least
        # `step` x max (and 2 connections) in each of the last two `step_window`s, and its linear
        # trend over `window` reaches max within `horizon`. Quiet on bursts (the floor does not move), daily cycles (too
        # slow to reach max within the horizon) and restarts (a new series has no history; a dip
        # breaks the steady rise).
        "DbpoolPoolExhaustionForecast": {"severity": "warning", "horizon": "30m", "window": "10m",
                                         "step": 0.03, "step_window": "3m", "for": "1m"},
        # The same shape in minutes, for a leak that shows up late, the pool already `threshold` used:
        # the forecast needs 6 minutes of rise, more than such a pool has left (the incident: 2/3 used,
        # one more held every 15 s, full in 5 minutes). Two rising spans keep a one-off step quiet, and
        # a leak's shape is asked of one code site too: its count rose by `step` over the two spans and
        # its oldest checkout is past `site_age` s. A ramp or a pool warming up, even beside a LISTEN
        # connection held for hours, has no such site. Needs the hooks' site attribution (the default).
        "DbpoolPoolExhaustionImminent": {"severity": "critical", "threshold": 0.7, "horizon": "10m", "window": "2m",
                                         "step": 0.03, "step_window": "1m", "site_age": 60, "for": "0s"},
        # Seconds: p95 of dbpool_acquire_wait_seconds over 5m, or psycopg's mean wait of queued requests.
        "DbpoolAcquireWaitSlow": {"severity": "warning", "threshold": 5, "for": "2m"},
        # Acquire timeouts within 5m above this count.
        "DbpoolAcquireTimeouts": {"severity": "critical", "threshold": 0, "for": "1m"},
        # Seconds a single checkout may last; plus any new report from the leak detector in leak_window.
        "DbpoolConnectionLeak": {"severity": "warning", "threshold": 300, "leak_window": "15m", "for": "2m"},
        # Share of usable server connections (max_connections - reserved) in use by client backends.
        "DbpoolServerConnectionsHigh": {"severity": "warning", "threshold": 0.8, "for": "5m"},
        # Seconds the oldest idle-in-transaction session may have been idle.
        "DbpoolIdleInTransaction": {"severity": "warning", "threshold": 60, "for": "2m"},
        # Σ pool max_connections per server (all replicas) above this share of usable connections.
        # The long `for:` rides out rolling deploys, when old and new replicas run side by side.
        "DbpoolPoolOvercommit": {"severity": "warning", "threshold": 1.0, "for": "15m"},
        # Share of PgBouncer's max_client_conn in use by client connections (SHOW LISTS used_clients).
        "DbpoolPgBouncerClientConnectionsHigh": {"severity": "warning", "threshold": 0.8, "for": "5m"},
        # Σ max_connections of the app pools that name a PgBouncer as their server, above this share of
        # its max_client_conn. Long `for:` for rolling deploys, as DbpoolPoolOvercommit.
        "DbpoolPgBouncerClientOvercommit": {"severity": "warning", "threshold": 1.0, "for": "15m"},
        # Seconds the oldest client has queued inside PgBouncer (maxwait) while the pool has every server
        # connection it may open busy. The 15 s `for:` plus a 15 s scrape fire within ~45 s of the first
        # stuck client, before query_wait_timeout's default 120 s drops it; with a shorter
        # query_wait_timeout DbpoolAcquireWaitNearTimeout (a share of it, no `for:`) fires first.
        "DbpoolPgBouncerPoolSaturated": {"severity": "critical", "threshold": 1, "for": "15s"},
        "DbpoolSourceDown": {"severity": "warning", "for": "5m"},
        "DbpoolExporterDown": {"severity": "critical", "for": "3m"},
    },
}

HEADER = "# Generated by alerts/generate.py from its CONFIG; edit that and regenerate, not this file.\n"
ALERTS_FILE = "dbpool-alerts.yml"
RULES_FILE = "dbpool-rules.yml"
KNOWN_SERVER = 'server!=""'  # pools whose target is unknown (a bare Pool) have no server to count against
BOUNCER = 'kind="pgbouncer"'  # PgBouncer's own server pools, read from its admin console


class ConfigError(ValueError):
    """An override names an unknown key or carries a value of the wrong type."""


def merged(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """CONFIG deep-merged with ``overrides``; unknown keys are an error, not silently ignored."""
    config = copy.deepcopy(CONFIG)
    _merge(config, overrides or {}, "")
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str) -> None:
    for key, value in extra.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown setting {where!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {where!r} must be a mapping")
            _merge(base[key], value, where + ".")
        else:
            base[key] = value


class _Q:
    """PromQL building blocks bound to one configuration."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.extra = config["selector"].strip().strip(",")
        self.inst_list = list(config["instance_labels"])
        # One process: a scraped target, or one worker of it (multi-worker mode adds `worker`).
        self.inst = ", ".join([*self.inst_list, "worker"])
        self.pool_keys = ", ".join([*self.inst_list, "worker", "pool", "kind"])

    def m(self, metric: str, matchers: str = "") -> str:
        """``metric{matchers}`` with the configured extra matchers added."""
        inner = ", ".join(x for x in (matchers, self.extra) if x)
        return f"{metric}{{{inner}}}" if inner else metric


def _num(value: float) -> str:
    return f"{value:g}"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(duration: str) -> int:
    """'30m' -> 1800 (one unit only, which is all CONFIG uses)."""
    try:
        return int(duration[:-1]) * _UNITS[duration[-1]]
    except (KeyError, ValueError):
        raise ConfigError(f"duration {duration!r}: use a number and one of s, m, h, d") from None


def _double(duration: str) -> str:
    return f"{2 * _seconds(duration)}s"


def recording_rules(config: dict[str, Any]) -> list[dict[str, str]]:
    q = _Q(config)
    wait_bucket = q.m("dbpool_acquire_wait_seconds_bucket")
    checked_out = q.m("dbpool_connections", 'state="checked_out"')
    bouncer_pool = "dbpool:pgbouncer_pool_max_connections:with_server"
    caps = q.m("dbpool_pgbouncer_database_max_connections", 'database!="other"')
    db_cap = f"max by (pgbouncer, database) ({caps} > 0)"
    session_pools = q.m("dbpool_pgbouncer_pool_info", 'pool_mode="session"')
    session = (f"sum by (pgbouncer, database) (\n  max by (pgbouncer, database, user) (\n"
               f"    {q.m('dbpool_max_connections', BOUNCER)}\n"
               f"    * on ({q.pool_keys}) group_left (pgbouncer, database, user)\n"
               f"    {session_pools}\n  )\n)")
    app_pools = q.m("dbpool_max_connections", 'kind!="pgbouncer"')
    rules = [
        ("dbpool:pool_usage:ratio", q.m("dbpool_usage_ratio")),
        # The exporter's own 60 s maximum sees bursts that fall between scrapes; pools without
        # event hooks fall back to the instantaneous ratio.
        ("dbpool:pool_usage_peak:ratio",
         f"{q.m('dbpool_checked_out_peak')} / ({q.m('dbpool_max_connections')} > 0)\n"
         f"or\n{q.m('dbpool_usage_ratio')}"),
        ("dbpool:pool_waiters:peak",
         f"{q.m('dbpool_pending_acquires_peak')}\nor\n{q.m('dbpool_pending_acquires')}"),
        # The floor under the bursts: connections held through a whole minute. Leaks raise it.
        ("dbpool:pool_checked_out:min_1m",
         f"max without (state) (min_over_time({checked_out}[1m]))"),
        *[(f"dbpool:acquire_wait_seconds:p{int(quantile * 100)}_5m",
           f"histogram_quantile({quantile}, rate({wait_bucket}[5m]))") for quantile in (0.5, 0.95, 0.99)],
        # psycopg_pool counts the total wait of the requests that had to queue: their mean wait.
        ("dbpool:psycopg_acquire_wait_seconds:mean_5m",
         f"rate({q.m('dbpool_psycopg_requests_wait_seconds_total')}[5m])\n"
         f"/\n(rate({q.m('dbpool_psycopg_requests_queued_total')}[5m]) > 0)"),
        ("dbpool:pool_max_connections:with_server",
         f"{q.m('dbpool_max_connections')}\n"
         f"* on ({q.pool_keys}) group_left (server)\n"
         f"{q.m('dbpool_pool_info', KNOWN_SERVER)}"),
        # A PgBouncer pool counted once per (PgBouncer, database, user), however many exporters (or
        # source names) watch that PgBouncer; mid-RELOAD they may disagree: plan for the larger.
        ("dbpool:pgbouncer_pool_max_connections:with_server",
         f"max by (server, pgbouncer, database, user) (\n"
         f"  dbpool:pool_max_connections:with_server{{{BOUNCER}}}\n"
         f"  * on ({q.pool_keys}) group_left (pgbouncer, database, user)\n"
         f"  {q.m('dbpool_pgbouncer_pool_info')}\n)"),
        # Per PgBouncer database: its pools together, capped by max_db_connections when that is set
        # (0 = no limit; the folded "other" database adds up several caps, so it has none).
        ("dbpool:pgbouncer_database_max_connections:sum",
         f"(\n  0 * (\n    sum by (server, pgbouncer, database) ({bouncer_pool})\n"
         f"    > on (pgbouncer, database) group_left ()\n    {db_cap}\n  )\n"
         f"  + on (pgbouncer, database) group_left ()\n  {db_cap}\n)\n"
         f"or\nsum by (server, pgbouncer, database) ({bouncer_pool})"),
        # Summed over every replica and process: the budget the server has to honour. PgBouncer's
        # server pools count as above, not once per exporter that watches that PgBouncer (one without
        # its dbpool_pgbouncer_pool_info, which the source always sends, counts as a plain pool).
        ("dbpool:server_pool_max:sum",
         f"sum by (server) (\n  dbpool:pool_max_connections:with_server{{kind!=\"pgbouncer\"}}\n"
         f"  or\n  dbpool:pgbouncer_database_max_connections:sum\n"
         f"  or\n  (\n    dbpool:pool_max_connections:with_server{{{BOUNCER}}}\n"
         f"    unless on ({q.pool_keys})\n    {q.m('dbpool_pgbouncer_pool_info')}\n  )\n)"),
        # Several exporters may watch one server (one per app replica): count it once.
        ("dbpool:server_usable_connections:max",
         f"max by (server) ({q.m('dbpool_server_usable_connections')})"),
        ("dbpool:server_connections:sum",
         f"max by (server) (\n  sum by (server, {q.inst}) ({q.m('dbpool_server_connections')})\n)"),
        ("dbpool:server_connections_usage:ratio",
         "dbpool:server_connections:sum\n/ on (server)\n(dbpool:server_usable_connections:max > 0)"),
        ("dbpool:server_pool_budget:ratio",
         "dbpool:server_pool_max:sum\n/ on (server)\n(dbpool:server_usable_connections:max > 0)"),
        # Tier 1 of the budget: a PgBouncer's max_client_conn under the name the app pools use for it
        # (their server label is PgBouncer's host:port). Two exporters should agree; if not, the smaller.
        ("dbpool:pgbouncer_client_capacity:min",
         f'min by (server) (\n  label_replace({q.m("dbpool_pgbouncer_max_client_connections")}, '
         f'"server", "$1", "pgbouncer", "(.*)")\n)'),
        ("dbpool:pgbouncer_client_budget:ratio",
         'sum by (server) (dbpool:pool_max_connections:with_server{kind!="pgbouncer"})\n/ on (server)\n'
         "(dbpool:pgbouncer_client_capacity:min > 0)"),
        # Session pooling: a client keeps its server connection for its whole session, so the app pools
        # that name a session-mode PgBouncer database (server = PgBouncer, database = its database name)
        # fit only into that database's session-mode server pools (capped by max_db_connections).
        ("dbpool:pgbouncer_session_pool_max:sum", session),
        ("dbpool:pgbouncer_session_capacity:sum",
         f'label_replace(\n  ({db_cap} < dbpool:pgbouncer_session_pool_max:sum)\n'
         f'  or\n  dbpool:pgbouncer_session_pool_max:sum,\n  "server", "$1", "pgbouncer", "(.*)"\n)'),
        ("dbpool:pgbouncer_session_budget:ratio",
         f"sum by (server, database) (\n  {app_pools}\n"
         f"  * on ({q.pool_keys}) group_left (server, database)\n  {q.m('dbpool_pool_info', KNOWN_SERVER)}\n)\n"
         f"/ on (server, database)\n(dbpool:pgbouncer_session_capacity:sum > 0)"),
    ]
    return [{"record": name, "expr": expr} for name, expr in rules]


def _alert_exprs(config: dict[str, Any]) -> dict[str, str]:
    q = _Q(config)
    a = config["alerts"]

    def t(name: str) -> str:
        return _num(a[name]["threshold"])

    overcommit = a["DbpoolPoolOvercommit"]["threshold"]
    usable = "dbpool:server_usable_connections:max"
    leak = a["DbpoolConnectionLeak"]
    floor, on, limit = "dbpool:pool_checked_out:min_1m", f"on ({q.pool_keys})", q.m("dbpool_max_connections")

    def forecast(name: str) -> str:
        """The checked-out floor forecast `horizon` ahead, where it reaches the limit after two rising spans."""
        fc = a[name]
        step, sw = f"clamp_min({_num(fc['step'])} * {limit}, 2)", fc["step_window"]
        used = f"and {on}\n{floor} >= {on} {t(name)} * {limit}\n" if "threshold" in fc else ""
        if "site_age" in fc:
            site = 'site!="other"'
            count = q.m("dbpool_site_checked_out_connections", site)
            age = q.m("dbpool_site_oldest_checkout_age_seconds", site)
            used += (f"and {on}\n(\n  ({count} - {count} offset {_double(sw)})\n  >= {on} group_left {step}\n"
                     f"  and\n  {age} > {_num(fc['site_age'])}\n)\n")
        return (f"predict_linear({floor}[{fc['window']}], {_seconds(fc['horizon'])})\n"
                f">= {on}\n({limit} > 0)\n{used}"
                f"and {on}\n({floor} - {floor} offset {sw}) >= {on} {step}\n"
                f"and {on}\n({floor} offset {sw} - {floor} offset {_double(sw)}) >= {on} {step}")

    return {
        "DbpoolPoolUsageHigh": f"dbpool:pool_usage:ratio > {t('DbpoolPoolUsageHigh')}",
        "DbpoolPoolExhausted":
            f"dbpool:pool_waiters:peak > 0\nand\ndbpool:pool_usage_peak:ratio >= {t('DbpoolPoolExhausted')}",
        # The histogram where the pool is instrumented; psycopg's own counters where it is not.
        "DbpoolAcquireWaitSlow":
            f"dbpool:acquire_wait_seconds:p95_5m > {t('DbpoolAcquireWaitSlow')}\nor\n"
            f"(\n  dbpool:psycopg_acquire_wait_seconds:mean_5m > {t('DbpoolAcquireWaitSlow')}\n"
            f"  unless\n  {q.m('dbpool_acquire_wait_seconds_count')}\n)",
        "DbpoolAcquireWaitNearTimeout":
            f"{q.m('dbpool_oldest_pending_acquire_age_seconds')}\n> {on}\n"
            f"{_num(a['DbpoolAcquireWaitNearTimeout']['threshold'])} * "
            f"({q.m('dbpool_acquire_timeout_seconds')} > 0)",
        # Value: the checked-out floor forecast `horizon` ahead.
        "DbpoolPoolExhaustionForecast": forecast("DbpoolPoolExhaustionForecast"),
        "DbpoolPoolExhaustionImminent": forecast("DbpoolPoolExhaustionImminent"),
        "DbpoolAcquireTimeouts":
            f"increase({q.m('dbpool_acquire_timeouts_total')}[5m]) > {t('DbpoolAcquireTimeouts')}",
        # Two signals, labelled so both can be pending at once and the description can tell them apart.
        "DbpoolConnectionLeak":
            f'label_replace(\n  {q.m("dbpool_oldest_checkout_age_seconds")} > {t("DbpoolConnectionLeak")},\n'
            f'  "signal", "checkout_age", "", ""\n)\nor\n'
            f'label_replace(\n  increase({q.m("dbpool_leaked_connections_total")}[{leak["leak_window"]}]) > 0,\n'
            f'  "signal", "leak_detector", "", ""\n)',
        "DbpoolServerConnectionsHigh":
            f"dbpool:server_connections_usage:ratio > {t('DbpoolServerConnectionsHigh')}",
        "DbpoolIdleInTransaction":
            f"max without ({q.inst}) ({q.m('dbpool_server_oldest_idle_in_transaction_age_seconds')})\n"
            f"> {t('DbpoolIdleInTransaction')}",
        "DbpoolPoolOvercommit":
            "dbpool:server_pool_max:sum\n> on (server)\n"
            + (usable if overcommit == 1 else f"({_num(overcommit)} * {usable})"),
        "DbpoolPgBouncerClientConnectionsHigh":
            f"max by (pgbouncer) ({q.m('dbpool_pgbouncer_client_usage_ratio')})\n"
            f"> {t('DbpoolPgBouncerClientConnectionsHigh')}",
        # max_client_conn (label server), and each session-mode database's server pools (server, database).
        "DbpoolPgBouncerClientOvercommit":
            f"dbpool:pgbouncer_client_budget:ratio > {t('DbpoolPgBouncerClientOvercommit')}\nor\n"
            f"dbpool:pgbouncer_session_budget:ratio > {t('DbpoolPgBouncerClientOvercommit')}",
        # Every server connection the pool may open is busy: its own limit (pool_size + reserve), or its
        # database's max_db_connections shared with the other users' pools. A PAUSEd database or a
        # PostgreSQL that refuses logins also queues clients, but with idle slots: not this alert.
        "DbpoolPgBouncerPoolSaturated":
            f"{q.m('dbpool_oldest_pending_acquire_age_seconds', BOUNCER)}\n"
            f"> {t('DbpoolPgBouncerPoolSaturated')}\n"
            f"and {on}\n(\n  {q.m('dbpool_usage_ratio', BOUNCER)} >= 1\n  or {on}\n"
            f"  {q.m('dbpool_pgbouncer_pool_info')}\n"
            f"  * on ({q.inst}, pgbouncer, database) group_left ()\n"
            f"  (\n    {q.m('dbpool_pgbouncer_database_server_connections')}\n"
            f"    >= ({q.m('dbpool_pgbouncer_database_max_connections')} > 0)\n  )\n)",
        "DbpoolSourceDown": f"{q.m('dbpool_source_up')} == 0",
        # The daemon by its job name; an in-process exporter under any job by its recent dbpool series.
        "DbpoolExporterDown":
            f"up{{{config['exporter_selector']}}} == 0\nor\n"
            f"(\n  up == 0\n  and on ({', '.join(q.inst_list)})\n"
            f"  group by ({', '.join(q.inst_list)}) (last_over_time({q.m('dbpool_source_up')}[1h]))\n)",
    }


_POOL = ("pool {{ $labels.pool }} ({{ $labels.kind }}) on {{ $labels.instance }}"
         "{{ with $labels.worker }} worker {{ . }}{{ end }}")
_POOL_CAP = "P" + _POOL[1:]


def _top_site(q: _Q) -> str:
    """' Top holder: get_db (app/db/session.py:31) holds 57 of 60.' for the alert's own pool, or ''."""
    keys = [*q.inst_list, "worker", "pool", "kind"]
    matchers = ",".join(f"{k}=%q" for k in keys)
    args = " ".join(f"$labels.{k}" for k in keys)
    sites = q.m("dbpool_site_checked_out_connections", f'{matchers},site!="other"')
    limit = q.m("dbpool_max_connections", matchers)
    return ("{{ with printf `topk(1, " + sites + " > 0)` " + args + " | query }}{{ with first . }}"
            " Top holder: {{ .Labels.site }} holds {{ .Value }}"
            "{{ with printf `" + limit + "` " + args + " | query }} of {{ . | first | value }}{{ end }}."
            "{{ end }}{{ end }}")


def _annotations(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    a = config["alerts"]
    top = _top_site(_Q(config))
    fc, im = a["DbpoolPoolExhaustionForecast"], a["DbpoolPoolExhaustionImminent"]

    def pct(name: str) -> str:
        return f"{a[name]['threshold'] * 100:g}%"

    usable_q = ('{{ with printf "dbpool:server_usable_connections:max{server=%q}" $labels.server | query }}'
                '{{ . | first | value | humanize }}{{ end }}')
    bouncer_sum_q = ('{{ with printf "dbpool:server_pool_max:sum{server=%q}" $labels.server | query }}'
                     '{{ . | first | value | humanize }}{{ end }}')
    capacity_q = ('{{ with printf "dbpool:pgbouncer_client_capacity:min{server=%q}" $labels.server | query }}'
                  '({{ . | first | value | humanize }}){{ end }}')
    session_q = ('{{ with printf "dbpool:pgbouncer_session_capacity:sum{server=%q,database=%q}" $labels.server '
                 '$labels.database | query }}({{ . | first | value | humanize }}){{ end }}')
    keys = [*_Q(config).inst_list, "worker", "pool", "kind"]
    timeout = _Q(config).m("dbpool_acquire_timeout_seconds", ",".join(f"{k}=%q" for k in keys))
    wait_timeout_q = ("{{ with printf `" + timeout + "` " + " ".join(f"$labels.{k}" for k in keys)
                      + " | query }} ({{ . | first | value | humanizeDuration }}){{ end }}")
    # histogram_quantile interpolates inside the bucket above the timeout, so a p95 can read 42 s against a
    # 30 s timeout: say what that means instead of leaving a wait no caller had.
    past_timeout = ("{{ $wait := $value }}{{ with printf `" + timeout + "` " + " ".join(f"$labels.{k}" for k in keys)
                    + " | query }}{{ $limit := . | first | value }}{{ if ge $wait $limit }} That is past the pool's "
                    "{{ $limit | humanizeDuration }} acquire timeout: more than 5% of callers timed out (the estimate "
                    "is interpolated inside the histogram bucket above the timeout).{{ end }}{{ end }}")
    return {
        "DbpoolPoolUsageHigh": (
            "Connection pool {{ $labels.pool }} is more than " + pct("DbpoolPoolUsageHigh") + " used.",
            _POOL_CAP + " has {{ $value | humanizePercentage }} of its maximum connections "
            "checked out (threshold " + pct("DbpoolPoolUsageHigh") + " for " + a["DbpoolPoolUsageHigh"]["for"]
            + "). The next burst will make callers wait for a connection." + top),
        "DbpoolPoolExhausted": (
            "Connection pool {{ $labels.pool }} is exhausted and callers are waiting.",
            _POOL_CAP + " has every connection checked out and {{ $value }} callers waiting "
            "for one; they fail when the pool's acquire timeout runs out." + top),
        "DbpoolAcquireWaitNearTimeout": (
            "A caller of pool {{ $labels.pool }} is about to time out waiting for a connection.",
            "A caller of " + _POOL + " has waited {{ $value | humanizeDuration }} for a connection and "
            "still waits: more than " + pct("DbpoolAcquireWaitNearTimeout") + " of the pool's acquire "
            "timeout. When the timeout runs out the request fails." + top),
        "DbpoolPoolExhaustionForecast": (
            "Connection pool {{ $labels.pool }} will run out of connections at this rate.",
            "Connections held by " + _POOL + " keep rising: their 1m floor grew in each of the last two "
            + fc["step_window"] + " and, at the trend of the last " + fc["window"] + ", reaches the pool's "
            "limit within " + fc["horizon"] + " (forecast: {{ $value | humanize }}). Steady growth that "
            "bursts do not explain is how a connection leak looks." + top),
        "DbpoolPoolExhaustionImminent": (
            "Connection pool {{ $labels.pool }} will run out of connections within minutes.",
            _POOL_CAP + " has at least " + pct("DbpoolPoolExhaustionImminent") + " of its connections out and "
            "more every minute: their 1m floor grew in each of the last two " + im["step_window"] + ", one code "
            "site holds more of them with its oldest out for over " + _num(im["site_age"]) + " s, and at the "
            "trend of the last " + im["window"] + " the pool reaches its limit within " + im["horizon"]
            + " (forecast: {{ $value | humanize }}). Callers will then wait, and fail at the pool's acquire "
            "timeout." + top),
        "DbpoolAcquireWaitSlow": (
            "Acquiring a connection from pool {{ $labels.pool }} takes more than "
            + _num(a["DbpoolAcquireWaitSlow"]["threshold"]) + " s.",
            "Callers of " + _POOL + " wait {{ $value | humanizeDuration }} for a connection "
            "(p95 over 5m, or psycopg's mean wait of queued requests)." + past_timeout),
        "DbpoolAcquireTimeouts": (
            "Acquires from connection pool {{ $labels.pool }} are timing out.",
            # increase() extrapolates to the window's edges (81.28): a count of timeouts is a whole number.
            "Acquire timeouts of " + _POOL + " in the last 5m: about {{ $value | printf \"%.0f\" }}. Requests are "
            "failing because no connection became free within the pool's timeout."),
        "DbpoolConnectionLeak": (
            "A connection of pool {{ $labels.pool }} is held far longer than expected.",
            '{{ if eq $labels.signal "checkout_age" }}The oldest checkout of ' + _POOL
            + " has been out for {{ $value | humanizeDuration }} (threshold "
            + _num(a["DbpoolConnectionLeak"]["threshold"]) + " s).{{ else }}Connections of " + _POOL
            + " held past the leak detector's threshold in the last " + a["DbpoolConnectionLeak"]["leak_window"]
            + ": {{ $value | humanize }}. The exporter's log has the stack that checked each one out.{{ end }}"
            + top),
        "DbpoolServerConnectionsHigh": (
            "PostgreSQL {{ $labels.server }} is more than " + pct("DbpoolServerConnectionsHigh")
            + " of its usable connections.",
            "Server {{ $labels.server }} has {{ $value | humanizePercentage }} of its usable connections "
            "(max_connections minus reserved) in use by client backends."),
        "DbpoolIdleInTransaction": (
            "A session on {{ $labels.server }} is idle in transaction.",
            "A session of application '{{ $labels.application_name }}' on {{ $labels.server }} database "
            "{{ $labels.database }} has been idle in transaction for {{ $value | humanizeDuration }}: it holds "
            "a connection and its locks while doing nothing."),
        "DbpoolPoolOvercommit": (
            "Pools pointing at {{ $labels.server }} may open more connections than it accepts.",
            "The pools pointing at {{ $labels.server }} may open {{ $value }} connections together "
            "(Σ max_connections over every replica), more than " + pct("DbpoolPoolOvercommit")
            + " of the server's " + usable_q + " usable connections. Under load the server, not the pools, "
            "will refuse connections."),
        "DbpoolPgBouncerClientConnectionsHigh": (
            "PgBouncer {{ $labels.pgbouncer }} is more than " + pct("DbpoolPgBouncerClientConnectionsHigh")
            + " of max_client_conn.",
            "PgBouncer {{ $labels.pgbouncer }} holds {{ $value | humanizePercentage }} of its max_client_conn "
            "client connections (threshold " + pct("DbpoolPgBouncerClientConnectionsHigh") + " for "
            + a["DbpoolPgBouncerClientConnectionsHigh"]["for"] + "). At 100% it refuses new clients, "
            "whatever its server pools look like."),
        "DbpoolPgBouncerClientOvercommit": (
            "App pools pointing at PgBouncer {{ $labels.server }}{{ with $labels.database }} database {{ . }}"
            "{{ end }} may open more connections than it accepts.",
            "{{ if $labels.database }}The app pools that use session-mode database {{ $labels.database }} of "
            "PgBouncer {{ $labels.server }} may open {{ $value | humanizePercentage }} of that database's server "
            "pools " + session_q + ". In session pooling every client connection holds a server connection: the "
            "ones beyond wait inside PgBouncer at their first query and fail after query_wait_timeout."
            "{{ else }}The app pools that name PgBouncer {{ $labels.server }} as their server may open "
            + bouncer_sum_q + " client connections together (Σ max_connections over every replica), "
            "{{ $value | humanizePercentage }} of its max_client_conn " + capacity_q + ". Under load PgBouncer "
            "will refuse clients.{{ end }}"),
        "DbpoolPgBouncerPoolSaturated": (
            "Clients queue inside PgBouncer for pool {{ $labels.pool }}.",
            "The oldest client queued in PgBouncer " + _POOL + " has waited {{ $value | humanizeDuration }} "
            "for a server connection while every server connection the pool may open is busy. Clients fail "
            "once they have waited query_wait_timeout" + wait_timeout_q + "."),
        "DbpoolSourceDown": (
            "dbpool exporter source {{ $labels.source }} is failing.",
            "Source {{ $labels.source }} ({{ $labels.kind }}) on {{ $labels.instance }} has failed every "
            "poll for " + a["DbpoolSourceDown"]["for"] + "; its metrics are missing, so other alerts on it "
            "cannot fire."),
        "DbpoolExporterDown": (
            "dbpool exporter {{ $labels.instance }} is down.",
            "Prometheus cannot scrape {{ $labels.instance }} (job {{ $labels.job }}) for "
            + a["DbpoolExporterDown"]["for"] + "; no pool or server alert can fire for it."),
    }


def alerting_rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    exprs, notes = _alert_exprs(config), _annotations(config)
    rules = []
    for name, settings in config["alerts"].items():
        summary, description = notes[name]
        rules.append({
            "alert": name,
            "expr": exprs[name],
            "for": settings["for"],
            "labels": {"severity": settings["severity"]},
            "annotations": {
                "summary": summary,
                "description": description,
                "runbook_url": f"{config['runbook_url']}#{name.lower()}",
            },
        })
    return rules


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(doc: dict[str, Any]) -> str:
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def render(overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Rule files as ``{filename: YAML text}`` for CONFIG deep-merged with ``overrides``.

    E.g. every alert with a short ``for:`` for an end-to-end test:
    ``render({"alerts": {name: {"for": "10s"} for name in CONFIG["alerts"]}})``.
    """
    config = merged(overrides)
    for name, settings in config["alerts"].items():
        if not isinstance(settings.get("for"), str):
            raise ConfigError(f"alerts.{name}.for must be a duration string such as '5m'")
    return {
        RULES_FILE: _dump({"groups": [{"name": "dbpool.rules", "rules": recording_rules(config)}]}),
        ALERTS_FILE: _dump({"groups": [{"name": "dbpool.alerts", "rules": alerting_rules(config)}]}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files differ")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write (default: alerts/)")
    args = parser.parse_args(argv)
    try:
        files = render()
    except ConfigError as exc:
        print(f"alerts/generate.py: {exc}", file=sys.stderr)
        return 2
    return write_or_check(files, args.out, check=args.check, command="python alerts/generate.py")


if __name__ == "__main__":
    sys.exit(main())
