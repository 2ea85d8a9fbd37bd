"""No noise: the demo's steady state under the shipped rules at their real durations fires nothing.

Runs ``dbpool-exporter demo`` (its calm load, not ``--incident``) scraped every 15 s by a real
Prometheus loading alerts/*.yml unchanged, and lists every alert that went pending or firing:

    python bench/quiet.py [--duration 720]

The default 12 minutes cover the longest history a rule here needs before it can fire
(DbpoolPoolExhaustionForecast: 6m of recorded floor, then for: 1m) with room to spare.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from procs import stop_process  # noqa: E402

from dbpool_exporter.throwaway import free_port  # noqa: E402
from promstack import PromStack, wait_until  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=720.0, help="seconds to watch (default 720)")
    args = parser.parse_args(argv)
    rules = {p.name: p.read_text() for p in sorted((ROOT / "alerts").glob("dbpool-*.yml"))}
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "dbpool_exporter.cli", "demo", "--port", str(port),
                             "--duration", str(args.duration + 120)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stack = None
    seen: dict[tuple[str, str, str], str] = {}
    try:
        stack = PromStack([f"127.0.0.1:{port}"], rules, job="demo", interval="15s").start()
        wait_until(stack.targets_up, timeout=120, what="Prometheus scraping the demo")
        started = time.monotonic()
        print(f"# watching the demo's steady state for {args.duration:.0f} s; rules at their real for:, "
              "scrape/eval 15 s", flush=True)
        while time.monotonic() - started < args.duration:
            if demo.poll() is not None:
                print(f"quiet.py: the demo exited early ({demo.returncode}): {demo.stderr.read().strip()[-300:]}",
                      file=sys.stderr)
                return 2
            for alert in stack.prometheus_alerts():
                key = (alert["labels"].get("alertname", ""), alert["labels"].get("pool", "")
                       or alert["labels"].get("server", ""), alert["state"])
                if key not in seen:
                    seen[key] = f"{time.monotonic() - started:.0f} s"
                    print(f"[{seen[key]:>6}] {key[2]}: {key[0]} {key[1]}", flush=True)
            time.sleep(5)
        print()
        if seen:
            print(f"# NOT quiet: {len(seen)} alert state(s) seen in {args.duration:.0f} s")
            for (name, what, state), at in sorted(seen.items(), key=lambda kv: kv[1]):
                print(f"- {name} ({what}) {state} at {at}")
            return 1
        print(f"# quiet: no alert pending or firing in {args.duration:.0f} s of the demo's steady state")
        return 0
    finally:
        if stack is not None:
            stack.stop()
        stop_process(demo, grace=30)


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
