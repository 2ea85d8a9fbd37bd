"""Web-config test kit: a throwaway PKI, bcrypt hashes, web.yml blocks, raw HTTP(S) clients and a small WSGI app."""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import ssl
import subprocess
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

PASSWORD = "c0rrect-h0rse"
OTHER_PASSWORD = "s3cond-user"


# --- a throwaway PKI, made with the openssl command line ------------------------------------------

def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _new_key_args(name: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key"]


def _ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", *_new_key_args(name), "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}")


def _leaf(d: Path, name: str, ca: str, san: str, usage: str) -> None:
    _openssl(d, "req", *_new_key_args(name), "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


def make_pki(d: Path) -> Path:
    """CAs, server and client certificates in ``d`` (the ``pki`` fixture of conftest.py)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line is needed to make test certificates")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1,IP:::1", "serverAuth")
    _leaf(d, "client", "ca", "DNS:scraper.example,IP:2001:db8::7", "clientAuth")
    _leaf(d, "rogue", "rogue-ca", "DNS:scraper.example", "clientAuth")
    _openssl(d, "pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key")
    return d


def _htpasswd_hash(password: str) -> str:
    """A $2y$ hash made by something other than our bcrypt library, as a Go exporter's user would."""
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbBC", "4", "u", password], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        return out.strip().split(":", 1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # libxcrypt, also independent of the bcrypt package

    return crypt.crypt(password, "$2y$04$" + base64.b64encode(b"dbpool-exporter-").decode()[:22].replace("+", "."))


def make_hashes() -> dict[str, str]:
    """Users' bcrypt hashes, one made by htpasswd (the ``hashes`` fixture of conftest.py)."""
    hashed = _htpasswd_hash(PASSWORD)
    assert hashed.startswith("$2y$04$")
    return {"alice": hashed, "bob": bcrypt.hashpw(OTHER_PASSWORD.encode(), bcrypt.gensalt(4)).decode()}


# --- helpers ------------------------------------------------------------------------------------

def write(d: Path, text: str, name: str = "web.yml") -> str:
    path = d / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def tls_block(pki: Path, **extra: str) -> str:
    lines = [f"  cert_file: {pki / 'server.crt'}", f"  key_file: {pki / 'server.key'}"]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "tls_server_config:\n" + "\n".join(lines) + "\n"


def users_block(hashes: dict[str, str]) -> str:
    return "basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in hashes.items())


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def client_ctx(pki: Path, cert: str | None = None, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def request(server: Any, path: str = "/metrics", *, method: str = "GET", headers: list[tuple[str, str]] | None = None,
            ctx: ssl.SSLContext | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    host = "127.0.0.1"
    conn: http.client.HTTPConnection
    if ctx is not None:
        conn = http.client.HTTPSConnection(host, server.port, context=ctx, timeout=10)
    else:
        conn = http.client.HTTPConnection(host, server.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for name, value in headers or []:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def raw(port: int, payload: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    """Send bytes as they are and read until the server closes (bounded by a timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    chunks = []
    try:
        sock.sendall(payload)
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return b"".join(chunks)


class App:
    """The daemon's shape: /metrics from a fresh registry, a landing page, health routes; counts calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        Gauge("webcfg_test_up", "A canary metric.", registry=self.registry).set(1)
        self.metrics = make_wsgi_app(self.registry)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.lock:
            self.calls.append(environ["PATH_INFO"])
        path = environ["PATH_INFO"]
        if path == "/metrics":
            return self.metrics(environ, start_response)
        if path in ("/-/healthy", "/-/ready"):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"OK\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html")])
            return [b"<html><a href='/metrics'>Metrics</a></html>\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
