"""libpq's connection-string grammar (URI and ``key=value``) in pure Python, as ``PQconninfoParse`` reads it.

The daemon needs the parameters of each server's DSN but not psycopg (11 MB of resident memory);
tests/test_conninfo.py holds this parser to libpq's own answers through psycopg.
"""

from __future__ import annotations

# PQconndefaults() keywords of libpq 18; a keyword outside this set is an error, as in libpq.
KEYWORDS = frozenset({
    "application_name", "channel_binding", "client_encoding", "connect_timeout", "dbname",
    "fallback_application_name", "gssdelegation", "gssencmode", "gsslib", "host", "hostaddr", "keepalives",
    "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname", "load_balance_hosts",
    "max_protocol_version", "min_protocol_version", "oauth_client_id", "oauth_client_secret", "oauth_issuer",
    "oauth_scope", "options", "passfile", "password", "port", "replication", "require_auth", "requirepeer",
    "scram_client_key", "scram_server_key", "service", "ssl_max_protocol_version", "ssl_min_protocol_version",
    "sslcert", "sslcertmode", "sslcompression", "sslcrl", "sslcrldir", "sslkey", "sslkeylogfile", "sslmode",
    "sslnegotiation", "sslpassword", "sslrootcert", "sslsni", "target_session_attrs", "tcp_user_timeout", "user",
})
_URI_PREFIXES = ("postgresql://", "postgres://")
_SPACE = " \t\n\r\f\v"


class ConninfoError(ValueError):
    """A malformed connection string; the message names the problem, never the string."""


def parse(dsn: str) -> dict[str, str]:
    """The parameters a connection string sets (no defaults, no environment), like psycopg's conninfo_to_dict."""
    for prefix in _URI_PREFIXES:
        if dsn.startswith(prefix):
            return _parse_uri(dsn[len(prefix):])
    return _parse_pairs(dsn)


def _store(params: dict[str, str], key: str, value: str) -> None:
    if key not in KEYWORDS:
        raise ConninfoError(f"invalid connection option {key!r}")
    params[key] = value


def _parse_pairs(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n:
            return params
        start = i
        while i < n and text[i] not in _SPACE and text[i] != "=":
            i += 1
        key = text[start:i]
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n or text[i] != "=":
            raise ConninfoError("missing '=' after a keyword")
        i += 1
        while i < n and text[i] in _SPACE:
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ConninfoError("unterminated quoted string")
                if text[i] == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    value.append(text[i])
                    i += 1
        else:
            while i < n and text[i] not in _SPACE:
                if text[i] == "\\":
                    i += 1  # escapes the next character; a trailing one escapes nothing and is dropped
                    if i >= n:
                        break
                value.append(text[i])
                i += 1
        _store(params, key, "".join(value))


def _decode(text: str) -> str:
    """Percent-decoding as libpq (17+) does it: a raw space, a bad escape or %00 is an error."""
    text = text.strip(" ")  # libpq trims spaces around each piece, then refuses one inside it
    if " " in text:
        raise ConninfoError("unexpected spaces in a URI, use percent-encoded spaces (%20) instead")
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode()
    while i < len(raw):
        if raw[i] == 0x25:  # %
            pair = raw[i + 1:i + 3]
            if len(pair) < 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
                raise ConninfoError("invalid percent-encoded token")
            if pair == b"00":
                raise ConninfoError("forbidden value %00 in percent-encoded value")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ConninfoError("percent-encoded bytes that are not UTF-8") from None


def _parse_uri(rest: str) -> dict[str, str]:
    params: dict[str, str] = {}
    # Credentials: up to the first '@' before any '/'.
    at = len(rest)
    for j, c in enumerate(rest):
        if c in "@/":
            at = j
            break
    if at < len(rest) and rest[at] == "@":
        user, colon, password = rest[:at].partition(":")
        if user:
            params["user"] = _decode(user)
        if colon and password:
            params["password"] = _decode(password)
        rest = rest[at + 1:]
    hosts: list[str] = []
    ports: list[str] = []
    i, n = 0, len(rest)
    while True:
        if i < n and rest[i] == "[":
            end = rest.find("]", i)
            if end < 0:
                raise ConninfoError("missing ']' in an IPv6 host address")
            if end == i + 1:
                raise ConninfoError("empty IPv6 host address")
            host = rest[i + 1:end]
            i = end + 1
            if i < n and rest[i] not in ":/?,":
                raise ConninfoError("unexpected character after an IPv6 host address")
        else:
            start = i
            while i < n and rest[i] not in ":/?,":
                i += 1
            host = rest[start:i]
        port = ""
        if i < n and rest[i] == ":":
            start = i + 1
            i = start
            while i < n and rest[i] not in "/?,":
                i += 1
            port = rest[start:i]
        hosts.append(host)
        ports.append(port)
        if i < n and rest[i] == ",":
            i += 1
            continue
        break
    host_text, port_text = ",".join(hosts), ",".join(ports)
    if host_text:
        params["host"] = _decode(host_text)
    if port_text:
        params["port"] = _decode(port_text)
    rest = rest[i:]
    if rest.startswith("/"):
        dbname, _, query = rest[1:].partition("?")
        if dbname:
            params["dbname"] = _decode(dbname)
        rest = "?" + query if _ else ""
    if rest.startswith("?"):
        parts = rest[1:].split("&")
        for index, part in enumerate(parts):
            if not part and index == len(parts) - 1:
                break  # a trailing '&' (or a bare '?') ends the list; an empty parameter before it does not
            key, eq, value = part.partition("=")
            if not eq:
                raise ConninfoError("missing key/value separator '=' in a URI query parameter")
            if "=" in value:
                raise ConninfoError("extra key/value separator '=' in a URI query parameter")
            key, value = _decode(key), _decode(value)
            if key == "ssl" and value == "true":  # JDBC's spelling
                key, value = "sslmode", "require"
            if key not in KEYWORDS:
                raise ConninfoError(f"invalid URI query parameter {key!r}")
            params[key] = value
    return params
