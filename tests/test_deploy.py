"""Deployment artifacts under deploy/: they parse, reference files that exist, agree with each other and validate."""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

from dbpool_exporter.throwaway import PgCluster

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "kubernetes"
ALERTS = REPO / "alerts"
DASHBOARDS = REPO / "dashboards"
CONFIG_PATH = "/etc/dbpool-exporter/dbpool-exporter.yml"  # where every packaging puts the daemon's config


# --- helpers ---------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """Rejects duplicate keys, which PyYAML (and most tools) silently resolve to the last one."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Only the node's own keys: a `<<: *anchor` merge may legitimately be overridden.
    keys = [loader.construct_object(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(map(str, dupes))}",
                                                node.start_mark)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rule_files() -> list[Path]:
    files = sorted(ALERTS.glob("*.yml"))
    if not files:
        pytest.fail(f"no rule files in {ALERTS}: deploy/ ships them (Prometheus, PrometheusRule); merge the alerts "
                    "branch (alerts/*.yml) before running these tests")
    return files


def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    if not files:
        pytest.fail(f"no dashboards in {DASHBOARDS}: the compose stack provisions them into Grafana; merge the "
                    "dashboards branch (dashboards/*.json) before running these tests")
    return files


def alert_names() -> set[str]:
    names = set()
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            names.update(rule["alert"] for rule in group["rules"] if "alert" in rule)
    return names


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "compose.yaml")


