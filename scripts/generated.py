"""Write-or-check for committed generated files (alert rules, dashboards), so a stale file fails CI."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping


def write_or_check(files: Mapping[str, str], out: Path, *, check: bool, command: str) -> int:
    """Write the files that differ, or with ``check`` name them and return 1; 0 when all match."""
    stale = [name for name, text in files.items()
             if not (out / name).exists() or (out / name).read_text() != text]
    if check:
        for name in stale:
            print(f"{out / name} is out of date: run {command}", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        (out / name).write_text(files[name])
        print(f"wrote {out / name}")
    return 0
