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

from .limits import MAX_WEB_CONFIG_BYTES, TooLarge, read_capped
from .schema import Bool, Choice, ConfigError, Count, Duration, ListOf, Raw, Section, Str, kind

__all__ = ["WebConfig", "WebConfigError", "TLSSettings", "load_web_config"]


class WebConfigError(ConfigError):
    """A web config that cannot be used; each of ``problems`` is one line that starts with the offending key."""


def _error(key: str, problem: str) -> WebConfigError:
    return WebConfigError([f"{key}: {problem}"])


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
_BCRYPT_MAX_PASSWORD = 72  # bcrypt ignores bytes past 72; the library refuses them, and so do we
_CACHE_SIZE = 100

_UNVERIFIED = ("(a client certificate that is not verified) cannot be honoured with Python's ssl; use "
               "RequireAndVerifyClientCert with client_ca_file")
_PEM = Str("a string")
_VERSION = Choice(tuple(_VERSIONS), "TLS version", hint="expected TLS12 or TLS13", refused={
    v: f"{v} is refused by OpenSSL's security level here; use TLS12 or TLS13" for v in _LEGACY_VERSIONS})
_TLS = Section({
    **dict.fromkeys(("cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file"), _PEM),
    "client_auth_type": Choice(tuple(k for k, v in _CLIENT_AUTH.items() if v is not None), "value", refused={
        k: f"{k} {_UNVERIFIED}" for k, v in _CLIENT_AUTH.items() if v is None}),
    "client_allowed_sans": ListOf(Str("a string")),
    "min_version": _VERSION,
    "max_version": _VERSION,
    "cipher_suites": ListOf(Choice((*_TLS12_CIPHERS, *_TLS13_CIPHERS), "cipher suite", refused={
        c: f"{c} (3DES) is not available in this OpenSSL" for c in _UNAVAILABLE_CIPHERS},
        hint="use Go's names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")),
    "prefer_server_cipher_suites": Bool(),
    "curve_preferences": ListOf(Choice(tuple(_CURVES), "curve")),
}, unset=(None, ""))
SCHEMA = Section({
    "tls_server_config": _TLS,
    # "unset if blank", as the toolkit says; a value must not be able to start a second header
    "http_server_config": Section({"http2": Bool(), "headers": Section({
        name: Choice(values, "value") if values else Str("a single-line ASCII string", pattern=r"[\x20-\x7e\t]+")
        for name, values in _HEADERS.items()}, unset=(None, ""))}),
    "basic_auth_users": Raw(),
    # Go reads a bare number as nanoseconds.
    "rate_limit": Section({"interval": Duration("a duration like '1s', '250ms' or '1m30s'", plain=1e-9,
                                                positive=False), "burst": Count(0)}),
})


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
            import bcrypt  # only with basic_auth_users: a daemon without users never loads it

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
        import bcrypt  # loaded by __init__ already: users exist

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
    """Read and validate an exporter-toolkit web config file; raises ``WebConfigError``, one line per problem."""
    from . import yamlfile  # PyYAML only when a web config file is read

    try:
        data = yamlfile.load(path, MAX_WEB_CONFIG_BYTES)
    except yamlfile.YAMLFileError as e:
        raise WebConfigError([str(e)]) from None
    if data is None:
        data = {}  # an empty file is valid for the toolkit: plain HTTP, no auth
    if not isinstance(data, dict):
        raise _error(path, f"expected a mapping of settings, got {kind(data)}")
    problems: list[str] = []
    top = SCHEMA.check(data, "", problems)
    if problems:
        raise WebConfigError(problems)
    http, rate = top.get("http_server_config", {}), top.get("rate_limit", {})
    interval, burst = rate.get("interval", 0.0), rate.get("burst", 0)
    if interval and burst < 1:
        raise _error("rate_limit.burst", "must be at least 1 when interval is set (0 would refuse every request)")
    tls = _tls(top.get("tls_server_config", {}), os.path.dirname(os.path.abspath(path)))
    config = WebConfig(path=path, tls=tls, http2=http.get("http2", True), headers=http.get("headers"),
                       users=_parse_users(data.get("basic_auth_users")),
                       rate_limit=(interval, burst) if interval else None)
    config.ssl_context()  # load certificates now, so a bad file fails at start, not at the first scrape
    return config


