"""The daemon's YAML config: its declared shape, ``${ENV}`` interpolation, and the checks across fields."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .limits import MAX_CONFIG_BYTES, MAX_DSN_BYTES, TooLarge, read_capped
from .redact import parse_dsn, server_label
from .schema import INVALID, ConfigError, Count, Duration, ListOf, Raw, Section, Str, join, kind, parse_duration

__all__ = ["Config", "ConfigError", "PgBouncerConfig", "ServerConfig", "from_environment", "load_file", "parse"]

# Keys a server (or `defaults`) may set, with their defaults. Durations are seconds.
SERVER_DEFAULTS: dict[str, Any] = {
    "interval": 10.0,  # a server query is cheap but not free; scrapes are usually 15-30 s apart
    "statement_timeout": 5.0,
    "connect_timeout": 5.0,
    "max_label_values": 50,
    "backoff_max": 30.0,
}
DSN_KEYS = ("dsn", "dsn_env", "dsn_file")
# Labels the exporter itself sets; a const label with one of these names would clash.
RESERVED_LABELS = frozenset({"source", "kind", "server", "database", "user", "application_name", "state", "label",
                             "pool", "pool_class", "version", "le", "quantile", "worker",
                             "pgbouncer", "server_database", "pool_mode", "list"})
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_ENV_REF = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")

SETTINGS = {"interval": Duration(), "statement_timeout": Duration(), "connect_timeout": Duration(),
            "max_label_values": Count(1), "backoff_max": Duration()}
SOURCE = Section({"name": Str("a non-empty string of at most 128 characters", required=True, max_len=128),
                  **{key: Str() for key in DSN_KEYS}, **SETTINGS})
SCHEMA = Section({"servers": ListOf(SOURCE), "pgbouncers": ListOf(SOURCE), "defaults": Section(SETTINGS),
                  "const_labels": Raw(), "workers_dir": Str("the path of a directory")})
# Per list: how a duplicate name and a second entry for one address are told.
_WORDING = {"servers": ("server name {!r}", "server"),
            "pgbouncers": ("source name {!r} (servers and pgbouncers share names)", "PgBouncer")}


@dataclass(frozen=True)
class ServerConfig:
    name: str
    dsn: str = field(repr=False)  # never printed: it may hold a password
    interval: float = SERVER_DEFAULTS["interval"]
    statement_timeout: float = SERVER_DEFAULTS["statement_timeout"]
    connect_timeout: float = SERVER_DEFAULTS["connect_timeout"]
    max_label_values: int = SERVER_DEFAULTS["max_label_values"]
    backoff_max: float = SERVER_DEFAULTS["backoff_max"]

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SERVER_DEFAULTS}

    def source(self) -> Any:
        from .sources.postgres import PostgresSource

        return PostgresSource(self.name, self.dsn, **self.settings())


@dataclass(frozen=True)
class PgBouncerConfig(ServerConfig):
    """A PgBouncer admin console (``pgbouncers:``): the same keys as a server."""

    def source(self) -> Any:
        from .sources.pgbouncer import PgBouncerSource

        return PgBouncerSource(self.name, self.dsn, **self.settings())


@dataclass(frozen=True)
class Config:
    servers: tuple[ServerConfig, ...]
    const_labels: Mapping[str, str] = field(default_factory=dict)
    origin: str = ""  # the file, or the environment variable, it came from
    pgbouncers: tuple[PgBouncerConfig, ...] = ()
    workers_dir: str = ""  # where an app's worker processes publish their pools (sidecar mode)

    @property
    def sources(self) -> tuple[ServerConfig, ...]:
        """Everything the daemon polls: servers, then PgBouncers (names are unique across both)."""
        return (*self.servers, *self.pgbouncers)

    def summary(self) -> str:
        names = ", ".join(s.name for s in self.servers)
        text = f"{len(self.servers)} server(s) ({names}), {len(self.const_labels)} const label(s)"
        if self.pgbouncers:
            text += f", {len(self.pgbouncers)} pgbouncer(s) ({', '.join(p.name for p in self.pgbouncers)})"
        if self.workers_dir:
            text += f", workers from {self.workers_dir}"
        return text


def load_file(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ``ConfigError`` listing every problem."""
    from . import yamlfile  # PyYAML only when a file is read: DATA_SOURCE_NAME alone never loads it

    try:
        return parse(yamlfile.load(path, MAX_CONFIG_BYTES), env=os.environ if env is None else env, origin=path)
    except yamlfile.YAMLFileError as e:
        raise ConfigError([str(e)]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a config file"]) from None


def from_environment(env: Mapping[str, str] | None = None) -> Config:
    """postgres_exporter style: one server from ``DATA_SOURCE_NAME`` or ``DATA_SOURCE_NAME_FILE``."""
    env = os.environ if env is None else env
    inline, file = env.get("DATA_SOURCE_NAME"), env.get("DATA_SOURCE_NAME_FILE")
    if inline and file:
        raise ConfigError(["DATA_SOURCE_NAME: set either DATA_SOURCE_NAME or DATA_SOURCE_NAME_FILE, not both"])
    if not inline and not file:
        raise ConfigError(["config: no servers: pass --config.file or set DATA_SOURCE_NAME (or DATA_SOURCE_NAME_FILE)"])
    server = {"name": "default", **({"dsn_env": "DATA_SOURCE_NAME"} if inline else {"dsn_file": file})}
    return parse({"servers": [server]}, env=env, origin="DATA_SOURCE_NAME_FILE" if file else "DATA_SOURCE_NAME")


def parse(data: Any, *, env: Mapping[str, str], origin: str = "") -> Config:
    """Validate parsed YAML; raises ``ConfigError`` with one ``field: problem`` line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {kind(data)}"])
    problems: list[str] = []
    hidden: set[str] = set()
    data = _interpolate(data, "", env, problems, hidden)
    top = SCHEMA.check(data, "", problems)
    const_labels = _labels(top["const_labels"], problems) if "const_labels" in top else {}
    workers_dir = top.get("workers_dir", "")
    if not workers_dir and not data.get("pgbouncers"):
        if data.get("servers") is None:
            problems.append("servers: required: a list of servers to watch (or pgbouncers, or workers_dir)")
        elif data["servers"] == []:
            problems.append("servers: at least one server is required (or pgbouncers, or workers_dir)")
    names: set[str] = set()
    found = {key: _sources(key, data.get(key), top.get(key, []), top.get("defaults", {}), names, env, problems,
                           hidden) for key in ("servers", "pgbouncers")}
    if problems:
        raise ConfigError(problems, hidden)
    return Config(servers=tuple(ServerConfig(**s) for s in found["servers"]), const_labels=const_labels,
                  origin=origin, pgbouncers=tuple(PgBouncerConfig(**s) for s in found["pgbouncers"]),
                  workers_dir=workers_dir)


def _interpolate(value: Any, path: str, env: Mapping[str, str], problems: list[str], hidden: set[str]) -> Any:
    """``${VAR}``, ``${VAR:-default}`` and ``$$`` in string values (after YAML parsing, so a value with
    YAML syntax in it cannot change the file's structure, and comments are never interpolated)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, join(path, k), env, problems, hidden) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems, hidden) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            # It may be a password: never quoted back in an error. Durations and numbers (a port, an
            # interval) are not, and hiding them would garble every line that mentions them.
            if parse_duration(env[name]) is None:
                hidden.add(env[name])
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _ENV_REF.sub(sub, value)


def _labels(raw: Any, problems: list[str]) -> dict[str, str]:
    if not isinstance(raw, dict):
        problems.append(f"const_labels: expected a mapping, got {kind(raw)}")
        return {}
    out: dict[str, str] = {}
    for key, value in raw.items():
        where = join("const_labels", key)
        if not isinstance(key, str) or not _LABEL_NAME.match(key) or key.startswith("__"):
            problems.append(f"{where}: not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)")
        elif key in RESERVED_LABELS:
            problems.append(f"{where}: the exporter sets this label itself")
        elif isinstance(value, (dict, list)) or value is None:
            problems.append(f"{where}: expected a string, got {kind(value)}")
        else:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def _sources(key: str, raw: Any, entries: list[Any], defaults: dict[str, Any], names: set[str], env: Mapping[str, str],
             problems: list[str], hidden: set[str]) -> list[dict[str, Any]]:
    """The valid entries of ``servers:`` or ``pgbouncers:``; names are unique across both (they name sources),
    and addresses within each (a second entry for one address would serve every series twice)."""
    duplicate, noun = _WORDING[key]
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(entries):
        path = f"{key}[{i}]"
        if entry is INVALID:
            continue
        given = [k for k in DSN_KEYS if raw[i].get(k) is not None]
        name = entry.get("name")
        if name in names:
            problems.append(f"{path}.name: duplicate {duplicate.format(name)}")
            name = None
        elif name is not None:
            names.add(name)
        target = _dsn(given, entry, path, env, problems, hidden, pgbouncer=key == "pgbouncers")
        if target is None:
            continue
        dsn_key, dsn, address = target
        if address in seen:
            problems.append(f"{path}.{dsn_key}: same {noun} ({address}) as {seen[address]}; its series would be "
                            f"served twice")
            continue
        seen[address] = path
        if name is not None:
            settings = {k: entry.get(k, defaults.get(k, v)) for k, v in SERVER_DEFAULTS.items()}
            out.append({"name": name, "dsn": dsn, **settings})
    return out


def _dsn(given: list[str], entry: dict[str, Any], path: str, env: Mapping[str, str], problems: list[str],
         hidden: set[str], *, pgbouncer: bool) -> tuple[str, str, str] | None:
    """(key, DSN, ``host:port``) of an entry, the DSN read from wherever ``dsn``/``dsn_env``/``dsn_file`` says."""
    if len(given) != 1:
        problems.append(f"{path}: set exactly one of dsn, dsn_env, dsn_file (got {', '.join(given) or 'none'})")
        return None
    key = given[0]
    where, value = f"{path}.{key}", entry.get(key)
    if value is None:
        return None  # invalid, and already said so
    if key == "dsn_env":
        dsn = env.get(value)
        if not dsn:
            problems.append(f"{where}: environment variable {value} is not set")
            return None
    elif key == "dsn_file":
        try:
            dsn = read_capped(value, MAX_DSN_BYTES).decode("utf-8").strip()
        except TooLarge as e:
            problems.append(f"{where}: cannot read {value}: {e}")
            return None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            problems.append(f"{where}: cannot read {value}: {reason}")
            return None
        if not dsn:
            problems.append(f"{where}: {value} is empty")
            return None
    else:
        dsn = value
    hidden.add(dsn)
    try:
        params = parse_dsn(dsn)
        hidden.add(params.get("password") or "")
        if pgbouncer:
            from .sources.pgbouncer import connect_params

            connect_params(dsn)  # the admin console's own rules
    except ValueError as e:
        problems.append(f"{where}: {e}")
        return None
    return key, dsn, server_label(params.get("host") or params.get("hostaddr"), params.get("port")) or ""
