"""The shipped Prometheus rules: generated from alerts/generate.py, promtool-clean and unit-tested."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "alerts"
RULE_FILES = [ALERTS / "dbpool-rules.yml", ALERTS / "dbpool-alerts.yml"]
UNIT_TESTS = sorted((ALERTS / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
NAMES = {
    "DbpoolPoolUsageHigh": "warning", "DbpoolPoolExhausted": "critical", "DbpoolAcquireWaitNearTimeout": "critical",
    "DbpoolPoolExhaustionForecast": "warning", "DbpoolPoolExhaustionImminent": "critical",
    "DbpoolAcquireWaitSlow": "warning",
    "DbpoolAcquireTimeouts": "critical", "DbpoolConnectionLeak": "warning", "DbpoolServerConnectionsHigh": "warning",
    "DbpoolIdleInTransaction": "warning", "DbpoolPoolOvercommit": "warning", "DbpoolSourceDown": "warning",
    "DbpoolExporterDown": "critical", "DbpoolPgBouncerClientConnectionsHigh": "warning",
    "DbpoolPgBouncerClientOvercommit": "warning", "DbpoolPgBouncerPoolSaturated": "critical",
}
# Fire on the first evaluation that sees a caller past its share of the pool timeout, or two rising
# minutes of a pool that has about three left: a `for:` would let the pool run out first.
NO_FOR = {"DbpoolAcquireWaitNearTimeout", "DbpoolPoolExhaustionImminent"}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dbpool_alerts_generate", ALERTS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def _rules(name: str) -> list[dict]:
    doc = yaml.safe_load((ALERTS / name).read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _promtool(promtool: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_committed_rule_files_are_what_generate_py_renders() -> None:
    rendered = generate.render()
    assert set(rendered) == {path.name for path in RULE_FILES}
    for path in RULE_FILES:
        assert path.read_text() == rendered[path.name], f"{path} is stale: run python alerts/generate.py"


def test_promtool_check_rules(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(NAMES)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert UNIT_TESTS
    result = _promtool(promtool, "test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_alert_names_severities_and_annotations() -> None:
    alerts = {rule["alert"]: rule for rule in _rules("dbpool-alerts.yml")}
    assert {name: rule["labels"]["severity"] for name, rule in alerts.items()} == NAMES
    headings = {line[3:].strip().lower() for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    for name, rule in alerts.items():
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        if name not in ("DbpoolSourceDown", "DbpoolExporterDown"):  # their value is always 0
            assert "{{ $value" in notes["description"], f"{name}: the description should carry the value"
        assert any(f"$labels.{label}" in notes["description"]
                   for label in ("pool", "server", "instance", "pgbouncer")), name
        anchor = notes["runbook_url"].rsplit("#", 1)[1]
        assert notes["runbook_url"].startswith(generate.CONFIG["runbook_url"] + "#")
        assert anchor in headings, f"{name}: docs/runbook.md has no section '## {name}'"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name} needs a for: duration"
        assert (rule["for"] == "0s") == (name in NO_FOR), f"{name}: for: {rule['for']}"


def test_alerts_only_use_recording_rules_that_exist() -> None:
    recorded = {rule["record"] for rule in _rules("dbpool-rules.yml")}
    used = set()
    for rule in _rules("dbpool-alerts.yml") + _rules("dbpool-rules.yml"):
        used |= set(re.findall(r"\bdbpool:[a-z0-9_]+:[a-z0-9_]+", rule["expr"]))
    assert used <= recorded, used - recorded


def _unit_test_cases() -> list[dict]:
    return [case for path in UNIT_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


def _seconds(duration: str) -> int:
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_every_alert_is_unit_tested_firing_and_not_firing_before_its_for() -> None:
    fires: dict[str, set[str]] = {name: set() for name in NAMES}
    quiet: dict[str, set[str]] = {name: set() for name in NAMES}
    just_before: set[str] = set()
    for case in _unit_test_cases():
        checks = case.get("alert_rule_test", [])
        for check in checks:
            (fires if check.get("exp_alerts") else quiet)[check["alertname"]].add(check["eval_time"])
        # The tests that check "not yet" at most a minute before firing are the ones exercising `for:`.
        for f in checks:
            for q in checks:
                if f["alertname"] == q["alertname"] and f.get("exp_alerts") and not q.get("exp_alerts") \
                        and 0 < _seconds(str(f["eval_time"])) - _seconds(str(q["eval_time"])) <= 60:
                    just_before.add(f["alertname"])
    for name in NAMES:
        assert fires[name], f"no promtool test expects {name} to fire"
        assert quiet[name], f"no promtool test expects {name} to stay quiet"
        assert name in just_before, f"{name}: no check a minute or less before it fires"


def test_shorter_for_durations_make_the_unit_tests_fail(promtool: str, tmp_path: Path) -> None:
    """The promtool tests can fail: with every `for:` at 0s the "not yet firing" checks break."""
    overrides = {"alerts": {name: {"for": "0s"} for name in NAMES if name not in NO_FOR}}
    rendered = generate.render(overrides)
    assert "for: 0s" in rendered["dbpool-alerts.yml"] and "for: 5m" not in rendered["dbpool-alerts.yml"]
    for name, text in rendered.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tests").mkdir()
    for path in UNIT_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    result = _promtool(promtool, "test", "rules", *sorted((tmp_path / "tests").glob("*.yml")), cwd=tmp_path)
    assert result.returncode != 0
    for name in set(NAMES) - NO_FOR:
        assert f"alertname: {name}," in result.stdout + result.stderr, f"{name}: its for: is never exercised"


def test_overrides_change_thresholds_and_selectors() -> None:
    rendered = generate.render({
        "selector": 'env="prod"',
        "exporter_selector": 'job="pg-pools"',
        "alerts": {"DbpoolPoolUsageHigh": {"threshold": 0.7}},
    })
    alerts, rules = rendered["dbpool-alerts.yml"], rendered["dbpool-rules.yml"]
    assert "dbpool:pool_usage:ratio > 0.7" in alerts
    assert 'up{job="pg-pools"} == 0' in alerts
    assert "last_over_time(dbpool_source_up{env=\"prod\"}[1h])" in alerts
    assert 'dbpool_usage_ratio{env="prod"}' in rules
    assert 'dbpool_pool_info{server!="", env="prod"}' in rules


def test_bad_overrides_are_rejected_by_name() -> None:
    with pytest.raises(generate.ConfigError, match="alerts.DbpoolPoolUsageHigh.threshhold"):
        generate.render({"alerts": {"DbpoolPoolUsageHigh": {"threshhold": 0.7}}})
    with pytest.raises(generate.ConfigError, match="unknown setting 'nope'"):
        generate.render({"nope": 1})
    with pytest.raises(generate.ConfigError, match="must be a duration"):
        generate.render({"alerts": {"DbpoolSourceDown": {"for": 5}}})


def test_cli_check_reports_drift_in_one_line(tmp_path: Path) -> None:
    script = str(ALERTS / "generate.py")
    ok = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    stale = subprocess.run([sys.executable, script, "--check", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1
    assert "out of date" in stale.stderr and "Traceback" not in stale.stderr
    written = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                             timeout=60)
    assert written.returncode == 0
    assert (tmp_path / "dbpool-alerts.yml").read_text() == (ALERTS / "dbpool-alerts.yml").read_text()
