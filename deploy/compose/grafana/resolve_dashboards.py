"""Resolve Grafana dashboards' ``__inputs`` (e.g. ``${DS_PROMETHEUS}``) so file provisioning can load them.

Grafana fills a dashboard's ``__inputs`` only in its interactive "Import" dialog; a provisioned file
keeps the literal ``${DS_PROMETHEUS}`` and every panel says "datasource not found". This does what the
dialog does: each datasource input becomes the uid of a provisioned datasource of that plugin type,
each constant input its value, and ``__inputs`` is dropped. An input that the dashboard also defines
as a datasource template variable of the same name is left as is: Grafana resolves ``${NAME}`` through
that variable at run time (the default datasource of its type), and the variable's picker keeps working.

    python resolve_dashboards.py --datasource prometheus=prometheus SRC_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class InputError(Exception):
    """A dashboard whose inputs cannot be resolved: one line for the user."""


def resolve(dashboard: dict[str, Any], datasources: dict[str, str]) -> dict[str, Any]:
    """The dashboard with every ``${INPUT}`` replaced; ``datasources`` maps plugin id -> datasource uid."""
    replacements: dict[str, str] = {}
    templating = dashboard.get("templating", {}).get("list", [])
    variables = {v.get("name") for v in templating if v.get("type") == "datasource"}
    for item in dashboard.get("__inputs", []):
        name, kind = item.get("name"), item.get("type")
        if not name:
            raise InputError("an __inputs entry has no name")
        if kind == "datasource" and name in variables:
            continue  # resolved by the dashboard's own variable
        if kind == "datasource":
            plugin = item.get("pluginId", "")
            if plugin not in datasources:
                raise InputError(f"input {name} needs a {plugin or '?'} datasource: pass --datasource {plugin}=UID")
            replacements["${" + name + "}"] = datasources[plugin]
        elif kind == "constant":
            replacements["${" + name + "}"] = str(item.get("value", ""))
        else:
            raise InputError(f"input {name} has type {kind!r}; only datasource and constant inputs can be resolved")
    resolved = _replace({k: v for k, v in dashboard.items() if k != "__inputs"}, replacements)
    # A stale numeric id from an export would clash with other dashboards; provisioning matches on uid.
    resolved["id"] = None
    return resolved


def _replace(value: Any, replacements: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _replace(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, replacements) for v in value]
    if isinstance(value, str):
        for placeholder, replacement in replacements.items():
            value = value.replace(placeholder, replacement)
    return value


def resolve_dir(src: Path, out: Path, datasources: dict[str, str]) -> list[Path]:
    """Write a resolved copy of every ``src/*.json`` into ``out`` (stale ``*.json`` there removed)."""
    sources = sorted(src.glob("*.json"))
    if not sources:
        raise InputError(f"no dashboards (*.json) in {src}")
    resolved = []
    for path in sources:
        try:
            dashboard = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read dashboard JSON: {e}") from None
        if not isinstance(dashboard, dict):
            raise InputError(f"{path}: expected a JSON object")
        try:
            resolved.append((path.name, resolve(dashboard, datasources)))
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.json"):
        stale.unlink()
    written = []
    for name, dashboard in resolved:
        target = out / name
        target.write_text(json.dumps(dashboard, indent=2) + "\n", encoding="utf-8")
        target.chmod(0o644)  # Grafana runs as another user
        written.append(target)
    return written


def _pair(text: str) -> tuple[str, str]:
    plugin, sep, uid = text.partition("=")
    if not sep or not plugin or not uid:
        raise argparse.ArgumentTypeError(f"expected PLUGIN=UID, got {text!r}")
    return plugin, uid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasource", type=_pair, action="append", default=[], metavar="PLUGIN=UID",
                        help="uid of the datasource that inputs of this plugin type get (repeatable)")
    parser.add_argument("src", type=Path, help="directory with the dashboards' JSON")
    parser.add_argument("out", type=Path, help="directory Grafana's dashboard provider reads")
    args = parser.parse_args(argv)
    try:
        written = resolve_dir(args.src, args.out, dict(args.datasource))
    except InputError as e:
        print(f"resolve_dashboards: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"resolve_dashboards: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"resolved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
