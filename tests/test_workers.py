"""Several worker processes, one endpoint: real uvicorn and gunicorn workers against real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
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

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbpool_exporter import budget

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


@pytest.fixture
def launch(tmp_path: Path, pg_dsn: str) -> Iterator[Callable[..., App]]:
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

    yield start
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


def leak_until_exhausted(app: App) -> str:
    """Hold connections in whichever worker answers until its pool is full; returns that worker's PID."""
    answer = get(app.url + "/hold?n=5")  # type: ignore[attr-defined]
    pid, _, rest = answer.partition(" ")
    assert rest == "held=5", answer
    return pid


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn-uvicorn"])
def test_start_http_server_in_every_worker_serves_all_workers(launch: Callable[..., App], server: str) -> None:
    app = launch(server, 3)
    text = workers_seen(app.metrics, 3)  # type: ignore[attr-defined]
    live = {int(w) for w in by_worker(text, "dbpool_worker_up")}
    assert live <= app.children(), f"a worker died: {app.log.read_text()[-2000:]}"
    assert "Address already in use" not in app.log.read_text()
    assert "Traceback" not in app.log.read_text()
    # Every pool of every worker, and the server join: both pools name the same server.
    assert len(by_worker(text, "dbpool_max_connections", pool="checkpointer")) == 3

    leaker = leak_until_exhausted(app)
    # A fourth caller in the same worker now waits and times out: the user's error.
    def usage() -> dict[str, float] | None:
        got = by_worker(get(app.metrics), "dbpool_usage_ratio", pool="app")  # type: ignore[attr-defined]
        return got if got.get(leaker) == 1.0 else None
    got = wait_for(usage, what="the leaking worker at usage 1")
    assert sorted(got.values()) == [0.0, 0.0, 1.0]


def test_mounted_metrics_show_every_worker_whichever_answers(launch: Callable[..., App]) -> None:
    app = launch("uvicorn", 3, mode="mount")
    workers_seen(app.url + "/metrics/", 3)  # type: ignore[attr-defined]
    leaker = leak_until_exhausted(app)
    time.sleep(2.5)  # two publish intervals
    # New connections land on any worker; each answer must hold the leaking worker's full pool.
    for _ in range(12):
        text = get(app.url + "/metrics/")  # type: ignore[attr-defined]
        usage = by_worker(text, "dbpool_usage_ratio", pool="app")
        assert usage[leaker] == 1.0 and len(usage) == 3, usage


def test_killed_worker_vanishes_and_the_port_moves(launch: Callable[..., App]) -> None:
    app = launch("uvicorn", 3)
    text = workers_seen(app.metrics, 3)  # type: ignore[attr-defined]
    before = set(by_worker(text, "dbpool_worker_up"))
    directory = next(Path("/tmp").glob(f"dbpool-exporter-{os.getuid()}/pgid-{app.proc.pid}"))
    serving = [json.loads(p.read_text())["pid"] for p in directory.glob("*.json")
               if json.loads(p.read_text())["serving"]]
    assert len(serving) == 1, serving
    os.kill(serving[0], signal.SIGKILL)

    def replaced() -> str | None:
        text = get(app.metrics)  # type: ignore[attr-defined]
        live = set(by_worker(text, "dbpool_worker_up"))
        return text if str(serving[0]) not in live and len(live) == 3 else None
    text = wait_for(replaced, timeout=40, what="the killed worker to vanish and a new one to appear")
    assert len(set(by_worker(text, "dbpool_worker_up")) - before) == 1  # uvicorn's replacement
    assert not any(p.name.startswith(f"{serving[0]}-") for p in directory.iterdir())  # its files are gone


@pytest.mark.parametrize("preload", [False, True], ids=["import-in-worker", "preload"])
def test_gunicorn_sync_preload_and_max_requests(launch: Callable[..., App], preload: bool) -> None:
    # The app starts its exporter at import: in each worker, or once in the master before it forks.
    app = launch("gunicorn", 3, mode="port", extra=["--max-requests", "15"] + (["--preload"] if preload else []),
                 env={"DBPOOL_APP_START_AT_IMPORT": "1"})
    pids: set[str] = set()
    counts: dict[str, float] = {}
    deadline = time.monotonic() + 60
    for i in range(120):  # bounded: about eight restarts of each worker
        if time.monotonic() > deadline:
            break
        pids.add(get(app.url + "/work").split()[0])  # type: ignore[attr-defined]
        if i % 10 == 9:
            try:
                text = get(app.metrics)  # type: ignore[attr-defined]
            except OSError:  # URLError, a reset: the serving worker was recycled mid-scrape
                continue  # the serving worker was recycled; another takes the port within seconds
            for worker, value in by_worker(text, "dbpool_acquire_wait_seconds_count", pool="app").items():
                # A worker's series counts up from its start and never goes back.
                assert value >= counts.get(worker, 0), (worker, value, counts)
                counts[worker] = value
    assert len(pids) > 3  # workers really were recycled
    text = wait_for(lambda: workers_seen(app.metrics, 4 if preload else 3),  # type: ignore[attr-defined]
                    timeout=30, what="live workers after churn")
    live = set(by_worker(text, "dbpool_worker_up"))
    children = {str(p) for p in app.children()}
    # Each forked child publishes as itself; with start at import the master is one more (documented).
    assert live - {str(app.proc.pid)} <= children and len(children) == 3
    assert (str(app.proc.pid) in live) == preload
    assert not samples(text, "dbpool_connections") or all("worker" in labels
                                                           for labels, _ in samples(text, "dbpool_connections"))


def test_budget_counts_every_worker(launch: Callable[..., App], capsys: pytest.CaptureFixture[str]) -> None:
    app = launch("uvicorn", 3)
    workers_seen(app.metrics, 3)  # type: ignore[attr-defined]
    total = 3 * PER_WORKER_MAX  # every worker has its own copy of both pools
    server = samples(get(app.metrics), "dbpool_pool_info")[0][0]["server"]  # type: ignore[attr-defined]
    rc = budget.main([app.metrics, "--server-max", f"{server}={total - 1}"])  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert rc == budget.OVERCOMMIT, out
    assert [line.split()[2] for line in out.splitlines() if line.startswith(server)] == [f"{total:g}"], out
    rc = budget.main([app.metrics, "--server-max", f"{server}={total}"])  # type: ignore[attr-defined]
    assert rc == budget.OK, capsys.readouterr().out


def test_daemon_sidecar_serves_published_pools(launch: Callable[..., App], tmp_path: Path, pg_dsn: str) -> None:
    shared = tmp_path / "shared"
    app = launch("uvicorn", 3, mode="none", env={"DBPOOL_EXPORTER_MULTIPROC_DIR": str(shared)})
    port = free_port()
    config = tmp_path / "dbpool.yml"
    config.write_text(f"servers:\n  - name: db\n    dsn: {pg_dsn}\nworkers_dir: {shared}\n")
    daemon = App([str(BIN / "dbpool-exporter"), "run", "--config.file", str(config),
                  "--web.listen-address", f"127.0.0.1:{port}"], {}, tmp_path / "daemon.log")
    try:
        text = workers_seen(f"http://127.0.0.1:{port}/metrics", 3)
        assert samples(text, "dbpool_server_max_connections")  # the server view beside the pools
        assert all("worker" not in labels for labels, _ in samples(text, "dbpool_server_max_connections"))
        app.stop()  # the app exits cleanly: its workers leave the directory at once
        wait_for(lambda: not by_worker(get(f"http://127.0.0.1:{port}/metrics"), "dbpool_worker_up"),
                 timeout=20, what="the workers to leave")
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log.read_text()
