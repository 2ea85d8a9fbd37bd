"""End to end: real pools -> exporter -> Prometheus with the shipped rules -> Alertmanager, and every panel query."""

from __future__ import annotations

import glob
import importlib.util
import os
import queue
import re
import threading
from collections import deque
from typing import Any, Callable

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine

from bouncer import Bouncer
from dbpool_exporter import Exporter
from dbpool_exporter.sources.pgbouncer import PgBouncerSource
from dbpool_exporter.throwaway import free_port
from promstack import PromStack, StackError, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overridable so the test can be pointed at rules/dashboards elsewhere; CI uses the repository's.
ALERTS_DIR = os.environ.get("DBPOOL_E2E_ALERTS_DIR", os.path.join(ROOT, "alerts"))
DASHBOARDS_DIR = os.environ.get("DBPOOL_E2E_DASHBOARDS_DIR", os.path.join(ROOT, "dashboards"))
EXPECTED_ALERTS = {"DbpoolPoolUsageHigh", "DbpoolPoolExhausted", "DbpoolAcquireWaitSlow"}
POOLS = ("app", "checkpointer")
# A waiter waits this long for a connection (> the 5 s the wait alert is about, < the pools' timeout).
SLOW_WAIT = 6.0
POOL_TIMEOUT = 8.0

_FOR = re.compile(r"(?m)^(\s*)(keep_firing_for|for)(\s*:\s*)\S+")
_RANGE = re.compile(r"\[\s*(?:\d+[smhdwy])+\s*\]")


def fast_rules(text: str) -> str:
    """The shipped rules with `for:` cut to seconds and range windows to 20 s, so a test sees them fire and resolve.

    A rule written as ``rate(x[5m]) > ...`` would otherwise keep firing for five minutes after the
    pools are released.
    """
    text = _FOR.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{'3s' if m.group(2) == 'for' else '1s'}", text)
    return _RANGE.sub("[20s]", text)


def load_rules() -> dict[str, str]:
    """Every rule file (YAML with ``groups``) under alerts/, rewritten by ``fast_rules``."""
    rules = {}
    for path in sorted(glob.glob(os.path.join(ALERTS_DIR, "**", "*.y*ml"), recursive=True)):
        with open(path) as f:
            text = f.read()
        parsed = yaml.safe_load(text)
        if isinstance(parsed, dict) and "groups" in parsed:  # not promtool unit-test files
            rules[os.path.relpath(path, ALERTS_DIR).replace(os.sep, "_")] = fast_rules(text)
    return rules


def load_panel_queries() -> list[tuple[str, str]] | None:
    path = os.path.join(DASHBOARDS_DIR, "generate.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("dbpool_dashboards_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.panel_queries())


_MATCHER_ON_VAR = re.compile(r'(\w+)\s*=~?\s*"\$(?:\{\s*\w+(?::\w+)?\s*\}|\w+)"')


def concrete(expr: str) -> str:
    """A Grafana panel expression with its variables filled in the way "All" would."""
    expr = re.sub(r"\$(?:\{__rate_interval\}|__rate_interval|\{__interval\}|__interval)", "1m", expr)
    expr = re.sub(r"\$(?:\{__range\}|__range)", "5m", expr)
    expr = _MATCHER_ON_VAR.sub(lambda m: f'{m.group(1)}=~".*"', expr)
    return re.sub(r"\$(?:\{\s*\w+(?::\w+)?\s*\}|\w+)", ".*", expr)


