"""The one redaction (exact secrets, then anything password-like) and password-free facts about a DSN."""

from __future__ import annotations

import re
from typing import Any, Iterable

_PASSWORD_PATTERNS = (
    re.compile(r"(://[^:/@\s]*:)\S*@"),  # scheme://user:secret@host, up to the last @ (a raw @ in it too)
    re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I),  # key=value conninfo
    re.compile(r"(password=)[^&\s]*", re.I),  # ?password= in a URL query
)


def scrub(text: str) -> str:
    """Remove anything that looks like a password from free text (errors, log lines)."""
    for pattern in _PASSWORD_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "***" + ("@" if m.group(0).endswith("@") else ""), text)
    return text


def secrets(*values: str | None) -> tuple[str, ...]:
    """Exact strings to blank out, longest first (so a DSN goes before the password inside it).

    Very short ones are left to ``scrub``: replacing them would garble every message and hide nothing.
    """
    return tuple(sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True))


def redact(text: str, hidden: Iterable[str] = ()) -> str:
    """``text`` with each of ``hidden`` (from ``secrets()``) blanked, whatever its quoting, then scrubbed."""
    for secret in hidden:
        text = text.replace(secret, "***")
    return scrub(text)


def parse_dsn(dsn: str) -> dict[str, str]:
    """libpq's parameters of a URI or ``key=value`` conninfo; ``ValueError`` that never quotes the DSN.

    libpq's grammar in pure Python (conninfo.py), so the daemon validates DSNs without loading psycopg.
    """
    from .conninfo import parse

    try:
        return parse(dsn)
    except ValueError:
        raise ValueError("not a valid PostgreSQL connection string (URI or key=value conninfo)") from None


def server_label(host: Any, port: Any) -> str | None:
    """``host:port`` with libpq's defaults; a socket directory stays a path."""
    if isinstance(host, (list, tuple)):
        host = host[0] if host else None
    host = str(host).split(",")[0] if host else "localhost"
    port = str(port).split(",")[0] if port else "5432"
    return f"{host}:{port}"


def from_sqlalchemy_url(url: Any) -> tuple[str | None, str | None]:
    """Server and database of a SQLAlchemy ``URL`` (never reads the password)."""
    host = url.host or url.query.get("host")
    port = url.port or url.query.get("port")
    return server_label(host, port), url.database


def from_conninfo(conninfo: str, kwargs: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
    """Server and database of a libpq conninfo string or URI plus connection kwargs."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo, **(kwargs or {}))
    except Exception:  # an unparsable conninfo leaves the labels out, it never breaks a poll
        return None, None
    dbname = params.get("dbname")
    return server_label(params.get("host") or params.get("hostaddr"), params.get("port")), \
        None if dbname is None else str(dbname)
