"""``dbpool-exporter demo`` as a child process for tests, and the checks that it cleaned up after itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

import pytest
from procs import stop_process
from prometheus_client.parser import text_string_to_metric_families

from dbpool_exporter.throwaway import free_port

# The demo's two pools, as sorted label pairs (the keys of Demo.scrape()).
APP = (("kind", "sqlalchemy"), ("pool", "app"))
CHECKPOINTER = (("kind", "psycopg"), ("pool", "checkpointer"))

Wrap = Callable[[list[str], dict[str, str]], tuple[list[str], dict[str, str]]]


class Demo:
    """The demo as a child process; a thread collects its output so reads never block."""

    def __init__(self, *args: str, wrap: Wrap | None = None) -> None:
        """``wrap`` may change the command and environment, e.g. to run it where no PostgreSQL is installed."""
        self.port = free_port()
        argv = [sys.executable, "-m", "dbpool_exporter.demo", "--port", str(self.port), *args]
        env = {k: v for k, v in os.environ.items() if k != "DBPOOL_DEMO_DSN"}
        if wrap is not None:
            argv, env = wrap(argv, env)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._changed:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"no line matching {pattern!r}; output so far:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.5))

    def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return samples

    def finish(self, timeout: float = 30) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the demo did not exit in time; output:\n" + self.output)
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        """After a failed test: SIGTERM first, so the demo still removes its throwaway cluster."""
        stop_process(self.proc, grace=30)


def processes_mentioning(path: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def assert_cleaned_up(d: Demo, base: str) -> None:
    assert f"removed {base}" in d.output
    assert not os.path.exists(base), f"{base} left behind"
    assert processes_mentioning(base) == [], "PostgreSQL processes left behind"


def throwaway_dir(d: Demo) -> str:
    return d.wait_line(r"throwaway PostgreSQL in (\S+),", timeout=90).group(1)
