"""The exporter-toolkit web config file (``--web.config.file``): TLS, basic auth, headers, rate limit."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import bcrypt
import yaml

from .limits import MAX_WEB_CONFIG_BYTES, TooLarge, read_capped

__all__ = ["WebConfig", "WebConfigError", "TLSSettings", "load_web_config"]


class WebConfigError(ValueError):
    """A web config that cannot be used; ``str()`` is one line that starts with the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


# Go's tls.CipherSuites() names (the ones the toolkit accepts) -> OpenSSL names.
_TLS12_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# Go accepts these names but, like OpenSSL, never lets them be configured: listing them changes nothing.
_TLS13_CIPHERS = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
# 3DES suites: older Go lists them, this OpenSSL build has none.
_UNAVAILABLE_CIPHERS = {"TLS_RSA_WITH_3DES_EDE_CBC_SHA", "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA"}

_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_LEGACY_VERSIONS = {"TLS10", "TLS11"}

# value -> ssl verify mode; None = a Go mode Python's ssl cannot reproduce.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    # Go asks for a certificate but neither requires nor verifies it, and nothing downstream uses an
    # unverified certificate: not asking admits exactly the same clients.
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": None,
    "RequireClientCert": None,  # the toolkit's old spelling of RequireAnyClientCert
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

# The toolkit allows exactly these response headers, some with fixed values (web/handler.go).
_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_BCRYPT_MAX_PASSWORD = 72  # bcrypt ignores bytes past 72; the library refuses them, and so do we
_CACHE_SIZE = 100

_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
_TLS_KEYS = {
    "cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file", "client_auth_type",
    "client_allowed_sans", "min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites",
    "curve_preferences",
}
_HTTP_KEYS = {"http2", "headers"}
_RATE_KEYS = {"interval", "burst"}


@dataclass(frozen=True)
class TLSSettings:
    """``tls_server_config`` after validation; file paths are absolute, PEM text kept out of ``repr``."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()


class WebConfig:
    """A loaded web config: ``ssl_context()`` for the listener, ``check()`` per request, ``headers`` to add."""

    def __init__(
        self,
        *,
        path: str | None = None,
        tls: TLSSettings | None = None,
        http2: bool = True,
        headers: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        rate_limit: tuple[float, int] | None = None,
    ) -> None:
        self.path = path
        self.tls = tls
        # Accepted for compatibility; the server speaks HTTP/1.1, which clients fall back to.
        self.http2 = http2
        self.headers: dict[str, str] = dict(headers or {})
        # (seconds between requests, burst), the toolkit's global token bucket; None = unlimited.
        self.rate_limit = rate_limit
        self._users = {name: _check_hash(name, h).encode("ascii") for name, h in (users or {}).items()}
        self._dummy_hash = b""
        if self._users:
            # An unknown user is checked against a hash of the same cost, so timing does not tell
            # which user names exist.
            cost = max(int(h[4:6]) for h in self._users.values())
            self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_lock = threading.Lock()
        # bcrypt is CPU-bound by design: one at a time, as the toolkit does, so bad passwords
        # sent in parallel cost one core, not all of them.
        self._bcrypt_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"WebConfig(path={self.path!r}, tls={self.tls!r}, users={sorted(self._users)!r}, "
                f"headers={sorted(self.headers)!r}, rate_limit={self.rate_limit!r})")

    @property
    def users(self) -> list[str]:
        """The user names that may log in (never their hashes)."""
        return sorted(self._users)

    @property
    def auth_required(self) -> bool:
        return bool(self._users)

    @property
    def tls_enabled(self) -> bool:
        return self.tls is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A fresh server context (certificate files re-read), or None when TLS is off."""
        return _build_ssl_context(self.tls) if self.tls is not None else None

    def refused_without_bcrypt(self, authorization_header: str | None) -> bool:
        """Whether auth is on and this header fails before any bcrypt (absent, not Basic, malformed)."""
        return bool(self._users) and _parse_basic(authorization_header) is None

    def check(self, authorization_header: str | None) -> bool:
        """Whether a request carrying this ``Authorization`` header may proceed."""
        if not self._users:
            return True
        creds = _parse_basic(authorization_header)
        if creds is None:
            return False
        user_bytes, password = creds
        if len(password) > _BCRYPT_MAX_PASSWORD:
            return False
        try:
            user = user_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return False
        hashed = self._users.get(user)
        # Only verified (user, password) pairs are cached, keyed by a keyed hash of both: a hit
        # means this exact pair passed bcrypt against this user's hash in this config before.
        key = hmac.new(self._cache_key, len(user_bytes).to_bytes(4, "big") + user_bytes + password,
                       hashlib.sha256).digest()
        if hashed is not None:
            with self._cache_lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return True
        with self._bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password, hashed if hashed is not None else self._dummy_hash)
            except ValueError:
                ok = False
        if not ok or hashed is None:
            return False
        with self._cache_lock:
            self._cache[key] = None
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return True

    def peer_allowed(self, peer_cert: dict[str, Any] | None) -> bool:
        """``client_allowed_sans``: whether a verified client certificate (``getpeercert()``) may connect."""
        if self.tls is None or self.tls.client_allowed_sans is None:
            return True
        if not peer_cert:
            return False
        allowed = {_normalise_san(s) for s in self.tls.client_allowed_sans}
        return any(_normalise_san(value) in allowed for _kind, value in peer_cert.get("subjectAltName", ()))


