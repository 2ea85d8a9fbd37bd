"""Daemon logging: logfmt or JSON lines on stderr, levels debug|info|warn|error, passwords scrubbed."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Iterable, TextIO

from . import redact

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
FORMATS = ("logfmt", "json")
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "error"}


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\t'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _Formatter(logging.Formatter):
    """One line per record; the message is scrubbed of anything password-like as the last step."""

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.fmt = fmt
        self.secrets: tuple[str, ...] = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            # A traceback is for a bug in the exporter; keep only its last line, the error itself.
            message += f" exc={record.exc_info[0].__name__ if record.exc_info[0] else ''}: {record.exc_info[1]}"
        message = redact.redact(message, self.secrets)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        level = _NAMES.get(record.levelno, record.levelname.lower())
        if self.fmt == "json":
            return json.dumps({"ts": ts, "level": level, "logger": record.name, "msg": message})
        return f"ts={ts} level={level} logger={record.name} msg={_logfmt_value(message)}"


_handler: logging.Handler | None = None


def setup(level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None) -> None:
    """Install (or reconfigure) the daemon's single stderr handler on the root logger."""
    global _handler
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(stream or sys.stderr)
        root.addHandler(_handler)
    _handler.setFormatter(_Formatter(fmt, secrets()))
    root.setLevel(LEVELS[level])
    # APScheduler logs every run at info, and a warning for every run skipped because the previous poll
    # is still going. Skipping is the design (max_instances=1: a slow server never piles up queries) and
    # the slow poll shows in dbpool_source_poll_duration_seconds and the source's own error, once.
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(max(LEVELS[level], logging.INFO))


def set_secrets(values: Iterable[str]) -> None:
    """Exact strings (passwords, DSNs) to blank out of every log line, whatever their quoting."""
    global _secrets
    _secrets = redact.secrets(*values)
    if _handler is not None and isinstance(_handler.formatter, _Formatter):
        _handler.formatter.secrets = _secrets


_secrets: tuple[str, ...] = ()


def secrets() -> tuple[str, ...]:
    return _secrets


class RateLimited:
    """At most one record per key every ``every`` seconds; the next one says how many were held back.

    For events a client can trigger at will (hang-ups, bad handshakes): the log shows them without
    letting anyone who can reach the port flood it.
    """

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-self.every, 0))
            if now - last < self.every:
                self._last[key] = (last, held + 1)
                return
            self._last[key] = (now, 0)
        if held:
            msg, args = msg + " (%d more like it in the last %.0f s)", (*args, held, now - last)
        self.logger.log(level, msg, *args)