class Squeeze(threading.Thread):
    """Holds every connection of a pool and keeps one more caller waiting ``SLOW_WAIT`` s for one.

    Each round releases one connection to the waiter, which then holds it in turn, so after the
    first fills every acquire the pool sees waits ``SLOW_WAIT`` long: usage stays at 1 with a waiter.
    """

    def __init__(self, name: str, acquire: Callable[[], Any], release: Callable[[Any], None], size: int) -> None:
        super().__init__(name=f"squeeze-{name}", daemon=True)
        self.acquire, self.release, self.size = acquire, release, size
        self.stopping = threading.Event()
        self.rounds = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        held: deque[Any] = deque()
        try:
            for _ in range(self.size):
                held.append(self.acquire())
            while not self.stopping.is_set():
                got: queue.Queue[Any] = queue.Queue()
                waiter = threading.Thread(target=self._wait_for_one, args=(got,), daemon=True)
                waiter.start()
                self.stopping.wait(SLOW_WAIT)
                self.release(held.popleft())
                result = got.get(timeout=POOL_TIMEOUT + 10)
                waiter.join(timeout=5)
                if isinstance(result, BaseException):
                    self.errors.append(result)
                    break
                held.append(result)
                self.rounds += 1
        except BaseException as e:
            self.errors.append(e)
        finally:
            while held:
                self.release(held.popleft())

    def _wait_for_one(self, got: queue.Queue[Any]) -> None:
        try:
            got.put(self.acquire())
        except BaseException as e:
            got.put(e)

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=POOL_TIMEOUT + 20)
        assert not self.is_alive(), f"{self.name} did not stop"


def _register_server_source(exporter: Exporter, dsn: str) -> bool:
    # Server panels need the PostgreSQL server source; it lives on another branch until merged.
    try:
        from dbpool_exporter.sources.postgres import PostgresSource  # type: ignore[import-not-found]
    except ImportError:
        return False
    exporter.register("server", PostgresSource("server", dsn))
    return True


def _pgbouncer_in_front(exporter: Exporter, dsn: str) -> Bouncer:
    """A real PgBouncer in front of the test server, watched by the exporter: the dashboard's PgBouncer row."""
    params = conninfo_to_dict(dsn)
    target = " ".join(f"{key}={params[key]}" for key in ("host", "port", "dbname", "user", "password") if key in params)
    bouncer = Bouncer({"app": target}, {"stats": "stats-e2e-1", "app": "app-e2e-1"}).start()
    exporter.register("pgb", PgBouncerSource("pgb", bouncer.dsn("stats"), interval=1))
    _through(bouncer)  # PgBouncer opens a database/user pool at its first client
    return bouncer


def _through(bouncer: Bouncer, queries: int = 1) -> None:
    with psycopg.connect(bouncer.dsn("app", "app"), autocommit=True, prepare_threshold=None) as conn:
        for _ in range(queries):
            conn.execute("SELECT 1")


def _firing_in_alertmanager(stack: PromStack) -> set[tuple[str, str]]:
    return {(a["labels"].get("alertname", ""), a["labels"].get("pool", "")) for a in stack.alertmanager_alerts()}


def _context(stack: PromStack) -> str:
    try:
        prom = sorted({(a["labels"]["alertname"], a["labels"].get("pool", ""), a["state"])
                       for a in stack.prometheus_alerts()})
        am = sorted(_firing_in_alertmanager(stack))
    except Exception as e:
        return f"(could not read the alert state: {e})\n{stack.logs()}"
    return f"Prometheus alerts: {prom}\nAlertmanager alerts: {am}\n{stack.logs()}"


def _run_panels(stack: PromStack, panels: list[tuple[str, str]]) -> list[str]:
    problems = []
    for title, expr in panels:
        query = concrete(expr)
        try:
            result = stack.query(query)
        except StackError as e:
            problems.append(f"panel {title!r}: {e}")
            continue
        if not result:
            problems.append(f"panel {title!r} returned nothing while the pools were busy: {query}")
    return problems


