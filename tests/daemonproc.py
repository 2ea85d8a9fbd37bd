"""``dbpool-exporter`` as a real subprocess for tests, and the password every robustness test looks for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import quote, quote_plus

import pytest

from dbpool_exporter.throwaway import free_port
from samples import sample_value

# Characters that need quoting in a URL, so every encoded form of it is checked too.
SECRET = "Fault-p@ss:w/rd#7"
SECRET_FORMS = (SECRET, quote(SECRET, safe=""), quote_plus(SECRET))


def assert_no_secret(where: str, text: str) -> None:
    for form in SECRET_FORMS:
        assert form not in text, f"the password ({form!r}) shows in the {where}"
    assert "Traceback" not in text, f"a traceback in the {where}:\n{text[-3000:]}"


def exporter_command() -> list[str]:
    """The installed ``dbpool-exporter`` script, else the module run by this interpreter."""
    exe = Path(sys.executable).with_name("dbpool-exporter")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dbpool_exporter.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without DATA_SOURCE_NAME*, so no daemon picks up a DSN the test did not give it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_SOURCE_NAME")}
    return {**env, **extra}


class DaemonProcess:
    """One daemon on a free loopback port; its stderr (the log) goes to a file the test can read."""

    def __init__(self, tmp_path: Path, config: str | None, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.config_path = tmp_path / "dbpool.yml"
        self.log_path = tmp_path / "daemon.log"
        cmd = [*exporter_command(), "run", "--web.listen-address", f"127.0.0.1:{self.port}", "--log.level", "debug",
               *args]
        if config is not None:
            self.write_config(config)
            cmd += ["--config.file", str(self.config_path)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env or clean_env())

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body

    def value(self, name: str, /, **labels: str) -> float | None:
        return sample_value(self.metrics(), name, **labels)

    def require(self, name: str, /, **labels: str) -> float:
        """Like :meth:`value`, for a sample that must be there."""
        value = self.value(name, **labels)
        assert value is not None, f"{name}{labels} missing"
        return value

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if check():
                    return
            except (OSError, AssertionError):
                pass  # not listening yet
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; log:\n{self.log()}")

    def wait_ready(self) -> None:
        self.wait_for(lambda: self.get("/-/ready")[0] == 200, "/-/ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Signal it and wait; returns the exit code and how long it took (reported, not asserted)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._log.close()
        return code, time.monotonic() - started
