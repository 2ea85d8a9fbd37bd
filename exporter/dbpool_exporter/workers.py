"""Several worker processes, one endpoint: each worker publishes its families to a shared directory.

Why files: every way a worker can end (exit, crash, SIGKILL, an OOM kill) must make its pools vanish, and
whichever process answers a scrape must see every live worker without talking to the others. Each worker
holds an ``flock`` on its own ``<id>.lock`` for as long as it lives (the kernel drops it however the process
dies, also across containers that share the volume, where PIDs are not comparable) and atomically replaces
its ``<id>.json`` once per poll interval. A reader lists the JSON files, skips a worker whose lock it can
take (dead: its files are removed) or whose file is older than a few intervals (alive but stalled), and
adds ``worker="<pid>"`` to every sample. JSON, not pickle: a shared directory must never execute code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from .exposition import Exposition, Rendered, labels_text, render
from .metrics import WORKER_UP

try:
    import fcntl
except ImportError:  # Windows: no flock; liveness falls back to the file's age alone
    fcntl = None  # type: ignore[assignment]  # the name is typed as the module; None is checked before each use

log = logging.getLogger("dbpool_exporter.workers")

ENV_DIR = "DBPOOL_EXPORTER_MULTIPROC_DIR"
WORKER_LABEL = "worker"
FORMAT = 2
# A worker's file is served while younger than this many publish intervals (plus a second): a worker
# whose loop is stuck stops publishing and its pools stop being served, as a stale snapshot does.
STALE_INTERVALS = 3
# A published document is a few kilobytes per pool; anything far larger is not ours.
MAX_FILE_BYTES = 8 << 20


class SharedDirError(Exception):
    """The shared directory cannot be used safely (not ours, not a directory, not writable)."""


def is_managed_worker() -> bool:
    """True in a worker of a process manager: gunicorn's fork, or uvicorn/hypercorn's spawned children."""
    # A child of multiprocessing has it imported (spawn and forkserver start in it, a fork inherits it):
    # a process without it is no such child, and need not load it to find out (the daemon never does).
    mp = sys.modules.get("multiprocessing")
    return "gunicorn.arbiter" in sys.modules or (mp is not None and mp.parent_process() is not None)


def default_dir() -> Path | None:
    """Where workers meet when the user named no directory, or ``None`` for a lone process.

    A gunicorn/uvicorn master and its workers share a process group (a master with ``--preload`` too,
    unlike its PID), and two services started apart do not.
    """
    if not is_managed_worker() or not hasattr(os, "getpgid"):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"dbpool-exporter-{uid}" / f"pgid-{os.getpgid(0)}"


def prepare_dir(path: Path, *, private: bool) -> Path:
    """Create ``path`` if needed and check it is a real directory we may use; else ``SharedDirError``.

    ``private`` (the default directories under /tmp): owned by us and not writable by others, so another
    local user cannot plant workers in our output.
    """
    try:
        if private:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            _check_private(path.parent)
        path.mkdir(mode=0o700 if private else 0o777, parents=not private, exist_ok=True)
        info = path.lstat()
    except SharedDirError:
        raise
    except OSError as e:
        raise SharedDirError(f"workers directory {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SharedDirError(f"workers directory {path}: not a directory")
    if private:
        _check_private(path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise SharedDirError(f"workers directory {path}: not writable")
    return path


def _check_private(path: Path) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SharedDirError(f"workers directory {path}: not a directory (a link?)")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise SharedDirError(f"workers directory {path}: owned by another user or writable by others")


class Publisher:
    """This process's entry in the shared directory: a held lock and a file replaced on each publish."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid = os.getpid()
        # The PID alone could repeat (PID reuse, two containers sharing the volume); the token cannot.
        self.id = f"{self.pid}-{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self._hold_lock()

    @property
    def path(self) -> Path:
        return self.directory / f"{self.id}.json"

    def _hold_lock(self) -> None:
        if fcntl is None:
            return
        # Readable by all: a sidecar running as another user tests the lock through a read-only descriptor.
        fd = os.open(self.directory / f"{self.id}.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd

    def publish(self, families: list[Rendered], *, ttl: float, serving: str = "") -> None:
        """Atomically replace this worker's file with ``families`` (``ttl``: seconds it stays current)."""
        doc = {"format": FORMAT, "pid": self.pid, "host": socket.gethostname(), "at": time.time(), "ttl": ttl,
               "serving": serving, "families": families}
        # Unique per call: two publishes at once (a scheduled one and poll_now's) must not share a file.
        tmp = self.directory / f".{self.id}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, separators=(",", ":"))
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Remove this worker's files (a clean exit vanishes at once, not after the next read)."""
        for path in (self.path, self.directory / f"{self.id}.lock"):
            with contextlib.suppress(OSError):
                path.unlink()
        self.forget()

    def forget(self) -> None:
        """Drop the lock without touching files: after a fork the child's copy must not keep the parent alive."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True, slots=True)
class WorkerDoc:
    """One live worker's latest publication; ``current`` is false once it is older than its ttl."""

    id: str
    pid: int
    at: float
    serving: str
    current: bool
    families: list[Rendered]


def read_workers(directory: Path, *, exclude: str = "", now: float | None = None) -> list[WorkerDoc]:
    """Every live worker's document; files of dead workers are removed on the way."""
    now = time.time() if now is None else now
    out: list[WorkerDoc] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in sorted(names):
        if not name.endswith(".json") or name.startswith("."):
            continue
        wid = name[:-5]
        if wid == exclude:
            continue
        if _dead(directory, wid):
            continue
        doc = _load(directory / name)
        if doc is None:
            continue
        out.append(WorkerDoc(wid, doc["pid"], doc["at"], doc["serving"], now - doc["at"] <= doc["ttl"],
                             doc["families"]))
    return out


def _dead(directory: Path, wid: str) -> bool:
    """Take the worker's lock if we can: then nobody holds it, the worker is gone, and so are its files."""
    if fcntl is None:
        return False
    lock = directory / f"{wid}.lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # A lock-less file: its writer has exited (close() removes the lock last) or crashed mid-start.
        with contextlib.suppress(OSError):
            (directory / f"{wid}.json").unlink()
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held (EWOULDBLOCK): alive; any other error: assume alive, the ttl still applies
    else:
        for path in (directory / f"{wid}.json", lock):
            with contextlib.suppress(OSError):
                path.unlink()
        return True
    finally:
        os.close(fd)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError("file too large")
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        doc["pid"], doc["at"], doc["ttl"] = int(doc["pid"]), float(doc["at"]), float(doc["ttl"])
        doc["serving"] = str(doc.get("serving") or "")
        families = doc["families"]
        if not isinstance(families, list) or not all(
                isinstance(f, list) and len(f) == 4 and all(isinstance(x, str) for x in f) for f in families):
            raise ValueError("families are not [name, type, help, text] lists")
        return doc
    except FileNotFoundError:
        return None  # removed between listdir and open: the worker exited
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.debug("skipping unreadable worker file %s: %s", path.name, e)
        return None


def worker_up(docs: Iterable[WorkerDoc], own_pid: int | None = None) -> Metric:
    """One ``dbpool_worker_up`` sample per live worker, so a stalled one shows as 0 rather than vanishing."""
    up = Metric(WORKER_UP.name, WORKER_UP.help, WORKER_UP.type)
    if own_pid is not None:
        up.samples.append(Sample(WORKER_UP.name, {WORKER_LABEL: str(own_pid)}, 1.0))
    for doc in docs:
        up.samples.append(Sample(WORKER_UP.name, {WORKER_LABEL: str(doc.pid)}, 1.0 if doc.current else 0.0))
    return up


def add_workers(out: Exposition, directory: Path, *, own: list[Rendered] | None = None,
                publisher: Publisher | None = None, labels: dict[str, str] | None = None) -> None:
    """Add every live worker's pools to ``out``: this process's own (``own``) and the published ones.

    A stalled worker's pools are not served, as a stale snapshot is not; ``labels`` (const labels) go on all.
    """
    labels = labels or {}
    docs = read_workers(directory, exclude=publisher.id if publisher else "")
    if publisher is not None and own is not None:
        out.add(own, labels_text({WORKER_LABEL: str(publisher.pid), **labels}))
    for doc in docs:
        if doc.current:
            out.add(doc.families, labels_text({WORKER_LABEL: str(doc.pid), **labels}))
    out.add(render([worker_up(docs, publisher.pid if publisher else None)]), labels_text(labels))