def test_alerts_reach_alertmanager_and_resolve_and_every_panel_answers(pg_dsn: str, sync_url: str) -> None:
    rules = load_rules()
    panels = load_panel_queries()
    missing = []
    if not rules:
        missing.append(f"alerts/ has no rule files (looked for YAML with 'groups' under {ALERTS_DIR})")
    if panels is None:
        missing.append(f"dashboards/generate.py with panel_queries() not found (in {DASHBOARDS_DIR})")
    if missing:
        pytest.fail("; ".join(missing))
    assert panels, "panel_queries() returned no panels"

    engine = create_engine(sync_url, pool_size=1, max_overflow=1, pool_timeout=POOL_TIMEOUT)
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=2, timeout=POOL_TIMEOUT, open=True)
    exporter = Exporter()
    squeezes = [Squeeze("app", engine.connect, lambda conn: conn.close(), 2),
                # Looked up at call time: registering the pool instruments its getconn/putconn.
                Squeeze("checkpointer", lambda: pool.getconn(), lambda conn: pool.putconn(conn), 2)]
    stack: PromStack | None = None
    bouncer: Bouncer | None = None
    try:
        # Leak detection on (threshold far away) so the leak panels have a series to show; a short
        # peak window so peak-based rules see the release within the test's bounded wait.
        for name, target in (("app", engine), ("checkpointer", pool)):
            exporter.register(name, target, leak_threshold=600, peak_window=10)
        with_server = _register_server_source(exporter, pg_dsn)
        bouncer = _pgbouncer_in_front(exporter, pg_dsn)
        port = free_port()
        exporter.start_http_server(port)
        stack = PromStack([f"127.0.0.1:{port}"], rules).start()
        wait_until(stack.targets_up, timeout=30, what="Prometheus scraping the exporter")
        loaded = {r["name"] for g in stack.rule_groups() for r in g["rules"] if r["type"] == "alerting"}
        assert loaded >= EXPECTED_ALERTS, f"rules missing from alerts/: {sorted(EXPECTED_ALERTS - loaded)}"

        for squeeze in squeezes:
            squeeze.start()
        wanted = {(name, pool_name) for name in EXPECTED_ALERTS for pool_name in POOLS}
        try:
            wait_until(lambda: wanted <= _firing_in_alertmanager(stack), timeout=60, interval=1,
                       what=f"{sorted(wanted)} in Alertmanager")
        except StackError as e:
            pytest.fail(f"{e}\n{_context(stack)}")
        # Traffic through PgBouncer, so its rate panels (and the wait per transaction) have an increase.
        _through(bouncer, 5)
        wait_until(lambda: stack.query("rate(dbpool_pgbouncer_transactions_total[1m]) > 0"), timeout=20,
                   what="PgBouncer's transactions in Prometheus")
        problems = _run_panels(stack, panels)  # the pools are still exhausted here

        for squeeze in squeezes:
            squeeze.finish()
        for squeeze in squeezes:
            assert not squeeze.errors, f"{squeeze.name}: {squeeze.errors!r}"
            assert squeeze.rounds >= 2, f"{squeeze.name} made only {squeeze.rounds} slow waits"
        try:
            wait_until(lambda: not (wanted & _firing_in_alertmanager(stack)), timeout=60, interval=1,
                       what="the alerts to resolve after the pools were released")
        except StackError as e:
            pytest.fail(f"{e}\n{_context(stack)}")
        if problems:
            pytest.fail("\n".join(problems) + ("" if with_server else "\n(no PostgreSQL server source was available)"))
    finally:
        for squeeze in squeezes:
            squeeze.stopping.set()
        for squeeze in squeezes:
            if squeeze.is_alive():
                squeeze.join(timeout=POOL_TIMEOUT + 20)
        if stack is not None:
            stack.stop()
        exporter.stop()
        if bouncer is not None:
            bouncer.destroy()
        pool.close()
        engine.dispose()


def test_fast_rules_rewrites_durations_and_windows() -> None:
    text = ("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: rate(x[5m]) > 0 and y[1h30m] offset 1h\n"
            "    for: 10m\n    keep_firing_for: 5m\n    labels: {severity: warning}\n")
    assert fast_rules(text) == text.replace("[5m]", "[20s]").replace("[1h30m]", "[20s]").replace(
        "for: 10m", "for: 3s").replace("keep_firing_for: 5m", "keep_firing_for: 1s")


def test_concrete_fills_grafana_variables() -> None:
    expr = ('sum by (pool) (rate(dbpool_acquire_wait_seconds_count{job="$job", instance=~"${instance}", '
            'pool=~"$pool"}[$__rate_interval])) / on() group_left max(x[$__interval]) + y{server=~"${server:regex}"}')
    assert concrete(expr) == ('sum by (pool) (rate(dbpool_acquire_wait_seconds_count{job=~".*", instance=~".*", '
                              'pool=~".*"}[1m])) / on() group_left max(x[1m]) + y{server=~".*"}')
