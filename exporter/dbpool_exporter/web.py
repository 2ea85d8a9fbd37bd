"""The daemon's HTTP endpoints (stdlib server in a thread): metrics, landing page, health and readiness."""

from __future__ import annotations

import errno
import gzip
import html
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("dbpool_exporter.web")


@dataclass(frozen=True)
class SourceRow:
    """What the landing page shows about one source (already password-free)."""

    name: str
    kind: str
    up: bool
    last_success: float
    last_error: str


class ListenAddressError(ValueError):
    pass


def parse_listen_address(value: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (all interfaces, like other exporters) or ``[v6]:port``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenAddressError(f"expected host:port or :port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _DualStack(_Server6):
    """``:port``: IPv6 and IPv4 on one socket, as Go exporters listen on ``:port``."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    if host == "":
        try:
            return _DualStack(("::", port), handler)
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            # No IPv6 on this host: every IPv4 interface, then.
        return _Server(("", port), handler)
    return (_Server6 if ":" in host else _Server)((host, port), handler)


class WebServer:
    """Serves until ``stop()``; binding happens in the constructor so a taken port fails early."""

    def __init__(self, address: str, telemetry_path: str, registry: CollectorRegistry, *,
                 sources: Callable[[], list[SourceRow]], ready: Callable[[], bool], version: str) -> None:
        host, port = parse_listen_address(address)
        self.telemetry_path = telemetry_path
        handler = _handler(self, registry, sources, ready, version)
        self.httpd = _bind(host, port, handler)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        # A short poll interval so shutdown() returns quickly on SIGTERM.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="dbpool-exporter-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=2)
        self.httpd.server_close()


def _landing(telemetry_path: str, rows: list[SourceRow], version: str) -> bytes:
    e = html.escape
    body = []
    for row in rows:
        last = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row.last_success))
                if row.last_success else "never")
        body.append(f"<tr><td>{e(row.name)}</td><td>{e(row.kind)}</td><td>{'1' if row.up else '0'}</td>"
                    f"<td>{e(last)}</td><td>{e(row.last_error)}</td></tr>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dbpool-exporter</title></head>
<body>
<h1>dbpool-exporter</h1>
<p>Version {e(version)}</p>
<ul>
<li><a href="{e(telemetry_path)}">Metrics</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li>
</ul>
<h2>Sources</h2>
<table border="1">
<tr><th>name</th><th>kind</th><th>up</th><th>last success</th><th>last error</th></tr>
{chr(10).join(body)}
</table>
</body></html>
"""
    return page.encode("utf-8")


def _handler(web: WebServer, registry: CollectorRegistry, sources: Callable[[], list[SourceRow]],
             ready: Callable[[], bool], version: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dbpool-exporter"

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            if len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
                # Prometheus asks for gzip; a busy server's exposition shrinks about tenfold.
                body = gzip.compress(body, compresslevel=6)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
            path = urlsplit(self.path).path
            try:
                if path == web.telemetry_path:
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, encoder(registry), content_type)
                elif path == "/":
                    self._send(200, _landing(web.telemetry_path, sources(), version), "text/html; charset=utf-8")
                elif path == "/-/healthy":
                    self._send(200, b"Healthy.\n")
                elif path == "/-/ready":
                    if ready():
                        self._send(200, b"Ready.\n")
                    else:
                        self._send(503, b"Not ready: the first poll round has not finished.\n")
                else:
                    self._send(404, b"Not found.\n")
            except Exception as e:  # one bad scrape must not kill the server thread
                log.error("request failed path=%s error=%s", path, f"{type(e).__name__}: {e}")
                self._send(500, b"Internal error; see the exporter's log.\n")

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # Access logs at debug only: Prometheus scraping every 15 s would fill the log.
            log.debug("http " + format, *args)

    return Handler
