"""Which application code checked a connection out: the first frame outside pool, driver and framework code.

A site is captured as a code object and a bytecode offset (no frame is kept alive, and no line
table is scanned on the host's path); ``label()`` turns it into ``get_db (app/db/session.py:31)``
at poll time, once per site.
"""

from __future__ import annotations

import os
import sys
from types import CodeType, FrameType

# Frames in these libraries are plumbing between the application and the pool. The exporter's
# own demo and workload are application code, so only its hooks and recorder are skipped.
_INTERNAL_DIRS = (
    "/sqlalchemy/", "/psycopg/", "/psycopg_pool/", "/asyncio/", "/starlette/", "/fastapi/", "/anyio/",
    "/greenlet/", "/dbpool_exporter/sources/",
)
_INTERNAL_FILES = (
    "/contextlib.py", "/dbpool_exporter/hooks.py", "/dbpool_exporter/recorder.py", "/dbpool_exporter/sites.py",
)
_MAX_DEPTH = 64
OTHER = "other"  # the bucket; a real site always has "(" in its label, so never equals it

Site = tuple[CodeType, int]

# Code object -> internal?; filled lazily, one entry per distinct function seen on a checkout path.
_internal: dict[CodeType, bool] = {}
_labels: dict[Site, str] = {}
_LABEL_CACHE_MAX = 10_000


def _classify(code: CodeType) -> bool:
    filename = code.co_filename.replace("\\", "/")
    inside = any(d in filename for d in _INTERNAL_DIRS) or filename.endswith(_INTERNAL_FILES)
    _internal[code] = inside
    return inside


def capture(skip: int) -> Site | None:
    """The first application frame above the caller's ``skip`` frames, or None if none is found."""
    frame: FrameType | None = sys._getframe(skip + 1)
    hops = 0
    internal = _internal
    for _ in range(_MAX_DEPTH):
        if frame is None:
            frame = parent_greenlet_frame(hops)
            hops += 1
            if frame is None:
                return None
        code = frame.f_code
        inside = internal.get(code)
        if inside is None:
            inside = _classify(code)
        if not inside:
            return code, frame.f_lasti
        frame = frame.f_back
    return None


def first_in(stack: tuple[Site, ...]) -> Site | None:
    """The first application frame of a stack captured innermost-first."""
    for code, lasti in stack:
        inside = _internal.get(code)
        if inside is None:
            inside = _classify(code)
        if not inside:
            return code, lasti
    return None


def parent_greenlet_frame(hops: int) -> FrameType | None:
    """SQLAlchemy's asyncio layer runs the pool in a greenlet whose stack ends at greenlet_spawn;
    the application's coroutines are on the parent greenlet's stack."""
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return None
    current = greenlet.getcurrent()
    for _ in range(hops + 1):
        current = current.parent
        if current is None:
            return None
    return current.gr_frame


def lineno(code: CodeType, lasti: int) -> int | None:
    """What ``frame.f_lineno`` said at bytecode offset ``lasti``."""
    if lasti < 0:
        return code.co_firstlineno
    for start, end, line in code.co_lines():
        if start <= lasti < end:
            return line
    return None


def label(site: Site) -> str:
    """``function (path/relative/to/app.py:line)``."""
    text = _labels.get(site)
    if text is None:
        code, lasti = site
        text = f"{code.co_name} ({relative(code.co_filename)}:{lineno(code, lasti) or code.co_firstlineno})"
        if len(_labels) >= _LABEL_CACHE_MAX:
            _labels.clear()
        _labels[site] = text
    return text


def relative(filename: str) -> str:
    """``filename`` relative to the working directory (the app), or to the sys.path root holding it.

    An installed package (a ``site-packages`` root, even one inside the working directory's venv)
    is named from that root; anything else under the working directory from there.
    """
    paths = [os.path.abspath(p) for p in sys.path if p]
    holding = [p for p in paths if filename.startswith(p + os.sep)]
    packages = [p for p in holding if "packages" in os.path.basename(p)]
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was removed under the application
        cwd = "\0"
    if packages:
        root = max(packages, key=len)
    elif filename.startswith(cwd + os.sep):
        root = cwd
    elif holding:
        root = max(holding, key=len)
    else:
        return filename
    return os.path.relpath(filename, root)
