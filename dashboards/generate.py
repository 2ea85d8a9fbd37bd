"""Write the dashboards' JSON (`python dashboards/generate.py`; `--check` only reports drift)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `dashboards` and `scripts` importable
    sys.path.insert(0, str(HERE.parent))

from dashboards import overview, server  # noqa: E402
from dashboards.common import finish, queries  # noqa: E402
from scripts.generated import write_or_check  # noqa: E402

DASHBOARDS = {"dbpool-overview.json": overview, "dbpool-server.json": server}


def render() -> dict[str, dict[str, Any]]:
    """Every dashboard as Grafana JSON (a dict), keyed by file name."""
    return {name: finish(module.dashboard()) for name, module in DASHBOARDS.items()}


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target of every dashboard, template variables unresolved.

    Variables appear only as `label=~"$var"` and `[$__rate_interval]`, so `.*` and `1m` resolve them.
    """
    return [(f"{data['title']} / {title}", expr) for data in render().values() for title, expr in queries(data)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write (default: dashboards/)")
    args = parser.parse_args(argv)
    files = {name: dump(data) for name, data in render().items()}
    return write_or_check(files, args.out, check=args.check, command="python dashboards/generate.py")


if __name__ == "__main__":
    sys.exit(main())
