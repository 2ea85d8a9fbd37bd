"""The daemon's HTTP endpoints as one WSGI app: metrics, landing page, health and readiness."""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, make_wsgi_app

from .exposition import wsgi_app
from .httpserver import RunningServer, parse_listen_address, serve_wsgi
from .webconfig import WebConfig

log = logging.getLogger("dbpool_exporter.web")

_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class SourceRow:
    """What the landing page shows about one source (already password-free)."""

    name: str
    kind: str
    up: bool
    last_success: float
    last_error: str


class WebServer:
    """Serves until ``stop()``; binds in the constructor so a taken port fails before anything starts.

    TLS and basic auth (``web_config``) are enforced by ``serve_wsgi`` in front of every route.
    """

    def __init__(self, address: str, telemetry_path: str, registry: CollectorRegistry, *,
                 sources: Callable[[], list[SourceRow]], ready: Callable[[], bool], version: str,
                 web_config: WebConfig | None = None, text: Callable[[], str | None] | None = None) -> None:
        host, port = parse_listen_address(address)
        self.telemetry_path = telemetry_path
        app = make_app(telemetry_path, registry, sources, ready, version, text)
        self.running: RunningServer = serve_wsgi(app, host, port, web_config)
        self._host = host

    @property
    def address(self) -> tuple[str, int]:
        return self._host, self.running.port

    def set_web_config(self, web_config: WebConfig | None) -> None:
        self.running.set_web_config(web_config)

    def stop(self) -> None:
        self.running.shutdown()


def make_app(telemetry_path: str, registry: CollectorRegistry, sources: Callable[[], list[SourceRow]],
             ready: Callable[[], bool], version: str,
             text: Callable[[], str | None] | None = None) -> Callable[..., Iterable[bytes]]:
    """Route by path; prometheus_client's WSGI app does content negotiation and gzip for metrics.

    ``text`` (the sidecar's workers) serves pre-rendered exposition text instead when it returns a string.
    """
    metrics = make_wsgi_app(registry)
    if text is not None:
        metrics = wsgi_app(text, metrics)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        try:
            if path == telemetry_path:
                return metrics(environ, start_response)
            if path == "/":
                code, body, ctype = "200 OK", _landing(telemetry_path, sources(), version), "text/html; charset=utf-8"
            elif path == "/-/healthy":
                code, body, ctype = "200 OK", b"Healthy.\n", _TEXT
            elif path == "/-/ready":
                code, body, ctype = (("200 OK", b"Ready.\n", _TEXT) if ready() else
                                     ("503 Service Unavailable",
                                      b"Not ready: the first poll round has not finished.\n", _TEXT))
            else:
                code, body, ctype = "404 Not Found", b"Not found.\n", _TEXT
        except Exception as e:  # one bad request must not kill the server thread
            log.error("request failed path=%s error=%s", path, f"{type(e).__name__}: {e}")
            code, body, ctype = "500 Internal Server Error", b"Internal error; see the exporter's log.\n", _TEXT
        start_response(code, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app


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
