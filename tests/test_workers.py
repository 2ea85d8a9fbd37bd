"""Several worker processes, one endpoint: real uvicorn and gunicorn workers against real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from dbpool_exporter import budget
from workerapps import BIN, App, by_worker, free_port, get, samples, wait_for, workers_seen


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
    master = str(app.proc.pid)

    def settled() -> str | None:
        # A worker recycled between the scrape and the process listing would look like a stray: read both again.
        text = workers_seen(app.metrics, 4 if preload else 3)  # type: ignore[attr-defined]
        live, children = set(by_worker(text, "dbpool_worker_up")), {str(p) for p in app.children()}
        return text if live - {master} == children and len(children) == 3 else None

    text = wait_for(settled, timeout=30, what="live workers after churn")  # type: ignore[assignment]
    # Each forked child publishes as itself; with start at import the master is one more (documented).
    assert (master in set(by_worker(text, "dbpool_worker_up"))) == preload
    assert not samples(text, "dbpool_connections") or all("worker" in labels
                                                           for labels, _ in samples(text, "dbpool_connections"))


def test_budget_counts_every_worker(launch: Callable[..., App], capsys: pytest.CaptureFixture[str],
                                    pg_dsn: str, tmp_path: Path) -> None:
    """The issue's figures: 4 workers x (20 + 40) plus a checkpointer service of 10 is 250, against 97 usable."""
    app = launch("uvicorn", 4, env={"DBPOOL_APP_POOL": "20,40,30", "DBPOOL_APP_CHECKPOINTER_MAX": "0"})
    workers_seen(app.metrics, 4)  # type: ignore[attr-defined]
    port = free_port()
    checkpointer = App([sys.executable, "-c", CHECKPOINTER_SERVICE, pg_dsn, str(port)], {}, tmp_path / "cp.log")
    try:
        cp_url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: "dbpool_max_connections" in get(cp_url), what="the checkpointer service")
        server = samples(get(app.metrics), "dbpool_pool_info")[0][0]["server"]  # type: ignore[attr-defined]
        rc = budget.main([app.metrics, cp_url, "--server-max", f"{server}=97"])  # type: ignore[attr-defined]
        out = capsys.readouterr().out
        assert rc == budget.OVERCOMMIT, out
        assert [line.split()[1:5] for line in out.splitlines() if line.startswith(server)] == [
            ["5", "250", "97", "(--server-max)"]], out
        rc = budget.main([app.metrics, cp_url, "--server-max", f"{server}=250"])  # type: ignore[attr-defined]
        assert rc == budget.OK, capsys.readouterr().out
    finally:
        checkpointer.stop()


# A separate service with one psycopg pool of max 10 (the seed's checkpointer), served on its own port.
CHECKPOINTER_SERVICE = """
import sys, time
from psycopg_pool import ConnectionPool
import dbpool_exporter
pool = ConnectionPool(sys.argv[1], min_size=1, max_size=10)
dbpool_exporter.Exporter().register("checkpointer", pool).start_http_server(int(sys.argv[2]))
time.sleep(120)
"""


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
