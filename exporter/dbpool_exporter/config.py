"""The daemon's YAML config: parsing, ``${ENV}`` interpolation and validation that names each bad field."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

from .limits import MAX_CONFIG_BYTES, MAX_DSN_BYTES, TooLarge, read_capped
from .redact import scrub, server_label
from .sources.postgres import connect_params

# Keys a server (or `defaults`) may set, with their defaults. Durations are seconds.
SERVER_DEFAULTS: dict[str, Any] = {
    "interval": 10.0,  # a server query is cheap but not free; scrapes are usually 15-30 s apart
    "statement_timeout": 5.0,
    "connect_timeout": 5.0,
    "max_label_values": 50,
    "backoff_max": 30.0,
}
DSN_KEYS = ("dsn", "dsn_env", "dsn_file")
TOP_KEYS = ("servers", "pgbouncers", "defaults", "const_labels", "workers_dir")
# Labels the exporter itself sets; a const label with one of these names would clash.
RESERVED_LABELS = frozenset({"source", "kind", "server", "database", "user", "application_name", "state", "label",
                             "pool", "pool_class", "version", "le", "quantile", "worker",
                             "pgbouncer", "server_database", "pool_mode", "list"})
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_ENV_REF = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
MAX_DURATION = 86400.0  # a day: longer is a typo, and larger values overflow the scheduler
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(Exception):
    """Every problem found, each a line of the form ``field: what is wrong``."""

    def __init__(self, problems: list[str], secrets: Iterable[str] = ()) -> None:
        # One problem, one line, whatever the file contained (a key may hold a newline), and
        # never a password: neither one that looks like one nor a value known to be secret.
        hidden = sorted((x for x in secrets if x), key=len, reverse=True)
        cleaned = []
        for problem in problems:
            for secret in hidden:
                problem = problem.replace(secret, "***")
            cleaned.append(_one_line(scrub(problem)))
        super().__init__("\n".join(cleaned))
        self.problems = cleaned


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _key_text(key: object) -> str:
    """A key as it should appear in a field path: plain when it is a plain word, else quoted."""
    return key if isinstance(key, str) and key and key.isprintable() and key.strip() == key else repr(key)


@dataclass(frozen=True)
class ServerConfig:
    name: str
    dsn: str = field(repr=False)  # never printed: it may hold a password
    interval: float = SERVER_DEFAULTS["interval"]
    statement_timeout: float = SERVER_DEFAULTS["statement_timeout"]
    connect_timeout: float = SERVER_DEFAULTS["connect_timeout"]
    max_label_values: int = SERVER_DEFAULTS["max_label_values"]
    backoff_max: float = SERVER_DEFAULTS["backoff_max"]

    def source(self) -> Any:
        from .sources.postgres import PostgresSource

        return PostgresSource(self.name, self.dsn, interval=self.interval, statement_timeout=self.statement_timeout,
                              connect_timeout=self.connect_timeout, max_label_values=self.max_label_values,
                              backoff_max=self.backoff_max)


@dataclass(frozen=True)
class PgBouncerConfig(ServerConfig):
    """A PgBouncer admin console (``pgbouncers:``): the same keys as a server."""

    def source(self) -> Any:
        from .sources.pgbouncer import PgBouncerSource

        return PgBouncerSource(self.name, self.dsn, interval=self.interval, statement_timeout=self.statement_timeout,
                               connect_timeout=self.connect_timeout, max_label_values=self.max_label_values,
                               backoff_max=self.backoff_max)


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


# --- reading --------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one), non-scalar keys
    and aliases (a config has ``defaults:`` for sharing; aliases only open the door to
    billion-laughs expansion and self-referencing structures)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported", event.start_mark)
        return super().compose_node(parent, index)


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value, not a list or mapping",
                                                    key_node.start_mark)
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _yaml_problem(path: str, e: yaml.YAMLError) -> str:
    # Never str(e): PyYAML quotes the offending line, which may be a DSN with a password; the
    # problem text itself may quote a tag or key, so it is scrubbed by ConfigError too.
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(e, "problem", None) or "not valid YAML"
    if "tag" in problem:
        problem = "unknown or unsupported tag (!...)"
    return f"{where}: invalid YAML: {problem}"


def load_file(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ``ConfigError`` listing every problem."""
    try:
        text = read_capped(path, MAX_CONFIG_BYTES).decode("utf-8")
    except TooLarge as e:
        raise ConfigError([f"{path}: cannot read config file: {e}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError([f"{path}: cannot read config file: {reason}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        return parse(data, env=os.environ if env is None else env, origin=path)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(path, e)]) from None
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
    server: dict[str, Any] = {"name": "default"}
    if inline:
        server["dsn_env"] = "DATA_SOURCE_NAME"
    else:
        server["dsn_file"] = file
    return parse({"servers": [server]}, env=env, origin="DATA_SOURCE_NAME_FILE" if file else "DATA_SOURCE_NAME")


