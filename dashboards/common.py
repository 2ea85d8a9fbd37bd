"""Shared grafanalib building blocks and the post-processing that brings its JSON to a modern schema."""

from __future__ import annotations

import json
from typing import Any, Iterable

import attr
from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

SCHEMA_VERSION = 39
DS_INPUT = "DS_PROMETHEUS"
DATASOURCE = {"type": "prometheus", "uid": f"${{{DS_INPUT}}}"}
# Every template variable is matched with =~ so "All" (.*) and multi-value selections work.
POOL_SELECTOR = 'job=~"$job", instance=~"$instance", pool=~"$pool"'
SERVER_SELECTOR = 'server=~"$server"'
WIDTH = 24
GREEN, ORANGE, RED = "green", "orange", "red"


def steps(*pairs: tuple[str, float | None]) -> list[dict[str, Any]]:
    """Grafana threshold steps: the first one has no lower bound."""
    return [{"color": color, "value": value} for color, value in pairs]


def target(expr: str, legend: str = "", *, instant: bool = False) -> g.Target:
    return g.Target(expr=expr, legendFormat=legend, instant=instant)


def dashed(regex: str, color: str = RED) -> dict[str, Any]:
    """Override that draws matching series as an unstacked dashed reference line (limits, budgets)."""
    return {
        "matcher": {"id": "byRegexp", "options": regex},
        "properties": [
            {"id": "custom.stacking", "value": {"group": "A", "mode": "none"}},
            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
            {"id": "custom.fillOpacity", "value": 0},
            {"id": "color", "value": {"fixedColor": color, "mode": "fixed"}},
        ],
    }


def timeseries(title: str, description: str, targets: list[g.Target], *, unit: str = "short",
               thresholds: list[dict[str, Any]] | None = None, stack: bool = False,
               overrides: list[dict[str, Any]] | None = None, max_value: int | None = None,
               bars: bool = False) -> g.TimeSeries:
    return g.TimeSeries(
        title=title, description=description, dataSource=DATASOURCE, targets=targets, unit=unit,
        thresholds=thresholds or steps((GREEN, None)),
        thresholdsStyleMode="line+area" if thresholds else "off",
        stacking={"group": "A", "mode": "normal"} if stack else {"group": "A", "mode": "none"},
        fillOpacity=30 if stack or bars else 10, drawStyle="bars" if bars else "line",
        overrides=overrides or [], valueMin=0, valueMax=max_value, showPoints="never",
        legendDisplayMode="table", legendPlacement="right", legendCalcs=["lastNotNull", "max"],
        tooltipMode="multi", tooltipSort="desc",
    )


def stat(title: str, description: str, expr: str, *, unit: str = "short",
         thresholds: list[dict[str, Any]] | None = None) -> g.Stat:
    return g.Stat(
        title=title, description=description, dataSource=DATASOURCE, targets=[target(expr)], format=unit,
        thresholds=thresholds or steps((GREEN, None)), reduceCalc="lastNotNull", colorMode="background",
        graphMode="area", noValue="0",
    )


def variable(name: str, label: str, query: str) -> g.Template:
    return g.Template(name=name, label=label, query=query, dataSource=DATASOURCE, includeAll=True, multi=True,
                      allValue=".*", default="All", refresh=g.REFRESH_ON_TIME_RANGE_CHANGE, sort=g.SORT_ALPHA_ASC)


def datasource_variable() -> g.Template:
    # Named like the import input, so "${DS_PROMETHEUS}" also resolves when the JSON is provisioned
    # from files (no import step to substitute it).
    return g.Template(name=DS_INPUT, label="Data source", query="prometheus", type="datasource", default="",
                      includeAll=False, multi=False)


def layout(rows: Iterable[tuple[str, list[tuple[g.Panel, int, int]]]]) -> list[g.Panel]:
    """Rows of (panel, width, height), wrapped left to right; gridPos and ids assigned in order."""
    panels: list[g.Panel] = []
    y = 0
    for title, row in rows:
        panels.append(g.RowPanel(title=title, gridPos=g.GridPos(h=1, w=WIDTH, x=0, y=y)))
        y += 1
        x, line_height = 0, 0
        for panel, width, height in row:
            if x + width > WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(attr.evolve(panel, gridPos=g.GridPos(h=height, w=width, x=x, y=y)))
            x += width
            line_height = max(line_height, height)
        y += line_height
    return [attr.evolve(panel, id=i) for i, panel in enumerate(panels, start=1)]


def finish(dashboard: g.Dashboard) -> dict[str, Any]:
    """grafanalib's JSON, brought to schemaVersion 39 with a ${DS_PROMETHEUS} import input."""
    data: dict[str, Any] = json.loads(json.dumps(dashboard.to_json_data(), cls=DashboardEncoder))
    for key in ("rows", "hideControls", "sharedCrosshair", "style", "gnetId", "id"):
        data.pop(key, None)
    data["schemaVersion"] = SCHEMA_VERSION
    data["__inputs"] = [{
        "name": DS_INPUT, "label": "Prometheus", "description": "Prometheus scraping dbpool-exporter",
        "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus",
    }]
    data["__requires"] = [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        *({"type": "panel", "id": kind, "name": kind, "version": ""}
          for kind in sorted({p["type"] for p in data["panels"] if p["type"] != "row"})),
    ]
    for panel in data["panels"]:
        _clean_panel(panel)
    for var in data["templating"]["list"]:
        for key in ("tagsQuery", "tagValuesQuery", "useTags", "auto", "auto_min", "auto_count"):
            var.pop(key, None)
        if var["type"] == "query":
            var["definition"] = var["query"]
            var["query"] = {"query": var["query"], "refId": f"PrometheusVariableQueryEditor-{var['name']}"}
            var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
        elif var["type"] == "datasource":
            var["current"] = {}
            var.pop("datasource", None)
    data["annotations"] = {"list": [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
    }]}
    return dict(sorted(data.items()))


# Keys of the old graph-panel era that schema 39 does not use; empty ones only, where still valid.
_OBSOLETE_PANEL_KEYS = ("span", "height", "minSpan", "error")
_EMPTY_PANEL_KEYS = ("cacheTimeout", "hideTimeOverride", "timeFrom", "timeShift", "repeat", "repeatDirection",
                     "maxPerRow", "interval", "description")


def _clean_panel(panel: dict[str, Any]) -> None:
    for key in _OBSOLETE_PANEL_KEYS:
        panel.pop(key, None)
    for key in _EMPTY_PANEL_KEYS:
        if panel.get(key) in (None, "", False):
            panel.pop(key, None)
    if panel["type"] == "row":
        panel.pop("datasource", None)
        panel.pop("targets", None)
        panel.pop("fieldConfig", None)
        return
    for ref, tgt in zip("ABCDEFGHIJ", panel["targets"], strict=False):
        tgt.update(refId=ref, datasource=DATASOURCE, editorMode="code", range=not tgt["instant"])
        for key in ("query", "target", "metric", "step", "intervalFactor", "hide"):
            tgt.pop(key, None)
        if not tgt.get("interval"):
            tgt.pop("interval", None)


def queries(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every panel target of a finished dashboard."""
    return [(p["title"], t["expr"]) for p in data["panels"] if p["type"] != "row" for t in p["targets"]]
