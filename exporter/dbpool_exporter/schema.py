"""Declared shapes of the YAML config files: each field checks and converts its value, each problem is one
``field.path: what is wrong`` line, and no value is quoted back unless it is a name from a fixed list."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .redact import redact, secrets

INVALID: Any = object()  # a field's answer when it has recorded a problem
MAX_DURATION = 86400.0  # a day: longer is a typo, and larger values overflow the scheduler
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:ns|us|µs|μs|ms|s|m|h)"
_DURATION = re.compile(rf"\s*([-+]?)\s*((?:{_NUMBER}\s*{_UNIT}\s*)+|{_NUMBER})\s*")
_PART = re.compile(rf"({_NUMBER})\s*({_UNIT})")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """Every problem found, each a line of the form ``field: what is wrong``."""

    def __init__(self, problems: list[str], hidden: Iterable[str] = ()) -> None:
        # One problem, one line, whatever the file held (a key may contain a newline), and never a
        # password: neither one that looks like one nor a value known to be secret.
        known = secrets(*hidden)
        self.problems = [one_line(redact(p, known)) for p in problems]
        super().__init__("\n".join(self.problems))


def one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def key_text(key: object) -> str:
    """A key as it should appear in a field path: plain when it is a plain word, else quoted."""
    return key if isinstance(key, str) and key and key.isprintable() and key.strip() == key else repr(key)


def join(path: str, key: object) -> str:
    return f"{path}.{key_text(key)}" if path else key_text(key)


def kind(value: object) -> str:
    return type(value).__name__


def parse_duration(text: str, plain: float = 1.0) -> float | None:
    """Seconds in Go's duration syntax ("1m30s", "250ms", "1.5h"; spaces allowed), or in a bare number of
    ``plain`` seconds each; None when ``text`` is neither."""
    m = _DURATION.fullmatch(text)
    if m is None:
        return None
    parts = _PART.findall(m.group(2))
    seconds = sum(float(n) * _UNITS[u] for n, u in parts) if parts else float(m.group(2)) * plain
    return -seconds if m.group(1) == "-" else seconds


class Field:
    """Checks one value at ``path``: the converted value, or ``INVALID`` after appending to ``problems``."""

    what = "a value"
    required = False

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        raise NotImplementedError

    def bad(self, problems: list[str], path: str, problem: str) -> Any:
        problems.append(f"{path}: {problem}")
        return INVALID


@dataclass(frozen=True)
class Str(Field):
    what: str = "a non-empty string"
    required: bool = False
    max_len: int | None = None
    pattern: str | None = None  # the whole string must match; the value is never quoted back

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        if (not isinstance(value, str) or not value.strip() or (self.max_len and len(value) > self.max_len)
                or (self.pattern and not re.fullmatch(self.pattern, value))):
            return self.bad(problems, path, f"expected {self.what}, got {kind(value)}")
        return value


@dataclass(frozen=True)
class Bool(Field):
    what: str = "true or false"

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, bool):
            return self.bad(problems, path, f"expected {self.what}, got {kind(value)}")
        return value


@dataclass(frozen=True)
class Count(Field):
    minimum: int = 1
    what: str = "a whole number"

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return self.bad(problems, path, f"expected {self.what}, got {kind(value)}")
        if value < self.minimum:
            return self.bad(problems, path, f"must be at least {self.minimum}, got {value}")
        return value


@dataclass(frozen=True)
class Duration(Field):
    """Seconds from a number (of ``plain`` seconds each) or a duration string."""

    what: str = "a duration (seconds, or a string like '500ms', '10s', '1m')"
    plain: float = 1.0
    positive: bool = True

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        seconds = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = value * self.plain
        elif isinstance(value, str):
            seconds = parse_duration(value, self.plain)
        if seconds is None:
            return self.bad(problems, path, f"expected {self.what}, got {kind(value)}")
        if self.positive and not seconds > 0:
            return self.bad(problems, path, f"must be greater than 0, got {value!r}")
        if seconds < 0:
            return self.bad(problems, path, f"must not be negative, got {value!r}")
        if not math.isfinite(seconds) or seconds > MAX_DURATION:
            return self.bad(problems, path, f"must be at most {MAX_DURATION:g} seconds (a day), got {value!r}")
        return float(seconds)


@dataclass(frozen=True)
class Choice(Field):
    """One name from a fixed list; ``refused`` names are known but cannot be honoured, each with its reason."""

    options: tuple[str, ...] = ()
    what: str = "value"
    refused: Mapping[str, str] = field(default_factory=dict)
    hint: str = ""

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        if isinstance(value, str) and value in self.refused:
            return self.bad(problems, path, self.refused[value])
        if isinstance(value, str) and value in self.options:
            return value
        shown = repr(value) if isinstance(value, str) and len(value) <= 64 else kind(value)
        return self.bad(problems, path, f"unknown {self.what} {shown}; "
                                        f"{self.hint or 'expected one of ' + ', '.join(self.options)}")


class Raw(Field):
    """Any value, checked by hand afterwards."""

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        return value


@dataclass(frozen=True)
class ListOf(Field):
    """A list; an invalid item stays in it as ``INVALID``, so one bad entry hides nothing about the others."""

    item: Field = field(default_factory=Raw)
    what: str = "a list"

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, list):
            return self.bad(problems, path, f"expected a list, got {kind(value)}")
        return [self.item.check(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]


@dataclass(frozen=True)
class Section(Field):
    """A mapping of known keys; an absent or null key is left out of the result, as is an invalid one."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    what: str = "a mapping"
    unset: tuple[Any, ...] = (None,)  # the exporter-toolkit's files: "" means not set too

    def check(self, value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, dict):
            return self.bad(problems, path or "config", f"expected a mapping, got {kind(value)}")
        for key in value:
            if key not in self.fields:
                problems.append(f"{join(path, key)}: unknown key (allowed: {', '.join(self.fields)})")
        out = {}
        for key, spec in self.fields.items():
            if value.get(key) in self.unset:
                if spec.required:
                    problems.append(f"{join(path, key)}: required: {spec.what}")
                continue
            checked = spec.check(value[key], join(path, key), problems)
            if checked is not INVALID and checked is not None:
                out[key] = checked
        return out