def volumes_of(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume of a compose service."""
    out = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"use the short volume syntax (host:container[:mode]), got {spec!r}"
        source, target = spec.split(":")[:2]
        out.append((source, target))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/"))


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes manifest by kind (one object per file here)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        doc = load_yaml(path)
        assert doc["kind"] not in out, f"two {doc['kind']} manifests"
        out[doc["kind"]] = doc
    return out


def daemon_cli() -> list[str]:
    if importlib.util.find_spec("dbpool_exporter.cli") is None:
        pytest.fail("dbpool_exporter.cli is missing: these checks run the daemon; merge the daemon branch first")
    return [sys.executable, "-m", "dbpool_exporter.cli"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1].strip()) for item in logical]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- every file ------------------------------------------------------------------------------------
def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(files) >= 12, files
    for path in files:
        try:
            docs = list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=_StrictLoader))  # noqa: S506
        except yaml.YAMLError as e:
            pytest.fail(f"{path.relative_to(REPO)}: {e}")
        assert docs and all(doc is not None for doc in docs), f"{path.relative_to(REPO)} has an empty document"


# --- Dockerfile ------------------------------------------------------------------------------------
def test_dockerfile_is_multistage_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim" and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    runtime = instructions[[i for i, _ in instructions].index("FROM", 1 + [i for i, _ in instructions].index("FROM")):]
    assert any(i == "COPY" and a.startswith("--from=build /opt/dbpool-exporter") for i, a in runtime)
    assert not any(i == "RUN" and "pip" in a for i, a in runtime), "the runtime stage must not build anything"

    users = [a for i, a in runtime if i == "USER"]
    assert users, "the runtime stage needs a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid (runAsNonRoot checks it): {uid}"

    assert ("EXPOSE", "9188") in runtime
    healthcheck = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "CMD" in healthcheck[0] and "healthcheck.py" in healthcheck[0]
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "DBPOOL_HEALTHCHECK_URL=http://127.0.0.1:9188/-/healthy" in env
    assert ("ENTRYPOINT", '["dbpool-exporter"]') in runtime
    cmd = [json.loads(a) for i, a in runtime if i == "CMD"]
    assert cmd == [["run", f"--config.file={CONFIG_PATH}"]]


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    ignored = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for must in (".git", ".venv", "tests", "**/__pycache__"):
        assert must in ignored, f"Dockerfile.dockerignore should exclude {must}"
    copies = [a.split() for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith("--from")]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
            hit = [p for p in ignored if source == p or source.startswith(p.rstrip("/") + "/")]
            assert not hit, f"Dockerfile copies {source}, but Dockerfile.dockerignore excludes it ({hit})"
    # What `pip wheel .` needs from the context: the package metadata and its source.
    copied = {s for *sources, _ in copies for s in sources}
    assert {"pyproject.toml", "README.md", "exporter"} <= copied


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/-/healthy" else 503)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBPOOL_HEALTHCHECK_URL": url, "DBPOOL_HEALTHCHECK_TIMEOUT": "3"}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True, text=True,
                          timeout=30)


def test_healthcheck_script_exit_codes(health_server: str) -> None:
    ok = run_healthcheck(f"{health_server}/-/healthy")
    assert ok.returncode == 0 and not ok.stderr, ok.stderr
    bad = run_healthcheck(f"{health_server}/-/ready")
    assert bad.returncode == 1 and bad.stderr.strip() == f"unhealthy: {health_server}/-/ready: HTTP 503"
    refused = run_healthcheck(f"http://127.0.0.1:{free_port()}/-/healthy")
    assert refused.returncode == 1 and refused.stderr.startswith("unhealthy:")
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr


# --- daemon configs shipped with each packaging ---------------------------------------------------
def _configmap_config(tmp_path: Path) -> Path:
    data = manifests()["ConfigMap"]["data"]
    path = tmp_path / "configmap.yml"
    path.write_text(data[Path(CONFIG_PATH).name], encoding="utf-8")
    return path


def test_shipped_daemon_configs_are_valid(tmp_path: Path) -> None:
    cli = daemon_cli()
    env = {**os.environ, "DBPOOL_MAIN_DSN": "postgresql://dbpool_monitor:placeholder@db.invalid:5432/postgres"}
    for path in (DEPLOY / "image-config.yml", COMPOSE_DIR / "dbpool-exporter.yml", _configmap_config(tmp_path)):
        result = subprocess.run([*cli, "check-config", str(path)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"{path}: {result.stderr}"
        assert "placeholder" not in result.stdout + result.stderr


def test_dsn_variables_are_provided_where_configs_ask_for_them(tmp_path: Path) -> None:
    def wanted(path: Path) -> set[str]:
        return {s["dsn_env"] for s in load_yaml(path)["servers"] if "dsn_env" in s}

    services = compose()["services"]
    assert wanted(COMPOSE_DIR / "dbpool-exporter.yml") <= set(services["exporter"]["environment"])
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    given = {e["name"] for e in container["env"]}
    assert wanted(_configmap_config(tmp_path)) <= given
    secret_keys = set(manifests()["Secret"]["stringData"])
    for item in container["env"]:
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == manifests()["Secret"]["metadata"]["name"] and ref["key"] in secret_keys
    assert wanted(DEPLOY / "image-config.yml") == {"DBPOOL_MAIN_DSN"}, "documented in deploy/Dockerfile"
    assert "DBPOOL_MAIN_DSN" in (DEPLOY / "Dockerfile").read_text()


def test_shipped_commands_parse_with_the_real_cli() -> None:
    """Every command line deploy/ runs, parsed by the CLI itself, so a renamed flag fails here, not in production."""
    daemon_cli()
    from dbpool_exporter.cli import build_parser

    services = compose()["services"]
    cmd = [json.loads(a) for i, a in dockerfile_instructions() if i == "CMD"][0]
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    [exec_start] = unit_directives()["ExecStart"]
    commands = {"Dockerfile CMD": cmd, "compose exporter": services["exporter"]["command"],
                "compose demo": services["demo"]["command"], "Deployment args": container["args"],
                "systemd ExecStart": shlex.split(exec_start)[1:]}
    for where, argv in commands.items():
        parser = build_parser()
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser.parse_args(argv)
        except SystemExit:
            hint = " (the demo subcommand comes from the demo branch)" if argv[:1] == ["demo"] else ""
            pytest.fail(f"{where} does not parse: {errors.getvalue().strip()}{hint}")


# --- compose ---------------------------------------------------------------------------------------
def test_compose_references_files_that_exist() -> None:
    doc = compose()
    services, named = doc["services"], set(doc.get("volumes") or {})
    assert {"postgres", "demo", "exporter", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        for source, target in volumes_of(service):
            if is_bind(source):
                host = (COMPOSE_DIR / source).resolve()
                if source in ("../../alerts", "../../dashboards"):
                    (rule_files if "alerts" in source else dashboard_files)()
                assert host.exists(), f"service {name} mounts {source} (-> {target}), which does not exist"
            else:
                assert source in named, f"service {name} uses volume {source}, not declared under volumes:"
        build = service.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context == REPO and (context / build["dockerfile"]).is_file()
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert "max_connections=100" in services["postgres"]["command"]
    exporter = services["exporter"]
    assert exporter["read_only"] is True and exporter["cap_drop"] == ["ALL"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_demo_and_daemon_use_the_same_server_name() -> None:
    """Pools and server join on `server` = host:port of the DSN: both DSNs must name the server alike."""
    services = compose()["services"]
    demo = services["demo"]["command"]
    assert demo[:1] == ["demo"] and "--dsn" not in demo and demo[demo.index("--listen") + 1] == "0.0.0.0"
    demo_dsn = services["demo"]["environment"]["DBPOOL_DEMO_DSN"]  # not in argv: ps shows it to anyone
    daemon_dsn = services["exporter"]["environment"]["DBPOOL_MAIN_DSN"]
    host_port = re.compile(r"@([^/@]+)/")
    assert host_port.search(demo_dsn).group(1) == host_port.search(daemon_dsn).group(1) == "postgres:5432"
    assert services["exporter"]["command"] == ["run", f"--config.file={CONFIG_PATH}"]
    assert ("./dbpool-exporter.yml", CONFIG_PATH) in volumes_of(services["exporter"])


def test_compose_prometheus_scrapes_both_and_loads_the_mounted_rules() -> None:
    services = compose()["services"]
    config = load_yaml(COMPOSE_DIR / "prometheus.yml")
    mounts = dict((t, s) for s, t in volumes_of(services["prometheus"]))
    config_target = next(t for t, s in mounts.items() if s == "./prometheus.yml")
    assert f"--config.file={config_target}" in services["prometheus"]["command"]
    rules_target = next(t for t, s in mounts.items() if s == "../../alerts")
    for pattern in config["rule_files"]:
        resolved = Path(config_target).parent / pattern
        assert resolved.parent == Path(rules_target), f"rule_files {pattern} is not the mounted {rules_target}"

    targets = {t: job["job_name"] for job in config["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert targets.get("demo:9188") and targets.get("exporter:9188"), targets
    for target in ("demo:9188", "exporter:9188"):
        # DbpoolExporterDown watches up{job=~".*dbpool.*"}.
        assert "dbpool" in targets[target]
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host = target.split(":")[0]
                assert host == "localhost" or host in services, f"scrape target {target} is no compose service"
    for am in config["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            assert all(t.split(":")[0] in services for t in sc["targets"])


def test_promtool_checks_the_compose_prometheus_config_with_the_rules(promtool: str, tmp_path: Path) -> None:
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").mkdir()
    files = rule_files()
    for path in files:
        shutil.copy(path, tmp_path / "rules" / path.name)
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for path in files:  # a glob that matched nothing would pass silently
        assert re.search(rf"Checking .*rules/{re.escape(path.name)}\s+SUCCESS: [1-9]\d* rules found", output), output


def test_amtool_checks_alertmanager_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool not found: install Debian's 'prometheus-alertmanager' package (scripts/test does)")
    result = subprocess.run([amtool, "check-config", str(COMPOSE_DIR / "alertmanager.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alertmanager_inhibitions_name_shipped_alerts() -> None:
    names = alert_names()
    config = load_yaml(COMPOSE_DIR / "alertmanager.yml")
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            m = re.fullmatch(r'alertname="(\w+)"', matcher)
            assert m and m.group(1) in names, f"inhibit rule names {matcher}, not an alert in alerts/"


# --- Grafana provisioning --------------------------------------------------------------------------
def grafana_provisioning() -> tuple[dict[str, str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Grafana's mounts (target -> source), provisioned datasources and dashboard providers."""
    mounts = dict((t, s) for s, t in volumes_of(compose()["services"]["grafana"]))
    provisioning = COMPOSE_DIR / mounts["/etc/grafana/provisioning"]
    datasources = [d for f in sorted((provisioning / "datasources").glob("*.yml"))
                   for d in load_yaml(f)["datasources"]]
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.yml")) for p in load_yaml(f)["providers"]]
    return mounts, datasources, providers


def test_grafana_provisioning_points_at_the_shipped_dashboards() -> None:
    mounts, datasources, providers = grafana_provisioning()
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["url"] == "http://prometheus:9090"
    assert prometheus[0]["isDefault"] is True, "the dashboards' datasource variable picks the default one"
    assert [p["type"] for p in providers] == ["file"]
    path = providers[0]["options"]["path"]
    assert path in mounts, f"Grafana's dashboard provider reads {path}, which compose does not mount"
    assert (COMPOSE_DIR / mounts[path]).resolve() == DASHBOARDS.resolve()
    dashboard_files()


def _datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


def test_dashboards_resolve_their_datasource_when_provisioned() -> None:
    """Provisioning ignores __inputs: every ${NAME} datasource must be a datasource variable of the dashboard."""
    _, datasources, _ = grafana_provisioning()
    known = {d["uid"] for d in datasources} | {d["name"] for d in datasources}
    types = {d["type"] for d in datasources}
    builtin = {"-- Grafana --", "-- Mixed --", "-- Dashboard --", "grafana"}
    for path in dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        templating = dashboard.get("templating", {}).get("list", [])
        variables = {v["name"] for v in templating if v.get("type") == "datasource"}
        for variable in templating:
            if variable.get("type") == "datasource":
                # Grafana fills it with a datasource of this plugin type: one must be provisioned.
                assert variable["query"] in types, f"{path.name}: variable {variable['name']} wants {variable['query']}"
                current = (variable.get("current") or {}).get("value")
                assert current in (None, "", *known), f"{path.name}: {variable['name']} preselects {current!r}"
        refs = list(_datasource_refs(dashboard))
        assert refs, f"{path.name} references no datasource"
        for ref in refs:
            name = ref.get("uid") if isinstance(ref, dict) else ref
            if name is None:
                continue  # Grafana's default datasource
            if name.startswith("$"):
                assert name.strip("${}") in variables, (
                    f"{path.name}: {name} is no datasource variable of the dashboard; Grafana provisioning does not "
                    "resolve __inputs, so add a datasource template variable of that name")
            else:
                assert name in known | builtin, f"{path.name}: datasource {name!r} is not provisioned"


# --- Kubernetes ------------------------------------------------------------------------------------
def test_kubernetes_deployment_is_locked_down() -> None:
    deployment = manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    uid = [a for i, a in dockerfile_instructions() if i == "USER"][-1].split(":")[0]
    assert pod_sc["runAsUser"] == int(uid), "runAsUser should be the image's USER"
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc.get("runAsNonRoot", pod_sc["runAsNonRoot"]) is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http-metrics": 9188}
        assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http-metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http-metrics"}
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
        assert container["args"][:2] == ["run", f"--config.file={CONFIG_PATH}"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["config"] == str(Path(CONFIG_PATH).parent)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
    assert Path(CONFIG_PATH).name in manifests()["ConfigMap"]["data"]


def test_kubernetes_objects_select_each_other() -> None:
    m = manifests()
    assert set(m) == {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "Secret"}
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = m["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = m["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http-metrics" and port["port"] == 9188
    monitor = m["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    # The operator names the job after the Service; DbpoolExporterDown selects job=~".*dbpool.*".
    assert "dbpool" in service["metadata"]["name"]
    secret = m["Secret"]["stringData"]["DBPOOL_MAIN_DSN"]
    assert "CHANGE-ME" in secret, "the example Secret must hold a placeholder, never a real password"


def test_kustomization_lists_the_manifests() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}, "secret.example.yaml stays out (a placeholder)"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build was not run")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout))
    assert kinds == sorted(["ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule"])


def test_prometheusrule_is_generated_from_alerts() -> None:
    rule_files()
    generator = load_module(K8S / "generate_prometheusrule.py")
    problem = generator.check(ALERTS, K8S / "prometheusrule.yaml")
    assert problem is None, problem
    result = subprocess.run([sys.executable, str(K8S / "generate_prometheusrule.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # And by content, independent of formatting: the same groups, in file order.
    expected = [g for path in rule_files() for g in load_yaml(path)["groups"]]
    assert load_yaml(K8S / "prometheusrule.yaml")["spec"]["groups"] == expected


def test_prometheusrule_groups_pass_promtool(promtool: str, tmp_path: Path) -> None:
    rule_files()
    spec = load_yaml(K8S / "prometheusrule.yaml")["spec"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


RULES = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0\nand\nup == 0", "for": "1m"}]}]}


def test_generator_write_check_and_errors(tmp_path: Path) -> None:
    script = K8S / "generate_prometheusrule.py"
    alerts, output = tmp_path / "alerts", tmp_path / "prometheusrule.yaml"
    alerts.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), "--alerts", str(alerts), "--output", str(output), *args],
                              capture_output=True, text=True, timeout=60)

    none = run("--check")
    assert none.returncode == 2 and "no rule files" in none.stderr and none.stderr.count("\n") == 1
    (alerts / "a.yml").write_text(yaml.safe_dump(RULES))
    missing = run("--check")
    assert missing.returncode == 1 and "is missing" in missing.stderr
    assert run().returncode == 0 and run("--check").returncode == 0
    assert "expr: |-\n" in output.read_text(), "multi-line PromQL should stay a block scalar"
    assert load_yaml(output)["spec"] == RULES
    (alerts / "b.yml").write_text(yaml.safe_dump({"groups": [{"name": "h", "rules": []}]}))
    stale = run("--check")
    assert stale.returncode == 1 and "out of date" in stale.stderr and "generate_prometheusrule.py" in stale.stderr
    (alerts / "c.yml").write_text(yaml.safe_dump(RULES))
    dupe = run()
    assert dupe.returncode == 2 and "also defined in a.yml" in dupe.stderr and "Traceback" not in dupe.stderr
    (alerts / "c.yml").write_text("groups: [unclosed\n")
    broken = run()
    assert broken.returncode == 2 and "invalid YAML" in broken.stderr and broken.stderr.count("\n") == 1


# --- systemd ---------------------------------------------------------------------------------------
def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    text = (DEPLOY / "systemd" / "dbpool-exporter.service").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(" ".join(value.split()))
    return directives


def test_systemd_unit_is_sandboxed() -> None:
    d = unit_directives()
    assert d.get("DynamicUser") == ["yes"] or d.get("User"), "run as DynamicUser or a dedicated user"
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                       "ExecReload": "/bin/kill -HUP $MAINPID"}.items():
        assert d.get(key) == [value], f"{key}={value} expected, got {d.get(key)}"
    assert "@system-service" in d["SystemCallFilter"]
    assert d["EnvironmentFile"] == ["/etc/dbpool-exporter/dbpool-exporter.env"]
    [exec_start] = d["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/") and argv[1] == "run" and f"--config.file={CONFIG_PATH}" in argv


def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd): the unit was not verified")
    # verify insists that ExecStart's binary exists; point it at a stand-in, the rest of the unit unchanged.
    binary = tmp_path / "dbpool-exporter"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    unit = tmp_path / "dbpool-exporter.service"
    text = (DEPLOY / "systemd" / "dbpool-exporter.service").read_text()
    unit.write_text(text.replace("/opt/dbpool-exporter/bin/dbpool-exporter", str(binary)))
    verify = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stdout + verify.stderr
    security = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                              capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert m, security.stdout + security.stderr
    assert float(m.group(1)) <= 2.0, f"exposure {m.group(1)}: the sandbox lost directives\n{security.stdout}"


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
MDWE_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    # Probe in a child: the flag cannot be cleared once set.
    probe = f"import ctypes; l = ctypes.CDLL(None); raise SystemExit(l.prctl({PR_SET_MDWE}, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


def test_daemon_runs_without_writable_executable_memory(pg_dsn: str, tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the daemon must poll PostgreSQL under the kernel's equivalent."""
    cli = daemon_cli()
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3): MemoryDenyWriteExecute was not exercised")
    config = tmp_path / "config.yml"
    config.write_text("servers:\n  - name: main\n    dsn_env: DBPOOL_MAIN_DSN\n    interval: 1s\n")
    port = free_port()
    argv = [sys.executable, "-c", MDWE_EXEC, *cli, "run", f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}"]
    env = {**os.environ, "DBPOOL_MAIN_DSN": pg_dsn}
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, ready = time.monotonic() + 30, False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            with contextlib.suppress(OSError):
                ready = urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
            if not ready:
                time.sleep(0.2)
        assert ready, f"daemon not ready under MDWE (exit {proc.poll()}):\n{log.read_text()}"
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'dbpool_source_up{kind="postgres",source="main"} 1.0' in metrics, metrics[:2000]
        assert run_healthcheck(f"{base}/-/healthy").returncode == 0
        proc.send_signal(signal.SIGHUP)  # ExecReload
        time.sleep(0.5)
        assert proc.poll() is None and run_healthcheck(f"{base}/-/healthy").returncode == 0, log.read_text()
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_mdwe_probe_really_denies_writable_executable_memory() -> None:
    """Guards the test above: under the flag a W+X mapping must fail, else it proves nothing."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE")
    check = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = subprocess.run([sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", check],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "PermissionError" in result.stderr, result.stderr


# --- PostgreSQL init script of the compose stack ---------------------------------------------------
def test_compose_monitor_role_script_on_a_real_server() -> None:
    script = COMPOSE_DIR / "postgres" / "10-monitor-role.sh"
    assert os.access(script, os.X_OK), "the postgres image runs executable init scripts (others are sourced)"
    mounts = dict(volumes_of(compose()["services"]["postgres"]))
    assert mounts["./postgres/10-monitor-role.sh"].startswith("/docker-entrypoint-initdb.d/")
    psql = shutil.which("psql")
    if psql is None:
        pytest.fail("psql not found: install Debian's postgresql-client")
    with PgCluster() as cluster:
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(cluster.port), "POSTGRES_USER": "postgres",
               "POSTGRES_DB": "postgres", "DBPOOL_MONITOR_PASSWORD": "it's a \"quoted\" pass"}
        result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        query = ("SELECT r.rolcanlogin, r.rolconnlimit, pg_has_role(r.oid, 'pg_monitor', 'MEMBER'), "
                 "a.rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid "
                 "WHERE r.rolname = 'dbpool_monitor'")
        row = subprocess.run([psql, "-XAt", "-U", "postgres", "-d", "postgres", "-c", query], env=env,
                             capture_output=True, text=True, timeout=60)
        assert row.stdout.strip() == "t|5|t|t", row.stdout + row.stderr
        assert "quoted" not in result.stdout + result.stderr, "the password must not be echoed"
