"""The shared directory itself: dead, stalled and hostile workers, unsafe directories, both render paths."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from conftest import check_metrics
from dbpool_exporter import Exporter, workers

# A worker in its own process: real pool, real publisher; prints READY, then waits for a signal.
CHILD = """
import sys, time
from sqlalchemy import create_engine
from dbpool_exporter import Exporter
exporter = Exporter(multiprocess_dir=sys.argv[1]).register("app", create_engine(sys.argv[2], pool_size=3))
exporter.start()
time.sleep(1.5)
print("READY", flush=True)
if sys.argv[3] == "stall":
    exporter.poller.shutdown()  # stops publishing, as a blocked loop would, while the process lives on
elif sys.argv[3] == "exit":
    exporter.stop()
    sys.exit(0)
time.sleep(60)
"""


def child(directory: Path, url: str, mode: str = "run") -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), url, mode], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def scrape(exporter: Exporter) -> str:
    text = exporter.collector.text()
    assert text is not None
    return text


def workers_up(text: str) -> dict[str, float]:
    return {s.labels["worker"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "dbpool_worker_up"}


@pytest.fixture
def reader(tmp_path: Path, sync_url: str):
    exporter = Exporter(multiprocess_dir=tmp_path).register("mine", create_engine(sync_url, pool_size=2)).start()
    yield exporter
    exporter.stop()


def test_killed_worker_is_dropped_and_its_files_removed(tmp_path: Path, sync_url: str, reader: Exporter) -> None:
    proc = child(tmp_path, sync_url)
    try:
        assert workers_up(scrape(reader)).get(str(proc.pid)) == 1.0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert str(proc.pid) not in workers_up(scrape(reader))
        assert not list(tmp_path.glob(f"{proc.pid}-*"))
    finally:
        proc.kill()
        proc.wait(5)


def test_clean_exit_removes_its_files_at_once(tmp_path: Path, sync_url: str) -> None:
    proc = child(tmp_path, sync_url, "exit")
    assert proc.wait(10) == 0
    assert not list(tmp_path.glob(f"{proc.pid}-*"))


def test_stalled_worker_shows_down_and_its_pools_are_not_served(tmp_path: Path, sync_url: str,
                                                               reader: Exporter) -> None:
    proc = child(tmp_path, sync_url, "stall")
    try:
        pid = str(proc.pid)
        deadline = time.monotonic() + 15
        while workers_up(scrape(reader)).get(pid) != 0.0 and time.monotonic() < deadline:
            time.sleep(0.5)
        text = scrape(reader)
        assert workers_up(text)[pid] == 0.0
        assert f'worker="{pid}"' not in text.replace(f'dbpool_worker_up{{worker="{pid}"}}', "")
    finally:
        proc.kill()
        proc.wait(5)


def test_hostile_files_are_skipped(tmp_path: Path, reader: Exporter, promtool: str) -> None:
    reader._publish()
    (tmp_path / "1-junk.json").write_text("{not json")
    (tmp_path / "2-old.json").write_text(json.dumps({"format": 1, "pid": 2, "at": time.time(), "ttl": 9,
                                                     "families": []}))
    (tmp_path / "3-shape.json").write_text(json.dumps({"format": workers.FORMAT, "pid": 3, "at": time.time(),
                                                       "ttl": 9, "families": [["x", {"a": 1}]]}))
    with open(tmp_path / "4-huge.json", "wb") as fh:
        fh.truncate(workers.MAX_FILE_BYTES + 1)
    held = []
    for name in ("1-junk", "2-old", "3-shape", "4-huge"):  # locks held, as a live writer's are
        held.append(os.open(tmp_path / f"{name}.lock", os.O_RDONLY | os.O_CREAT))
        fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        text = scrape(reader)
    finally:
        for fd in held:
            os.close(fd)
    assert list(workers_up(text)) == [str(os.getpid())]
    assert (tmp_path / "1-junk.json").exists()  # alive, so kept; just not served
    check_metrics(promtool, text)


def test_lockless_leftovers_are_removed(tmp_path: Path, reader: Exporter) -> None:
    (tmp_path / "99-gone.json").write_text("{}")
    scrape(reader)
    assert not (tmp_path / "99-gone.json").exists()


def test_unsafe_default_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(workers.SharedDirError, match="not a directory"):
        workers.prepare_dir(tmp_path / "link" / "group", private=True)
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(workers.SharedDirError, match="writable by others"):
        workers.prepare_dir(tmp_path / "open" / "group", private=True)


def test_named_directory_that_cannot_be_used_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^multiprocess_dir: workers directory .*file: ") as info:
        Exporter(multiprocess_dir=tmp_path / "file").start()
    assert "\n" not in str(info.value)


def test_shared_registry_gets_parsed_families(tmp_path: Path, sync_url: str, promtool: str) -> None:
    registry = CollectorRegistry()
    exporter = Exporter(registry=registry, multiprocess_dir=tmp_path).register("app", create_engine(sync_url))
    exporter.start()
    try:
        exporter.poll_now()
        text = generate_latest(registry).decode()
        check_metrics(promtool, text)
        assert f'dbpool_max_connections{{kind="sqlalchemy",pool="app",worker="{os.getpid()}"}} 15.0' in text
        fast = scrape(exporter)
        check_metrics(promtool, fast)
        assert f'dbpool_max_connections{{pool="app",kind="sqlalchemy",worker="{os.getpid()}"}} 15.0' in fast
    finally:
        exporter.stop()
