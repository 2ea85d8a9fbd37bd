"""The shipped sidecar manifests (compose, Kubernetes): consistent with each other, and run for real."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from dbpool_exporter.cli import build_parser
from dbpool_exporter.workers import ENV_DIR
from workerapps import BIN, App, free_port, workers_seen

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _k8s() -> dict[str, Any]:
    return {doc["kind"]: doc for path in (DEPLOY / "kubernetes" / "sidecar").glob("*.yaml")
            for doc in yaml.safe_load_all(path.read_text()) if doc and "kind" in doc}


def _pairs() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(app, sidecar) as compose services and as Kubernetes containers, in one shape."""
    compose = yaml.safe_load((DEPLOY / "compose" / "sidecar.yaml").read_text())["services"]
    pod = _k8s()["Deployment"]["spec"]["template"]["spec"]
    app_c, side_c = pod["containers"]

    def env(c: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in c.get("env", [])}

    def mounts(c: dict[str, Any]) -> dict[str, str]:
        return {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}

    def compose_mounts(s: dict[str, Any]) -> dict[str, str]:
        return dict(v.split(":")[:2] for v in s.get("volumes", []))

    return {
        "compose": ({"argv": compose["app"]["command"], "env": compose["app"]["environment"],
                     "mounts": compose_mounts(compose["app"])},
                    {"argv": compose["dbpool-exporter"]["command"], "env": compose["dbpool-exporter"]["environment"],
                     "mounts": compose_mounts(compose["dbpool-exporter"])}),
        "kubernetes": ({"argv": app_c["args"], "env": env(app_c), "mounts": mounts(app_c)},
                       {"argv": side_c["args"], "env": env(side_c), "mounts": mounts(side_c)}),
    }


def _workers_dir(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--workers.dir="))


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_app_and_sidecar_share_the_directory(where: str) -> None:
    app, sidecar = _pairs()[where]
    directory = _workers_dir(sidecar["argv"])
    assert app["env"][ENV_DIR] == directory
    shared = [name for name, path in app["mounts"].items() if path == directory]
    assert shared and sidecar["mounts"].get(shared[0]) == directory
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            build_parser().parse_args(sidecar["argv"])
        except SystemExit:
            pytest.fail(f"{where} sidecar args do not parse: {errors.getvalue()}")


def test_podmonitor_selects_the_pods_and_names_the_sidecar_port() -> None:
    k = _k8s()
    pod = k["Deployment"]["spec"]["template"]
    monitor = k["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for p in pod["spec"]["containers"][1]["ports"]}
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["http-metrics"] and "http-metrics" in ports
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes["dbpool-workers"]
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "sidecar" / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"app-with-sidecar.yaml", "podmonitor.yaml"}


def test_sidecar_args_run_for_real(launch: Callable[..., App], tmp_path: Path, pg_dsn: str) -> None:
    """The Kubernetes sidecar's own arguments, paths moved into a temporary directory, beside a real app."""
    app, sidecar = _pairs()["kubernetes"]
    shared = tmp_path / "run-dbpool"
    config = tmp_path / "dbpool-exporter.yml"
    config.write_text("servers:\n  - name: main\n    dsn_env: DBPOOL_MAIN_DSN\n")
    port = free_port()
    argv = [a.replace(_workers_dir(sidecar["argv"]), str(shared))
             .replace("/etc/dbpool-exporter/dbpool-exporter.yml", str(config)) for a in sidecar["argv"]]
    launch("uvicorn", 3, mode="none", env={ENV_DIR: str(shared)})
    daemon = App([str(BIN / "dbpool-exporter"), *argv, "--web.listen-address", f"127.0.0.1:{port}"],
                 {"DBPOOL_MAIN_DSN": pg_dsn}, tmp_path / "sidecar.log")
    try:
        text = workers_seen(f"http://127.0.0.1:{port}/metrics", 3)
        assert "dbpool_server_max_connections" in text
    finally:
        daemon.stop()
