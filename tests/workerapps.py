"""Real multi-worker app servers for tests: uvicorn and gunicorn running tests/apps/workers_app.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from prometheus_client.parser import text_string_to_metric_families

APPS = Path(__file__).parent / "apps"
BIN = Path(sys.executable).parent
# Small pools so a leak fills one quickly: 2 + 3 connections, 2 s acquire timeout; checkpointer max 2.
POOL = "2,3,2"
PER_WORKER_MAX = 5 + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def by_worker(text: str, name: str, **match: str) -> dict[str, float]:
    return {labels["worker"]: value for labels, value in samples(text, name)
            if all(labels.get(k) == v for k, v in match.items())}


def wait_for(check: Callable[[], object], timeout: float = 30, what: str = "") -> object:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check} (last error: {last})")


class App:
    """A real multi-worker server process group (uvicorn or gunicorn), always torn down."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=APPS, env={**os.environ, **env}, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def children(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            with_suppress_kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with_suppress_kill(-self.proc.pid, signal.SIGKILL)  # whatever of the group is left
        self.proc.wait(5)


def with_suppress_kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextlib.contextmanager
def launcher(tmp_path: Path, pg_dsn: str) -> Iterator[Callable[..., App]]:
    """``start(server, workers, ...)`` launches a real app server; every one is stopped on exit."""
    apps: list[App] = []

    def start(server: str, workers: int, *, mode: str = "port", extra: list[str] | None = None,
              env: dict[str, str] | None = None) -> App:
        port = free_port()
        base = {"DBPOOL_APP_DSN": pg_dsn, "DBPOOL_APP_MODE": mode, "DBPOOL_APP_POOL": POOL,
                "DBPOOL_APP_METRICS_PORT": str(free_port())}
        base.pop("DBPOOL_EXPORTER_MULTIPROC_DIR", None)
        if server == "uvicorn":
            argv = [str(BIN / "uvicorn"), "workers_app:asgi_app", "--workers", str(workers), "--port", str(port),
                    "--log-level", "warning"]
        elif server == "gunicorn-uvicorn":
            argv = [str(BIN / "gunicorn"), "-k", "uvicorn.workers.UvicornWorker", "-w", str(workers), "-b",
                    f"127.0.0.1:{port}", "workers_app:asgi_app"]
        else:
            argv = [str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{port}", "workers_app:wsgi_app"]
            base["DBPOOL_APP_WSGI"] = "1"
        app = App(argv + (extra or []), {**base, **(env or {})}, tmp_path / f"app{len(apps)}.log")
        app.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        app.metrics = f"http://127.0.0.1:{base['DBPOOL_APP_METRICS_PORT']}/metrics"  # type: ignore[attr-defined]
        apps.append(app)
        wait_for(lambda: get(app.url + "/pid"), what=f"{server} to answer")  # type: ignore[attr-defined]
        return app

    try:
        yield start
    finally:
        for app in apps:
            app.stop()


def workers_seen(url: str, n: int) -> str:
    """The first scrape of ``url`` that shows ``n`` live workers, each with its pools."""
    def check() -> str | None:
        text = get(url)
        live = [w for w, v in by_worker(text, "dbpool_worker_up").items() if v == 1]
        with_pools = by_worker(text, "dbpool_max_connections", pool="app")
        return text if len(live) == n and set(with_pools) == set(live) else None
    return wait_for(check, what=f"{n} workers at {url}")  # type: ignore[return-value]