# --- validating ----------------------------------------------------------------------------------
def _interpolate(value: Any, path: str, env: Mapping[str, str], problems: list[str], secrets: set[str]) -> Any:
    """``${VAR}``, ``${VAR:-default}`` and ``$$`` in string values (after YAML parsing, so a value with
    YAML syntax in it cannot change the file's structure, and comments are never interpolated)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{_key_text(k)}" if path else _key_text(k), env, problems, secrets)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems, secrets) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            # It may be a password: never quoted back in an error. Numbers and durations (a port,
            # an interval) are not, and hiding them would garble every line that mentions them.
            if len(env[name]) >= 4 and not _DURATION.match(env[name]):
                secrets.add(env[name])
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _ENV_REF.sub(sub, value)


def _duration(value: Any, path: str, problems: list[str], *, positive: bool = True) -> float | None:
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        seconds = None
    if seconds is None:
        problems.append(f"{path}: expected a duration (seconds, or a string like '500ms', '10s', '1m'), "
                        f"got {type(value).__name__}")
        return None
    if positive and not seconds > 0:
        problems.append(f"{path}: must be greater than 0, got {value!r}")
        return None
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        problems.append(f"{path}: must be at most {MAX_DURATION:g} seconds (a day), got {value!r}")
        return None
    return seconds


def _count(value: Any, path: str, problems: list[str]) -> int | None:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{path}: expected a whole number, got {type(value).__name__}")
        return None
    if value < 1:
        problems.append(f"{path}: must be at least 1, got {value}")
        return None
    return value


def _settings(raw: dict[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SERVER_DEFAULTS:
        if key not in raw:
            continue
        value = raw[key]
        where = f"{path}.{key}"
        parsed = _count(value, where, problems) if key == "max_label_values" else _duration(value, where, problems)
        if parsed is not None:
            out[key] = parsed
    return out


def _unknown(raw: dict[str, Any], allowed: tuple[str, ...], path: str, problems: list[str]) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{path}.{_key_text(key)}" if path else _key_text(key)
            problems.append(f"{where}: unknown key (allowed: {', '.join(allowed)})")


def _dsn(raw: dict[str, Any], path: str, env: Mapping[str, str], problems: list[str],
         secrets: set[str]) -> tuple[str, str] | None:
    given = [k for k in DSN_KEYS if k in raw]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        problems.append(f"{path}: set exactly one of dsn, dsn_env, dsn_file (got {what})")
        return None
    key = given[0]
    where, value = f"{path}.{key}", raw[key]
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: expected a non-empty string")
        return None
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
    secrets.add(dsn)
    try:
        _, params = connect_params(dsn)
        secrets.add(params.get("password") or "")
    except ValueError as e:
        problems.append(f"{where}: {e}")
        return None
    return dsn, server_label(params.get("host") or params.get("hostaddr"), params.get("port")) or ""


def parse(data: Any, *, env: Mapping[str, str], origin: str = "") -> Config:
    """Validate parsed YAML; raises ``ConfigError`` with one ``field: problem`` line per problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {type(data).__name__}"])
    secrets: set[str] = set()
    data = _interpolate(data, "", env, problems, secrets)
    _unknown(data, TOP_KEYS, "", problems)

    defaults: dict[str, Any] = {}
    raw_defaults = data.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        problems.append(f"defaults: expected a mapping, got {type(raw_defaults).__name__}")
    else:
        _unknown(raw_defaults, tuple(SERVER_DEFAULTS), "defaults", problems)
        defaults = _settings(raw_defaults, "defaults", problems)

    const_labels: dict[str, str] = {}
    raw_labels = data.get("const_labels", {})
    if not isinstance(raw_labels, dict):
        problems.append(f"const_labels: expected a mapping, got {type(raw_labels).__name__}")
    else:
        for key, value in raw_labels.items():
            where = f"const_labels.{key}"
            if not isinstance(key, str) or not _LABEL_NAME.match(key) or key.startswith("__"):
                problems.append(f"{where}: not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)")
            elif key in RESERVED_LABELS:
                problems.append(f"{where}: the exporter sets this label itself")
            elif isinstance(value, (dict, list)) or value is None:
                problems.append(f"{where}: expected a string, got {type(value).__name__}")
            else:
                const_labels[key] = str(value).lower() if isinstance(value, bool) else str(value)

    workers_dir = data.get("workers_dir", "")
    if not isinstance(workers_dir, str) or ("workers_dir" in data and not workers_dir.strip()):
        problems.append("workers_dir: expected the path of a directory")
        workers_dir = ""

    servers: list[ServerConfig] = []
    raw_servers = data.get("servers")
    if raw_servers is None:
        if not workers_dir and not data.get("pgbouncers"):
            problems.append("servers: required: a list of servers to watch (or pgbouncers, or workers_dir)")
        raw_servers = []
    elif not isinstance(raw_servers, list):
        problems.append(f"servers: expected a list, got {type(raw_servers).__name__}")
        raw_servers = []
    elif not raw_servers and not workers_dir and not data.get("pgbouncers"):
        problems.append("servers: at least one server is required (or pgbouncers, or workers_dir)")
    names: set[str] = set()
    # pg_stat_activity is server-wide: two entries for one host:port would serve every server series twice.
    seen_servers: dict[str, str] = {}
    for i, raw in enumerate(raw_servers):
        path = f"servers[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{path}: expected a mapping, got {type(raw).__name__}")
            continue
        _unknown(raw, ("name", *DSN_KEYS, *SERVER_DEFAULTS), path, problems)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            problems.append(f"{path}.name: required: a non-empty string of at most 128 characters")
            name = None
        elif name in names:
            problems.append(f"{path}.name: duplicate server name {name!r}")
            name = None
        else:
            names.add(name)
        target = _dsn(raw, path, env, problems, secrets)
        settings = {**SERVER_DEFAULTS, **defaults, **_settings(raw, path, problems)}
        if target is not None:
            dsn, server = target
            if server in seen_servers:
                key = next(k for k in DSN_KEYS if k in raw)
                problems.append(f"{path}.{key}: same server ({server}) as {seen_servers[server]}; its series "
                                f"would be served twice")
                continue
            seen_servers[server] = path
            if name is not None:
                servers.append(ServerConfig(name=name, dsn=dsn, **settings))
    pgbouncers = _pgbouncers(data.get("pgbouncers", []), defaults, names, env, problems, secrets)
    if problems:
        raise ConfigError(problems, secrets)
    return Config(servers=tuple(servers), const_labels=const_labels, origin=origin, pgbouncers=pgbouncers,
                  workers_dir=workers_dir)


