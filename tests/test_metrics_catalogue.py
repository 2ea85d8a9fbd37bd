"""The metric catalogue: what every source emits, what README lists and what the alert rules query agree."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dbpool_exporter import daemon, metrics, workers
from dbpool_exporter.collector import DbpoolCollector
from dbpool_exporter.families import CHECK_ENV, Families, Histogram
from dbpool_exporter.poller import Poller, SourceState
from dbpool_exporter.snapshot import PoolSnapshot
from dbpool_exporter.sources import pgbouncer, postgres, psycopg

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "exporter" / "dbpool_exporter"
UNITS = ("seconds", "bytes", "ratio")


def _everything() -> dict[str, PoolSnapshot | postgres.ServerSnapshot | pgbouncer.PgBouncerSnapshot]:
    """One snapshot of each kind with every optional field set, so every family a source can emit appears."""
    hist = Histogram((0.1, 1.0, float("inf")), (1, 2, 3), 4.5)
    full = dict(checked_out=3, idle=2, overflow=1, min=4, max=10, timeout=30.0, pending=1, acquire_timeouts=2,
                server="db:5432", database="app", acquire_wait=hist, hold=hist, checked_out_peak=5, pending_peak=2,
                oldest_checkout_age=1.5, oldest_pending_age=0.5, leaks=1, sites=(("f (a.py:1)", 2, 1.0),))
    view = PoolSnapshot(kind="pgbouncer", pool_class="PgBouncer", checked_out=1, idle=2, min=0, max=20,
                        server="db:5432", database="app")
    return {
        "sa": PoolSnapshot(kind="sqlalchemy", pool_class="QueuePool", **full),  # type: ignore[arg-type]
        "pg": PoolSnapshot(kind="psycopg", pool_class="ConnectionPool",  # type: ignore[arg-type]
                           counters={spec.name: 1.0 for spec, _ in psycopg.COUNTERS.values()}, **full),
        "srv": postgres.ServerSnapshot(
            server="db:5432", max_connections=100, reserved_connections=3,
            connections=(("app", "u", "a", "idle", 2),), oldest_xact_age=(("app", "a", 1.0),),
            oldest_idle_xact_age=(("app", "a", 0.5),), lock_waiting=(("app", 1),), folded=(("user", 2),)),
        "bnc": pgbouncer.PgBouncerSnapshot(
            pgbouncer="bnc:6432", version="1.25.1", pool_mode="transaction",
            config=tuple((key, 10.0) for key in pgbouncer.CONFIG_GAUGES), lists=(("used_clients", 5),),
            pools=(pgbouncer.PgBouncerPool("app", "u", (("waiting", 0),), (("idle", 2),), 0.25, "transaction",
                                           view),),
            databases=(pgbouncer.PgBouncerDatabase("app", "db:5432", "app", "transaction", 20, 0, 5, 0, 3, 0, 0),),
            stats=tuple(("app", spec.name, 7.0) for spec, _ in pgbouncer.STATS_COLUMNS.values()),
            folded=(("user", 1),)),
    }


def _scrape_everything() -> str:
    poller = Poller()
    for name, snap in _everything().items():
        poller.states[name] = SourceState(
            source=SimpleNamespace(kind=getattr(snap, "kind", name), interval=1e9),  # type: ignore[arg-type]
            snapshot=snap, snapshot_at=time.monotonic(), up=True)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DbpoolCollector(poller))
    # The daemon's own families, through the code that serves them.
    fake = SimpleNamespace(reload_ok=True, reload_success_at=1.0, exporter=SimpleNamespace(registry=registry))
    served = SimpleNamespace(collect=daemon._Served(fake).collect_plain)  # type: ignore[arg-type]
    up = SimpleNamespace(collect=lambda: [workers.worker_up([], 1)])
    return generate_latest(served).decode() + generate_latest(up).decode()  # type: ignore[arg-type]


def test_every_source_emits_exactly_the_catalogue_with_its_help() -> None:
    families = {f.name: f for f in text_string_to_metric_families(_scrape_everything())}
    # Text format 0.0.4 has no info type: an info family is a gauge named ..._info; the parser drops _total.
    by_parsed_name = {spec.name + "_info" if spec.type == "info" else spec.name: spec
                      for spec in metrics.CATALOGUE.values()}
    assert set(families) == set(by_parsed_name), set(families) ^ set(by_parsed_name)
    for name, family in families.items():
        spec = by_parsed_name[name]
        assert family.documentation == spec.help, name
        assert family.type == ("gauge" if spec.type == "info" else spec.type), name
        for sample in family.samples:
            assert spec.label_problem(sample.labels) is None, (sample, spec.label_problem(sample.labels))


def test_families_refuse_what_the_catalogue_does_not_declare(monkeypatch: pytest.MonkeyPatch) -> None:
    out = Families()
    with pytest.raises(ValueError, match="undeclared"):
        out.gauge(metrics.MIN, {"pool": "p", "kind": "sqlalchemy", "extra": "x"}, 1.0)
    with pytest.raises(ValueError, match="missing"):
        out.gauge(metrics.CONNECTIONS, {"pool": "p", "kind": "sqlalchemy"}, 1.0)
    with pytest.raises(ValueError, match="declared counter"):
        out.gauge(metrics.ACQUIRE_TIMEOUTS, {"pool": "p", "kind": "sqlalchemy"}, 1.0)
    with pytest.raises(KeyError, match="dbpool_nope"):
        PoolSnapshot(kind="psycopg", pool_class="X", counters={"dbpool_nope": 1.0}).emit("p", out)
    # In production a mismatch is rendered, never raised: a scrape must not fail.
    monkeypatch.delenv(CHECK_ENV)
    Families().gauge(metrics.MIN, {"pool": "p"}, 1.0)


def test_catalogue_entries_are_well_formed() -> None:
    for name, spec in metrics.CATALOGUE.items():
        assert re.fullmatch(r"dbpool_[a-z0-9_]+", name) and not name.endswith("_total"), name
        assert not (spec.type == "info" and name.endswith("_info")), name
        assert spec.help and "\n" not in spec.help and spec.help.endswith("."), name
        assert spec.type in metrics.TYPES, name
        assert not set(spec.labels) & set(spec.optional), name
        assert "worker" not in spec.labels or name == "dbpool_worker_up", name  # the reader adds `worker`
        unit = next((u for u in UNITS if name.endswith("_" + u)), "")
        assert spec.unit == unit, f"{name}: unit {spec.unit!r}, name says {unit!r}"


def _table_names(text: str) -> set[str]:
    """Metric names in the first column of Markdown tables."""
    return {name for line in text.splitlines() if line.startswith("|")
            for name in re.findall(r"`(dbpool_\w+)[`{]", line.split("|")[1])}


def test_readme_tables_list_exactly_the_catalogue() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    listed = set().union(*(_table_names(p.read_text(encoding="utf-8")) for p in docs))
    exposed = {spec.exposed for spec in metrics.CATALOGUE.values()}
    assert listed - exposed == set(), "README lists metrics the exporter does not emit"
    assert exposed - listed == set(), "metrics missing from README's tables"


@pytest.mark.parametrize("path", [
    *sorted((ROOT / "alerts").glob("*.yml")), *sorted((ROOT / "alerts" / "tests").glob("*.yml")),
    ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml",
], ids=lambda p: str(p.relative_to(ROOT)))
def test_alert_rules_and_their_tests_use_only_catalogued_series(path: Path) -> None:
    used = set(re.findall(r"\bdbpool_\w+", path.read_text(encoding="utf-8")))
    assert used, path
    assert used - metrics.sample_names() == set()


def _module_imports(path: Path, module: str) -> set[str]:
    """Package modules imported at module level (TYPE_CHECKING blocks included, function bodies not)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    todo = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                     *(n for h in getattr(node, "handlers", []) for n in h.body)]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_no_import_circle_in_the_package() -> None:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {m: (_module_imports(p, m) & set(modules)) - {m, "dbpool_exporter"} for m, p in modules.items()}
    assert graph["dbpool_exporter.metrics"] == set()  # anything may import the catalogue

    def visit(module: str, path: list[str], done: set[str]) -> None:
        for dep in sorted(graph[module]):
            assert dep not in path, "import circle: " + " -> ".join([*path[path.index(dep):], dep])
            if dep not in done:
                visit(dep, [*path, dep], done)
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [module], done)
