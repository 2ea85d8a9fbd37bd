"""Real Prometheus + Alertmanager on free loopback ports in a temp dir, for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, TypeVar

import yaml
from procs import stop_process

from dbpool_exporter.throwaway import free_port

T = TypeVar("T")


class StackError(Exception):
    """Prometheus or Alertmanager misbehaved; the message carries the tail of its log."""


def find_binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(f"none of {', '.join(names)} on PATH: install Debian's prometheus / prometheus-alertmanager")


def wait_until(check: Callable[[], T | None], *, timeout: float, interval: float = 0.5, what: str) -> T:
    """Poll ``check`` until it returns something truthy; bounded by ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, StackError) as e:  # not up yet, or a transient refusal
            last_error = e
        if time.monotonic() >= deadline:
            raise StackError(f"timed out after {timeout:g} s waiting for {what}"
                             + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def _get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class _Process:
    def __init__(self, name: str, argv: list[str], log_path: str) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StackError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        stop_process(self.proc, grace=15)
        self._log.close()


class PromStack:
    """Alertmanager, then Prometheus scraping ``targets`` as job ``job`` with ``rule_files`` loaded.

    ``rule_files`` maps a file name to YAML text. Everything lives in one temp dir, listens on
    127.0.0.1 only, and is gone after ``stop()`` (also on a failed start).
    """

    def __init__(self, targets: list[str], rule_files: dict[str, str], *, job: str = "dbpool",
                 interval: str = "1s", resolve_timeout: str = "5s", group_wait: str = "1s",
                 webhook: str | None = None) -> None:
        self.targets, self.rule_files, self.job = targets, rule_files, job
        self.interval, self.resolve_timeout = interval, resolve_timeout
        # bench/leadtime.py: Alertmanager's default group_wait, and a receiver that records deliveries.
        self.group_wait, self.webhook = group_wait, webhook
        self.dir = ""
        self.prometheus_url = self.alertmanager_url = ""
        self._processes: list[_Process] = []

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> PromStack:
        prometheus = find_binary("prometheus")
        alertmanager = find_binary("alertmanager", "prometheus-alertmanager")
        self.dir = tempfile.mkdtemp(prefix="dbpool-promstack-")
        try:
            self._start(prometheus, alertmanager, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, prometheus: str, alertmanager: str, timeout: float) -> None:
        am_port, prom_port = free_port(), free_port()
        self.alertmanager_url = f"http://127.0.0.1:{am_port}"
        self.prometheus_url = f"http://127.0.0.1:{prom_port}"
        am_config = self._write("alertmanager.yml", {
            "global": {"resolve_timeout": self.resolve_timeout},
            "route": {"receiver": "null", "group_by": ["alertname", "pool"], "group_wait": self.group_wait,
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "null", **({"webhook_configs": [{"url": self.webhook}]} if self.webhook else {})}],
        })
        self._spawn("alertmanager", [
            alertmanager, f"--config.file={am_config}", f"--storage.path={self._path('alertmanager-data')}",
            f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", "--log.level=warn",
        ])
        os.makedirs(self._path("rules"))
        for name, text in self.rule_files.items():
            with open(self._path("rules", name), "w") as f:
                f.write(text)
        prom_config = self._write("prometheus.yml", {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [self._path("rules", name) for name in self.rule_files],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": self.job, "static_configs": [{"targets": self.targets}]}],
        })
        self._spawn("prometheus", [
            prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={self._path('prometheus-data')}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
        ])
        for process, url in zip(self._processes, (self.alertmanager_url, self.prometheus_url), strict=True):
            wait_until(lambda p=process, u=url: self._ready(p, u), timeout=timeout, what=f"{process.name} ready")

    def _ready(self, process: _Process, url: str) -> bool:
        process.check_alive()
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        self._processes = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> PromStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def _write(self, name: str, config: dict[str, Any]) -> str:
        path = self._path(name)
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._processes.append(_Process(name, argv, self._path(f"{name}.log")))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} log tail:\n{p.log_tail()}" for p in self._processes)

    # --- APIs -------------------------------------------------------------------------------
    def query(self, expr: str) -> list[Any]:
        """Instant query; raises StackError on a PromQL error; returns the result list."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = _get_json(url)
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error in the body
            try:
                body = json.loads(e.read())
            except ValueError:
                raise StackError(f"query {expr!r}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise StackError(f"query {expr!r}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [data["result"]]
        return data["result"]

    def targets_up(self) -> bool:
        return bool(self.query(f'up{{job="{self.job}"}} == 1'))

    def rule_groups(self) -> list[dict[str, Any]]:
        return _get_json(f"{self.prometheus_url}/api/v1/rules")["data"]["groups"]

    def prometheus_alerts(self) -> list[dict[str, Any]]:
        return _get_json(f"{self.prometheus_url}/api/v1/alerts")["data"]["alerts"]

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager currently holds as active (resolved ones are not listed)."""
        alerts = _get_json(f"{self.alertmanager_url}/api/v2/alerts?active=true&silenced=false&inhibited=false")
        return [a for a in alerts if a.get("status", {}).get("state") == "active"]
