"""``dbpool-exporter`` command line: ``run``, ``check-config``, and subcommands other modules plug in."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from . import __version__, logs

if TYPE_CHECKING:
    from .config import Config
    from .webconfig import WebConfig

# Modules that add a subcommand through ``add_parser(subparsers)``; each is optional, and imported only
# when the command line is not one of the core commands (``run`` never loads the demo's pool libraries).
PLUGINS = ("dbpool_exporter.demo", "dbpool_exporter.budget")
CORE_COMMANDS = ("run", "check-config")
# What the daemon's commands import that the core install lacks: they say which extra to install.
DAEMON_EXTRA = "pip install 'dbpool-exporter[daemon]'"
DAEMON_MODULES = ("asyncpg", "yaml", "bcrypt")

log = logging.getLogger("dbpool_exporter")


class _Parser(argparse.ArgumentParser):
    """Bad flags give one line and exit 2 (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _missing_extra(command: str, module: str | None) -> int:
    print(f"dbpool-exporter: {command} needs {module} (the [daemon] extra): {DAEMON_EXTRA}", file=sys.stderr)
    return 1


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a meta path finder may refuse outright
        return False


def _run(args: argparse.Namespace) -> int:
    # PyYAML and bcrypt are imported only when a file or basic auth needs them: look for every one of the
    # extra's modules before anything runs, so a missing one is a line now, not a traceback on a reload.
    missing = next((m for m in DAEMON_MODULES if not _installed(m)), None)
    if missing:
        return _missing_extra("run", missing)
    try:
        from .config import Config, ConfigError, from_environment, load_file
        from .daemon import Daemon
        from .httpserver import parse_listen_address
        from .webconfig import WebConfigError, load_web_config
    except ImportError as e:
        return _missing_extra("run", e.name)
    logs.setup(args.log_level, args.log_format)
    path = args.config_file
    telemetry_path = args.web_telemetry_path
    if not telemetry_path.startswith("/") or telemetry_path == "/" or telemetry_path.startswith("/-/"):
        log.error("--web.telemetry-path: must start with / and not be / or under /-/, got %r", telemetry_path)
        return 2

    try:
        parse_listen_address(args.web_listen_address)
    except ValueError as e:
        log.error("--web.listen-address: %s", e)
        return 2

    def web_config_loader() -> WebConfig | None:
        return load_web_config(args.web_config_file) if args.web_config_file else None

    try:
        web_config_loader()
    except WebConfigError as e:
        for problem in e.problems:
            log.error("--web.config.file: %s", problem)
        return 2

    def loader() -> Config:
        if not path and args.workers_dir and not _dsn_in_environment():
            return Config(servers=(), workers_dir=args.workers_dir, origin="--workers.dir")
        config = load_file(path) if path else from_environment()
        return dataclasses.replace(config, workers_dir=args.workers_dir) if args.workers_dir else config

    try:
        config = loader()
    except ConfigError as e:
        for problem in e.problems:
            log.error("bad config: %s", problem)
        return 2

    try:
        daemon = Daemon(config, loader, listen_address=args.web_listen_address, telemetry_path=telemetry_path,
                        web_config_loader=web_config_loader)
    except WebConfigError as e:  # changed between the check above and now
        for problem in e.problems:
            log.error("--web.config.file: %s", problem)
        return 2
    except OSError as e:
        log.error("--web.listen-address: %s", e.strerror or e)
        return 1
    try:
        return asyncio.run(daemon.run())
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        return 130


def _dsn_in_environment() -> bool:
    return bool(os.environ.get("DATA_SOURCE_NAME") or os.environ.get("DATA_SOURCE_NAME_FILE"))


def _check_config(args: argparse.Namespace) -> int:
    if not _installed("yaml"):  # imported only once the file is read: look for it first
        return _missing_extra("check-config", "yaml")
    try:
        from .config import ConfigError, load_file
    except ImportError as e:
        return _missing_extra("check-config", e.name)
    try:
        config = load_file(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    print(f"ok: {args.file}: {config.summary()}")
    return 0


def _add_plugins(subparsers: Any) -> None:
    for module_name in PLUGINS:
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            # The module is there but needs something not installed: say so when it is asked for.
            command, reason = module_name.rsplit(".", 1)[-1], f"{e}"
            sub = subparsers.add_parser(command, help=f"(unavailable: {reason})")
            sub.set_defaults(func=lambda _args, reason=reason, command=command: _unavailable(command, reason))
            continue
        module.add_parser(subparsers)


def _unavailable(command: str, reason: str) -> int:
    print(f"dbpool-exporter: {command} is unavailable: {reason}", file=sys.stderr)
    return 1


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(prog="dbpool-exporter",
                     description="Prometheus exporter for database connection pools and PostgreSQL servers.")
    parser.add_argument("--version", action="version", version=f"dbpool-exporter {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subparsers.add_parser("run", help="run the exporter daemon")
    run.add_argument("--config.file", dest="config_file", metavar="FILE",
                     help="YAML config; without it one server comes from DATA_SOURCE_NAME or DATA_SOURCE_NAME_FILE")
    run.add_argument("--workers.dir", dest="workers_dir", metavar="DIR",
                     help="serve the pools that an app's worker processes publish to DIR (sidecar); "
                          "overrides workers_dir in the config")
    run.add_argument("--web.listen-address", dest="web_listen_address", default=":9188", metavar="ADDR",
                     help="host:port to serve on; ':9188' is every interface (default %(default)s)")
    run.add_argument("--web.telemetry-path", dest="web_telemetry_path", default="/metrics", metavar="PATH",
                     help="path of the metrics (default %(default)s)")
    run.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                     help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    run.add_argument("--log.level", dest="log_level", default="info", choices=list(logs.LEVELS))
    run.add_argument("--log.format", dest="log_format", default="logfmt", choices=list(logs.FORMATS))
    run.set_defaults(func=_run)

    check = subparsers.add_parser("check-config", help="validate a config file without connecting (exit 0 or 2)")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_check_config)

    if plugins:
        _add_plugins(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first word that is not a flag (the top level has only --help and --version).
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(plugins=command not in CORE_COMMANDS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, bad flags: argparse already printed its line
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
