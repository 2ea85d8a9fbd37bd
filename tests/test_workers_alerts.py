"""The shipped rules, unmodified, against a real 3-worker app: one worker's exhausted pool pages, alone."""

from __future__ import annotations

import threading
import time
import urllib.error
from pathlib import Path
from typing import Callable

from promstack import PromStack, wait_until
from workerapps import App, get, workers_seen

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
WANTED = {"DbpoolAcquireWaitNearTimeout", "DbpoolPoolExhausted"}


def test_one_leaking_worker_fires_the_shipped_rules_for_that_worker(launch: Callable[..., App]) -> None:
    # 2 + 3 connections, 5 s acquire timeout; the scrape job is not named "dbpool" on purpose.
    app = launch("uvicorn", 3, env={"DBPOOL_APP_POOL": "2,3,5"})
    workers_seen(app.metrics, 3)  # type: ignore[attr-defined]
    leaker = get(app.url + "/hold?n=5").split()[0]  # type: ignore[attr-defined]
    rules = {p.name: p.read_text() for p in ALERTS.glob("dbpool-*.yml")}
    target = app.metrics.removeprefix("http://").removesuffix("/metrics")  # type: ignore[attr-defined]
    stop = threading.Event()
    errors: list[str] = []

    def traffic() -> None:  # callers spread over the workers; those reaching the leaker wait, then fail
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                get(app.url + "/work", timeout=10)  # type: ignore[attr-defined]
            except urllib.error.HTTPError as e:
                errors.append(e.read().decode())
            except OSError:
                pass

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(6)]
    with PromStack([target], rules, job="myapp") as stack:
        for t in threads:
            t.start()
        try:
            def firing() -> dict[str, set[str]] | None:
                seen: dict[str, set[str]] = {}
                for alert in stack.prometheus_alerts():
                    if alert["state"] == "firing" and alert["labels"]["alertname"] in WANTED:
                        seen.setdefault(alert["labels"]["alertname"], set()).add(alert["labels"].get("worker", ""))
                return seen if set(seen) == WANTED else None
            seen = wait_until(firing, timeout=90, what=f"{WANTED} firing")
        finally:
            stop.set()
            for t in threads:
                t.join(15)
    # Only the leaking worker pages; the other two serve the same traffic without waiting.
    assert seen == {name: {leaker} for name in WANTED}, seen
    assert any("QueuePool limit" in e and e.startswith(leaker) for e in errors), errors[:3]