def load_web_config(path: str) -> WebConfig:
    """Read and validate an exporter-toolkit web config file; raises ``WebConfigError`` (one line)."""
    try:
        text = read_capped(path, MAX_WEB_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise WebConfigError(path, "no such file") from None
    except TooLarge as exc:
        raise WebConfigError(path, str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WebConfigError(path, f"cannot read: {_reason(exc)}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except WebConfigError:
        raise
    except yaml.MarkedYAMLError as exc:
        # Only problem and position: the default message quotes the source line, which may hold a key.
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise WebConfigError(path, f"not valid YAML: {exc.problem or exc.context}{where}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(path, f"not valid YAML: {type(exc).__name__}") from None
    if data is None:
        data = {}  # an empty file is valid for the toolkit: plain HTTP, no auth
    if not isinstance(data, dict):
        raise WebConfigError(path, f"must be a mapping of settings, got {_kind(data)}")
    return _from_mapping(data, path)


def _from_mapping(data: dict[Any, Any], path: str) -> WebConfig:
    _known(data, _TOP_KEYS, "")
    base = os.path.dirname(os.path.abspath(path))
    tls = _parse_tls(_section(data, "tls_server_config"), base)
    http = _section(data, "http_server_config")
    _known(http, _HTTP_KEYS, "http_server_config")
    http2 = _bool(http, "http2", "http_server_config", default=True)
    headers = _parse_headers(http.get("headers"))
    users = _parse_users(data.get("basic_auth_users"))
    rate = _parse_rate_limit(_section(data, "rate_limit"))
    config = WebConfig(path=path, tls=tls, http2=http2, headers=headers, users=users, rate_limit=rate)
    config.ssl_context()  # load certificates now, so a bad file fails at start, not at the first scrape
    return config


def _parse_tls(section: dict[Any, Any], base: str) -> TLSSettings | None:
    p = "tls_server_config"
    _known(section, _TLS_KEYS, p)
    cert_file = _path(section, "cert_file", base)
    key_file = _path(section, "key_file", base)
    ca_file = _path(section, "client_ca_file", base)
    cert = _str(section, "cert", p)
    key = _str(section, "key", p)
    ca = _str(section, "client_ca", p)
    auth = _str(section, "client_auth_type", p)
    # The toolkit turns TLS on when any of these is set (TLSConfig.IsEnabled).
    if not any((cert_file, key_file, ca_file, cert, key, ca, auth)):
        leftover = sorted(str(k) for k, v in section.items() if v not in (None, "", []))
        if leftover:
            raise WebConfigError(f"{p}.{leftover[0]}", "has no effect without cert_file/cert and key_file/key")
        return None
    for inline, file in (("cert", cert_file), ("key", key_file), ("client_ca", ca_file)):
        if section.get(inline) and file:
            raise WebConfigError(f"{p}.{inline}", f"set either {inline} or {inline}_file, not both")
    if not (cert or cert_file):
        raise WebConfigError(f"{p}.cert_file", "missing: TLS needs cert_file (or cert)")
    if not (key or key_file):
        raise WebConfigError(f"{p}.key_file", "missing: TLS needs key_file (or key)")
    auth = auth or "NoClientCert"
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{p}.client_auth_type",
                             f"unknown value {auth!r}; expected one of {', '.join(_CLIENT_AUTH)}")
    if _CLIENT_AUTH[auth] is None:
        raise WebConfigError(f"{p}.client_auth_type", f"{auth} (a client certificate that is not verified) "
                             "cannot be honoured with Python's ssl; use RequireAndVerifyClientCert with client_ca_file")
    if (ca or ca_file) and auth == "NoClientCert":
        raise WebConfigError(f"{p}.client_auth_type", "client CAs are set but client_auth_type is NoClientCert")
    sans = _str_list(section, "client_allowed_sans", p) if section.get("client_allowed_sans") is not None else None
    if sans is not None and auth != "RequireAndVerifyClientCert":
        raise WebConfigError(f"{p}.client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert")
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = _str(section, name, p) or default
        if value in _LEGACY_VERSIONS:
            raise WebConfigError(f"{p}.{name}",
                                 f"{value} is refused by OpenSSL's security level here; use TLS12 or TLS13")
        if value not in _VERSIONS:
            raise WebConfigError(f"{p}.{name}", f"unknown TLS version {value!r}; expected TLS12 or TLS13")
        versions[name] = value
    if _VERSIONS[versions["min_version"]] > _VERSIONS[versions["max_version"]]:
        raise WebConfigError(f"{p}.min_version", f"{versions['min_version']} is above max_version "
                             f"{versions['max_version']}")
    ciphers = tuple(_str_list(section, "cipher_suites", p))
    for name in ciphers:
        if name in _UNAVAILABLE_CIPHERS:
            raise WebConfigError(f"{p}.cipher_suites", f"{name} (3DES) is not available in this OpenSSL")
        if name not in _TLS12_CIPHERS and name not in _TLS13_CIPHERS:
            raise WebConfigError(f"{p}.cipher_suites", f"unknown cipher suite {name!r} (use Go's names, "
                                 "e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
    if ciphers and not any(c in _TLS12_CIPHERS for c in ciphers) and versions["min_version"] == "TLS12":
        raise WebConfigError(f"{p}.cipher_suites", "lists only TLS 1.3 suites, which cannot be configured; "
                             "list TLS 1.2 suites or set min_version: TLS13")
    curves = tuple(_str_list(section, "curve_preferences", p))
    for name in curves:
        if name not in _CURVES:
            raise WebConfigError(f"{p}.curve_preferences",
                                 f"unknown curve {name!r}; expected one of {', '.join(_CURVES)}")
    if len(curves) > 1:
        raise WebConfigError(f"{p}.curve_preferences", f"Python's ssl can restrict the handshake to one curve "
                             f"only; got {', '.join(curves)}")
    return TLSSettings(
        cert_file=cert_file, key_file=key_file, client_ca_file=ca_file, cert=cert, key=key, client_ca=ca,
        client_auth_type=auth, client_allowed_sans=tuple(sans) if sans is not None else None,
        min_version=versions["min_version"], max_version=versions["max_version"], cipher_suites=ciphers,
        prefer_server_cipher_suites=_bool(section, "prefer_server_cipher_suites", p, default=True),
        curve_preferences=curves,
    )


def _build_ssl_context(t: TLSSettings) -> ssl.SSLContext:
    p = "tls_server_config"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[t.min_version]
    ctx.maximum_version = _VERSIONS[t.max_version]
    twelve = [_TLS12_CIPHERS[c] for c in t.cipher_suites if c in _TLS12_CIPHERS]
    if twelve:
        try:
            ctx.set_ciphers(":".join(twelve))
        except ssl.SSLError:
            raise WebConfigError(f"{p}.cipher_suites",
                                 "none of the listed suites is available in this OpenSSL") from None
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if t.curve_preferences:
        ctx.set_ecdh_curve(_CURVES[t.curve_preferences[0]])
    cert_key = f"{p}.cert_file" if t.cert_file else f"{p}.cert"
    key_key = f"{p}.key_file" if t.key_file else f"{p}.key"
    cert_pem = _read_pem(t.cert_file, cert_key) if t.cert_file else (t.cert or "")
    key_pem = _read_pem(t.key_file, key_key) if t.key_file else (t.key or "")
    if "-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise WebConfigError(cert_key, "no PEM certificate found")
    if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_pem):
        raise WebConfigError(key_key, "no PEM private key found")
    if "ENCRYPTED" in key_pem:
        raise WebConfigError(key_key, "the private key is encrypted; the toolkit format takes an unencrypted key")
    with _pem_path(cert_pem) as cert_path, _pem_path(key_pem) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_password)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise WebConfigError(key_key, "the private key does not match the certificate") from None
            raise WebConfigError(cert_key, f"cannot load the certificate and key: {_reason(exc)}") from None
        except _EncryptedKey:
            raise WebConfigError(key_key, "the private key is encrypted; the toolkit format takes an "
                                 "unencrypted key") from None
    mode = _CLIENT_AUTH[t.client_auth_type]
    assert mode is not None  # refused at parse time
    if mode != ssl.CERT_NONE:
        ca_key = f"{p}.client_ca_file" if t.client_ca_file else f"{p}.client_ca"
        try:
            if t.client_ca_file:
                ctx.load_verify_locations(cadata=_read_pem(t.client_ca_file, ca_key))
            elif t.client_ca:
                ctx.load_verify_locations(cadata=t.client_ca)
            else:
                # Go verifies against the system roots when no client CA is given.
                ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (ssl.SSLError, ValueError) as exc:
            raise WebConfigError(ca_key, f"no usable PEM CA certificate: {_reason(exc)}") from None
        ctx.verify_mode = mode
    return ctx


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang a daemon.
    raise _EncryptedKey


@contextlib.contextmanager
def _pem_path(pem: str) -> Iterator[str]:
    """A path OpenSSL can read ``pem`` from (load_cert_chain takes paths only); memory-backed when possible."""
    data = pem.encode("utf-8")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("dbpool-exporter-pem", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, name = tempfile.mkstemp(suffix=".pem")  # mode 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield name
    finally:
        os.unlink(name)


def _read_pem(path: str, key: str) -> str:
    try:
        return read_capped(path, MAX_WEB_CONFIG_BYTES).decode("ascii", errors="replace")
    except FileNotFoundError:
        raise WebConfigError(key, f"no such file: {path}") from None
    except TooLarge as exc:
        raise WebConfigError(key, f"{path}: {exc}") from None
    except OSError as exc:
        raise WebConfigError(key, f"cannot read {path}: {_reason(exc)}") from None


def _parse_headers(value: Any) -> dict[str, str]:
    p = "http_server_config.headers"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(p, f"must be a mapping of header: value, got {_kind(value)}")
    headers = {}
    for name, v in value.items():
        if name not in _HEADERS:
            raise WebConfigError(p, f"header {name!r} can not be configured; allowed: {', '.join(_HEADERS)}")
        if v is None or v == "":
            continue  # "unset if blank"
        if not isinstance(v, str) or "\r" in v or "\n" in v or not v.isascii():
            raise WebConfigError(f"{p}.{name}", "must be a single-line ASCII string")
        if _HEADERS[name] and v not in _HEADERS[name]:
            raise WebConfigError(f"{p}.{name}", f"invalid value {v!r}; expected one of {', '.join(_HEADERS[name])}")
        headers[name] = v
    return headers


def _parse_users(value: Any) -> dict[str, str]:
    p = "basic_auth_users"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(p, f"must be a mapping of user: bcrypt hash, got {_kind(value)}")
    users = {}
    for name, hashed in value.items():
        if not isinstance(name, str):
            raise WebConfigError(p, f"user name {name!r} must be a string")
        if ":" in name:
            raise WebConfigError(f"{p}.{name}", "a user name with ':' could never log in with basic auth")
        users[name] = _check_hash(name, hashed)
    return users


def _check_hash(name: str, hashed: Any) -> str:
    key = f"basic_auth_users.{name}"
    # Never echo the value: it may be a plain password pasted by mistake.
    if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
        raise WebConfigError(key, "not a bcrypt hash ($2y$, $2a$ or $2b$, 60 characters, e.g. from "
                             "'htpasswd -nBC 10 \"\" | tr -d :')")
    cost = int(hashed[4:6])
    if not 4 <= cost <= 31:
        raise WebConfigError(key, f"bcrypt cost {cost} is outside 4..31")
    return hashed


def _parse_rate_limit(section: dict[Any, Any]) -> tuple[float, int] | None:
    p = "rate_limit"
    _known(section, _RATE_KEYS, p)
    interval = _duration(section.get("interval", 0), f"{p}.interval")
    burst = section.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise WebConfigError(f"{p}.burst", f"must be a non-negative integer, got {burst!r}")
    if interval == 0:
        return None
    if burst < 1:
        raise WebConfigError(f"{p}.burst", "must be at least 1 when interval is set (0 would refuse every request)")
    return interval, burst


def _duration(value: Any, key: str) -> float:
    """Seconds from a Go duration ("1m30s", "250ms") or an integer of nanoseconds, as Go's YAML reads it."""
    if isinstance(value, bool):
        raise WebConfigError(key, f"must be a duration like 1s or 250ms, got {value!r}")
    if isinstance(value, int):
        seconds = value * 1e-9
    elif isinstance(value, str) and value == "0":
        seconds = 0.0
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value) == "":
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise WebConfigError(key, f"must be a duration like 1s or 250ms, got {value!r}")
    if seconds < 0:
        raise WebConfigError(key, "must not be negative")
    return seconds


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    return (user, password) if sep else None


def _normalise_san(value: str) -> str:
    # getpeercert() spells IPv6 as OpenSSL prints it (upper case, uncompressed), Go as net.IP.String().
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, as Go's yaml.UnmarshalStrict does (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may be overridden, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):
                if key in seen:
                    raise WebConfigError(str(key), f"duplicate key at line {key_node.start_mark.line + 1}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _section(data: dict[Any, Any], key: str) -> dict[Any, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(key, f"must be a mapping, got {_kind(value)}")
    return value


def _known(section: dict[Any, Any], allowed: set[str], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise WebConfigError(where, f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _str(section: dict[Any, Any], key: str, prefix: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebConfigError(f"{prefix}.{key}", f"must be a string, got {_kind(value)}")
    return value


def _path(section: dict[Any, Any], key: str, base: str) -> str | None:
    value = _str(section, key, "tls_server_config")
    # Relative to the config file's directory, like the toolkit's config_util.JoinDir.
    return os.path.join(base, value) if value else None


def _str_list(section: dict[Any, Any], key: str, prefix: str) -> list[str]:
    value = section.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WebConfigError(f"{prefix}.{key}", "must be a list of strings")
    return value


def _bool(section: dict[Any, Any], key: str, prefix: str, *, default: bool) -> bool:
    value = section.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WebConfigError(f"{prefix}.{key}", f"must be true or false, got {value!r}")
    return value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