def _pgbouncers(raw_list: Any, defaults: dict[str, Any], names: set[str], env: Mapping[str, str],
                problems: list[str], secrets: set[str]) -> tuple[PgBouncerConfig, ...]:
    """``pgbouncers:``, entries shaped like servers; names are unique across both lists (they name sources)."""
    if not isinstance(raw_list, list):
        problems.append(f"pgbouncers: expected a list, got {type(raw_list).__name__}")
        return ()
    out: list[PgBouncerConfig] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(raw_list):
        path = f"pgbouncers[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{path}: expected a mapping, got {type(raw).__name__}")
            continue
        _unknown(raw, ("name", *DSN_KEYS, *SERVER_DEFAULTS), path, problems)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            problems.append(f"{path}.name: required: a non-empty string of at most 128 characters")
            name = None
        elif name in names:
            problems.append(f"{path}.name: duplicate source name {name!r} (servers and pgbouncers share names)")
            name = None
        else:
            names.add(name)
        target = _dsn(raw, path, env, problems, secrets)
        settings = {**SERVER_DEFAULTS, **defaults, **_settings(raw, path, problems)}
        if target is None:
            continue
        dsn, address = target
        key = next(k for k in DSN_KEYS if k in raw)
        # Here, not at the top: a config without PgBouncers never loads its source (1 MB resident).
        from .sources.pgbouncer import connect_params as pgbouncer_params

        try:
            pgbouncer_params(dsn)
        except ValueError as e:
            problems.append(f"{path}.{key}: {e}")
            continue
        if address in seen:
            problems.append(f"{path}.{key}: same PgBouncer ({address}) as {seen[address]}; its series would be "
                            f"served twice")
            continue
        seen[address] = path
        if name is not None:
            out.append(PgBouncerConfig(name=name, dsn=dsn, **settings))
    return tuple(out)
