"""The Grafana dashboards: generated from grafanalib sources, modern schema, every query valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `dashboards` is a package at the repository root, not installed

from dashboards import generate  # noqa: E402
from dbpool_exporter import metrics  # noqa: E402

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
VARIABLES = {"job", "instance", "pool", "server"}
SERVER_VARIABLES = {"server", "pgbouncer"}
# The exporter's metric vocabulary (the catalogue, dbpool_exporter/metrics.py): a query naming anything else is a typo.
VOCABULARY = metrics.sample_names()


# PgBouncer's own series (README "PgBouncer metrics"), kept apart from the list above.
PGBOUNCER_METRICS = {
    "dbpool_pgbouncer_info", "dbpool_pgbouncer_max_client_connections", "dbpool_pgbouncer_client_connections",
    "dbpool_pgbouncer_client_usage_ratio", "dbpool_pgbouncer_pool_info", "dbpool_pgbouncer_pool_clients",
    "dbpool_pgbouncer_pool_servers", "dbpool_pgbouncer_database_info", "dbpool_pgbouncer_database_pool_size",
    "dbpool_pgbouncer_database_server_connections", "dbpool_pgbouncer_database_max_connections",
    *(f"dbpool_pgbouncer_{c}_total" for c in ("transactions", "queries", "client_wait_seconds", "server_assignments")),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return generate.render()


def _resolve(expr: str) -> str:
    """What Grafana sends for "All" selections: the regex `.*`, and a concrete rate interval."""
    expr = expr.replace("$__rate_interval", "1m")
    for name in VARIABLES | SERVER_VARIABLES:
        expr = expr.replace(f"${name}", ".*")
    return expr


def test_committed_json_is_what_the_sources_generate(rendered: dict[str, dict[str, Any]]) -> None:
    for name, data in rendered.items():
        path = ROOT / "dashboards" / name
        assert path.exists(), f"{path} missing: run python dashboards/generate.py"
        assert path.read_text() == generate.dump(data), f"{path} is stale: run python dashboards/generate.py"
    assert {p.name for p in (ROOT / "dashboards").glob("*.json")} == set(rendered)


def test_schema_datasource_input_and_uids(rendered: dict[str, dict[str, Any]]) -> None:
    uids = set()
    for data in rendered.values():
        assert data["schemaVersion"] >= 39
        assert [(i["name"], i["type"], i["pluginId"]) for i in data["__inputs"]] == [
            ("DS_PROMETHEUS", "datasource", "prometheus")]
        uids.add(data["uid"])
        for panel in data["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DS, panel["title"]
            assert panel["targets"], panel["title"]
            for tgt in panel["targets"]:
                assert tgt["datasource"] == DS and tgt["expr"].strip(), panel["title"]
    assert len(uids) == len(rendered)


def test_layout_has_unique_ids_and_no_overlaps(rendered: dict[str, dict[str, Any]]) -> None:
    for data in rendered.values():
        ids = [p["id"] for p in data["panels"]]
        assert len(ids) == len(set(ids))
        titles = [p["title"] for p in data["panels"]]
        assert len(titles) == len(set(titles)), "panel titles name the queries: keep them unique"
        cells: set[tuple[int, int]] = set()
        for panel in data["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not mine & cells, f"{panel['title']} overlaps another panel"
            cells |= mine


def test_template_variables(rendered: dict[str, dict[str, Any]]) -> None:
    overview = {v["name"]: v for v in rendered["dbpool-overview.json"]["templating"]["list"]}
    server = {v["name"]: v for v in rendered["dbpool-server.json"]["templating"]["list"]}
    assert set(overview) == VARIABLES | {"DS_PROMETHEUS"}
    assert set(server) == SERVER_VARIABLES | {"DS_PROMETHEUS"}
    for var in [*overview.values(), *server.values()]:
        if var["type"] == "datasource":
            assert var["query"] == "prometheus"
            continue
        assert var["datasource"] == DS
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", var["name"]
        assert var["query"]["query"] == var["definition"].strip()
        assert re.fullmatch(r"label_values\(.+, \w+\)", var["definition"]), var["definition"]


def test_panel_queries_use_variables_only_with_regex_matchers() -> None:
    queries = generate.panel_queries()
    assert len(queries) >= 30
    for title, expr in queries:
        names = set(re.findall(r"\$(\w+)", expr))
        assert names <= VARIABLES | SERVER_VARIABLES | {"__rate_interval"}, (title, names)
        for name in names - {"__rate_interval"}:
            assert re.search(rf'\w+=~"\${name}"', expr) and f'="${name}"' not in expr, (title, expr)
        assert "$__range" not in expr and "$__interval" not in expr.replace("$__rate_interval", ""), title
        assert set(re.findall(r"\bdbpool_\w+", expr)) <= VOCABULARY | PGBOUNCER_METRICS, (title, expr)


def test_overview_covers_the_incident(rendered: dict[str, dict[str, Any]]) -> None:
    data = rendered["dbpool-overview.json"]
    exprs = " ".join(t["expr"] for p in data["panels"] if p["type"] != "row" for t in p["targets"])
    for metric in ("dbpool_usage_ratio", "dbpool_connections", "dbpool_overflow_connections",
                   "dbpool_pending_acquires", "dbpool_pending_acquires_peak", "dbpool_acquire_wait_seconds_bucket",
                   "dbpool_psycopg_requests_wait_seconds_total", "dbpool_acquire_timeouts_total",
                   "dbpool_connection_hold_seconds_bucket", "dbpool_oldest_checkout_age_seconds",
                   "dbpool_server_connections", "dbpool_server_max_connections", "dbpool_server_usable_connections",
                   "dbpool_max_connections", "dbpool_pool_info", "dbpool_oldest_pending_acquire_age_seconds",
                   "dbpool_site_checked_out_connections", "dbpool_site_oldest_checkout_age_seconds"):
        assert metric in exprs, metric
    usage = next(p for p in data["panels"] if p["title"] == "Pool usage")
    assert {"color": "red", "value": 0.8} in usage["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert usage["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
    budget = next(p for p in data["panels"] if p["title"].startswith("Pool budget:"))
    assert "group_left (server)" in budget["targets"][0]["expr"] and "sum by (server)" in budget["targets"][0]["expr"]


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path, rendered: dict[str, dict[str, Any]]) -> None:
    """promtool parses each panel query (and each variable's selector), variables resolved, as a recording rule."""
    exprs = [_resolve(expr) for _, expr in generate.panel_queries()]
    for data in rendered.values():
        for var in data["templating"]["list"]:
            if var["type"] == "query":
                exprs.append(_resolve(re.fullmatch(r"label_values\((.+), \w+\)", var["definition"]).group(1)))
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_cli_writes_and_checks(tmp_path: Path) -> None:
    script = str(ROOT / "dashboards" / "generate.py")
    assert subprocess.run([sys.executable, script, "--check"], capture_output=True, timeout=60).returncode == 0
    stale = subprocess.run([sys.executable, script, "--check", "--out", str(tmp_path)], capture_output=True,
                           text=True, timeout=60)
    assert stale.returncode == 1 and "out of date" in stale.stderr and "Traceback" not in stale.stderr
    assert subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True,
                          timeout=60).returncode == 0
    for name in generate.DASHBOARDS:
        assert json.loads((tmp_path / name).read_text()) == json.loads((ROOT / "dashboards" / name).read_text())