def _tls(t: dict[str, Any], base: str) -> TLSSettings | None:
    """``tls_server_config`` as checked by the schema, and the rules across its keys."""
    p = "tls_server_config"
    for key in ("cert_file", "key_file", "client_ca_file"):
        if key in t:  # relative to the config file's directory, like the toolkit's config_util.JoinDir
            t[key] = os.path.join(base, t[key])
    # The toolkit turns TLS on when any of these is set (TLSConfig.IsEnabled).
    if not t.keys() & {"cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file", "client_auth_type"}:
        leftover = sorted(k for k, v in t.items() if v != [])
        if leftover:
            raise _error(f"{p}.{leftover[0]}", "has no effect without cert_file/cert and key_file/key")
        return None
    for inline in ("cert", "key", "client_ca"):
        if inline in t and f"{inline}_file" in t:
            raise _error(f"{p}.{inline}", f"set either {inline} or {inline}_file, not both")
    for inline in ("cert", "key"):
        if not t.keys() & {inline, f"{inline}_file"}:
            raise _error(f"{p}.{inline}_file", f"missing: TLS needs {inline}_file (or {inline})")
    auth = t.setdefault("client_auth_type", "NoClientCert")
    if t.keys() & {"client_ca", "client_ca_file"} and auth == "NoClientCert":
        raise _error(f"{p}.client_auth_type", "client CAs are set but client_auth_type is NoClientCert")
    if "client_allowed_sans" in t and auth != "RequireAndVerifyClientCert":
        raise _error(f"{p}.client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert")
    low, high = t.setdefault("min_version", "TLS12"), t.setdefault("max_version", "TLS13")
    if _VERSIONS[low] > _VERSIONS[high]:
        raise _error(f"{p}.min_version", f"{low} is above max_version {high}")
    ciphers = t["cipher_suites"] = tuple(t.get("cipher_suites", ()))
    if ciphers and not any(c in _TLS12_CIPHERS for c in ciphers) and low == "TLS12":
        raise _error(f"{p}.cipher_suites", "lists only TLS 1.3 suites, which cannot be configured; "
                     "list TLS 1.2 suites or set min_version: TLS13")
    curves = t["curve_preferences"] = tuple(t.get("curve_preferences", ()))
    if len(curves) > 1:
        raise _error(f"{p}.curve_preferences", f"Python's ssl can restrict the handshake to one curve "
                     f"only; got {', '.join(curves)}")
    if "client_allowed_sans" in t:
        t["client_allowed_sans"] = tuple(t["client_allowed_sans"])
    return TLSSettings(**t)


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
            raise _error(f"{p}.cipher_suites",
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
        raise _error(cert_key, "no PEM certificate found")
    if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_pem):
        raise _error(key_key, "no PEM private key found")
    if "ENCRYPTED" in key_pem:
        raise _error(key_key, "the private key is encrypted; the toolkit format takes an unencrypted key")
    with _pem_path(cert_pem) as cert_path, _pem_path(key_pem) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_password)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise _error(key_key, "the private key does not match the certificate") from None
            raise _error(cert_key, f"cannot load the certificate and key: {_reason(exc)}") from None
        except _EncryptedKey:
            raise _error(key_key, "the private key is encrypted; the toolkit format takes an "
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
            raise _error(ca_key, f"no usable PEM CA certificate: {_reason(exc)}") from None
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
        raise _error(key, f"no such file: {path}") from None
    except TooLarge as exc:
        raise _error(key, f"{path}: {exc}") from None
    except OSError as exc:
        raise _error(key, f"cannot read {path}: {_reason(exc)}") from None


def _parse_users(value: Any) -> dict[str, str]:
    p = "basic_auth_users"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _error(p, f"expected a mapping of user: bcrypt hash, got {kind(value)}")
    users = {}
    for name, hashed in value.items():
        if not isinstance(name, str):
            raise _error(p, f"user name {name!r} must be a string")
        if ":" in name:
            raise _error(f"{p}.{name}", "a user name with ':' could never log in with basic auth")
        users[name] = _check_hash(name, hashed)
    return users


def _check_hash(name: str, hashed: Any) -> str:
    key = f"basic_auth_users.{name}"
    # Never echo the value: it may be a plain password pasted by mistake.
    if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
        raise _error(key, "not a bcrypt hash ($2y$, $2a$ or $2b$, 60 characters, e.g. from "
                     "'htpasswd -nBC 10 \"\" | tr -d :')")
    cost = int(hashed[4:6])
    if not 4 <= cost <= 31:
        raise _error(key, f"bcrypt cost {cost} is outside 4..31")
    return hashed


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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
