"""Child processes and sockets the tests and benches drive: stopping them, their CPU time, slow clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path


def stop_process(proc: subprocess.Popen, grace: float = 10) -> int:  # type: ignore[type-arg]
    """SIGTERM (so the child can clean up), then SIGKILL after ``grace`` seconds; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slow_clients(port: int, count: int, stop: threading.Event, opened: list[socket.socket]) -> None:
    """Open up to ``count`` connections that send a request line, then one header every 2 s until ``stop``."""
    for _ in range(count):
        if stop.is_set():
            return
        with contextlib.suppress(OSError):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            opened.append(s)
    while not stop.wait(2):
        for s in list(opened):
            with contextlib.suppress(OSError):
                s.sendall(b"X-Slow: 1\r\n")
