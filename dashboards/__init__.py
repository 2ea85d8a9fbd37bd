"""Grafana dashboards for dbpool-exporter, written with grafanalib; `python dashboards/generate.py` writes the JSON."""
