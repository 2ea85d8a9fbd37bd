"""A small threaded HTTP(S) server for WSGI apps, guarded by a WebConfig: TLS, basic auth, headers."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import re
import resource
import socket
import socketserver
import ssl
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, cast
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from .logs import RateLimited

if TYPE_CHECKING:  # not at run time: the in-process library never reads a web config
    from .webconfig import WebConfig

__all__ = ["RunningServer", "parse_listen_address", "serve_wsgi"]

log = logging.getLogger("dbpool_exporter.http")
# Anything a client can cause (hang-ups, failed handshakes, a flood of connections) is logged this way.
events = RateLimited(log)

# No version in the Server header: it tells a prober which CVEs to try, and nobody else needs it.
SERVER_SOFTWARE = "dbpool-exporter"
# Connections held at once, at most; past it the oldest connection still sending its request is dropped.
# Each costs a file descriptor and a thread: a quarter of the process's descriptor limit at most, so slow
# clients can never take the descriptors the host application (or the exporter's own polls) need.
MAX_CONNECTIONS = 512
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# What Go's net/http answers to plain HTTP on a TLS port, so `curl http://` users see why.
_PLAIN_HTTP_REPLY = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_listen_address(text: str) -> tuple[str, int]:
    """``":9188"`` -> ``("", 9188)`` (all interfaces), ``"127.0.0.1:9188"``, ``"[::1]:9188"``; else ValueError."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("listen address is empty; expected host:port, e.g. :9188 or 127.0.0.1:9188")
    if "/" in text or any(c.isspace() for c in text):
        raise ValueError(f"listen address {text!r}: expected host:port, e.g. :9188 (not a URL)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"listen address {text!r}: missing ']' after the IPv6 address")
        if not rest.startswith(":"):
            raise ValueError(f"listen address {text!r}: missing :port after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ValueError(f"listen address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"listen address {text!r}: missing port; expected host:port, e.g. :9188")
        if ":" in host:
            raise ValueError(f"listen address {text!r}: put an IPv6 address in brackets, e.g. [::1]:9188")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"listen address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


class RunningServer:
    """A server started by ``serve_wsgi``; ``shutdown()`` stops it and closes its socket."""

    def __init__(self, server: _Server, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]
        self.bind_host = host
        scheme = "https" if server.ssl_context is not None else "http"
        self.url = f"{scheme}://{_url_host(host, server.address_family)}:{self.port}"

    @property
    def web_config(self) -> WebConfig | None:
        return self._server.web_config

    def set_web_config(self, web_config: WebConfig | None) -> None:
        """Swap in a reloaded config (certificates re-read); TLS cannot be turned on or off while running."""
        tls_now = self._server.ssl_context is not None
        tls_new = web_config is not None and web_config.tls_enabled
        if tls_now != tls_new:
            raise ValueError("a running server cannot switch between HTTP and HTTPS; restart it")
        self._server.configure(web_config)

    def forget(self) -> None:
        """In a forked child: close this copy of the listening socket; the serving thread stayed in the parent."""
        self._server.socket.close()

    def shutdown(self) -> None:
        """Stop accepting, join the serving thread, close the listening socket."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve_wsgi(
    app: WSGIApp,
    host: str,
    port: int,
    web_config: WebConfig | None = None,
    *,
    handshake_timeout: float = 10.0,
    request_timeout: float = 60.0,
    max_connections: int | None = None,
) -> RunningServer:
    """Serve ``app`` on ``host:port`` (``""`` = all interfaces, port 0 = any) from daemon threads.

    With ``web_config``: TLS per its ``tls_server_config`` (handshakes run in the connection's own
    thread, with a timeout, so a bad client never blocks others), basic auth checked before ``app``
    sees any request, and its extra headers on every response. At most ``max_connections`` (default:
    ``MAX_CONNECTIONS`` or a quarter of the descriptor limit) are held at once; past it the oldest
    connection still sending its request is dropped. Raises OSError if it cannot listen.
    """
    family, address = _bind_address(host, port)
    limit = max_connections if max_connections is not None else default_max_connections()
    try:
        server = _Server(address, family, _guard(app), handshake_timeout, request_timeout, limit)
    except OSError as exc:
        shown = f"[{host}]" if ":" in host else host
        raise OSError(exc.errno, f"cannot listen on {shown}:{port}: {exc.strerror or exc}") from None
    try:
        server.configure(web_config)
    except BaseException:
        server.server_close()
        raise
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"dbpool-exporter-http-{server.server_address[1]}", daemon=True)
    thread.start()
    return RunningServer(server, thread, host)


class _TokenBucket:
    """The toolkit's ``rate_limit``: one bucket for the whole server, ``burst`` deep, refilled every ``interval``."""

    def __init__(self, interval: float, burst: int) -> None:
        self._interval = interval
        self._burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


def default_max_connections() -> int:
    """``MAX_CONNECTIONS``, or a quarter of this process's file-descriptor limit if that is lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, soft // 4))


class _Conn:
    """One accepted connection, in accept order; ``serving`` once its request has been read."""

    __slots__ = ("sock", "serving", "dropped")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.serving = False
        self.dropped = False

    def drop(self) -> None:
        # shutdown(), not close(): the owning thread's recv() returns at once and that thread closes
        # the descriptor, so it is never reused under it. socket.socket's own method, because
        # SSLSocket.shutdown() would pull the TLS state out from under the reading thread.
        self.dropped = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # 64 made the kernel drop SYNs at ~100 concurrent scrapers (1-3 s retransmits); it caps this at somaxconn.
    request_queue_size = 1024
    # typeshed's Self-typed attribute does not bind to _Server under mypy; the class is always _Handler.
    RequestHandlerClass: Callable[[Any, Any, _Server], socketserver.BaseRequestHandler]

    def __init__(self, address: tuple[Any, ...], family: socket.AddressFamily, app: WSGIApp,
                 handshake_timeout: float, request_timeout: float, max_connections: int) -> None:
        self.address_family = family
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.max_connections = max(1, max_connections)
        self.web_config: WebConfig | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.limiter: _TokenBucket | None = None
        self._conns: dict[socket.socket, _Conn] = {}  # insertion order = accept order
        self._conns_lock = threading.Lock()
        self._current = threading.local()
        self._warned = False
        super().__init__(address, _Handler)
        self.set_app(app)

    # --- bounded connections ------------------------------------------------------------------
    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                # The connection stays in the backlog and select() reports it again at once: without
                # this the accept loop spins at 100% CPU. Free one descriptor, give its thread a moment.
                self._crowded(f"accept failed: {exc.strerror}")
                with self._conns_lock:
                    victim = self._victim(None)
                if victim is not None:
                    victim.drop()
                time.sleep(0.05)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        conn = _Conn(request)
        with self._conns_lock:
            self._conns[request] = conn
            live = sum(not c.dropped for c in self._conns.values())
            victim = self._victim(conn) if live > self.max_connections else None
        if victim is not None:
            self._crowded(f"{live} open, the limit is {self.max_connections}")
            victim.drop()
        super().process_request(request, client_address)

    def _victim(self, new: _Conn | None) -> _Conn | None:
        """The oldest connection still sending its request; else the oldest being answered (a client
        that never reads its answer holds it until ``request_timeout``); the new one only if alone."""
        oldest_serving = None
        for conn in self._conns.values():
            if conn.dropped or conn is new:
                continue
            if not conn.serving:
                return conn
            oldest_serving = oldest_serving or conn
        return oldest_serving or new

    def _crowded(self, detail: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("too many connections (%s): dropping the oldest, those still sending their request "
                        "first; logged once", detail)
        else:
            events.log(logging.DEBUG, "crowded", "too many connections (%s)", detail)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def request_started(self) -> None:
        """Called by the handler once the request line and headers are in: not a slow client."""
        conn = getattr(self._current, "conn", None)
        if conn is not None:
            conn.serving = True

    def configure(self, web_config: WebConfig | None) -> None:
        ctx = web_config.ssl_context() if web_config is not None else None
        limiter = _TokenBucket(*web_config.rate_limit) if web_config and web_config.rate_limit else None
        # Handlers read these three once per request; assignment is atomic, so a swap is safe.
        self.ssl_context, self.limiter, self.web_config = ctx, limiter, web_config

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # Like Go's ":port": one socket for IPv6 and IPv4.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would call getfqdn(), a DNS lookup that can stall start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = self.server_address[1]
        self.setup_environ()
        self.base_environ["dbpool_exporter.server"] = self

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            record = self._conns.get(request)
        self._current.conn = record
        ctx = self.ssl_context
        if ctx is None:
            self.RequestHandlerClass(request, client_address, self)
            return
        conn = self._handshake(request, client_address, ctx)
        if conn is None:
            return
        if record is not None:
            record.sock = conn  # the plain socket was detached into conn
            if record.dropped:
                record.drop()
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            conn.close()  # the plain socket was detached into conn; shutdown_request cannot close it

    def _handshake(self, sock: socket.socket, client_address: Any, ctx: ssl.SSLContext) -> ssl.SSLSocket | None:
        sock.settimeout(self.handshake_timeout)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return None
            if first.isalpha():  # an HTTP method where a TLS record should start
                sock.sendall(_PLAIN_HTTP_REPLY)
                return None
            conn = ctx.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:  # SSLError and timeouts are OSErrors
            events.log(logging.DEBUG, "handshake", "TLS handshake with %s failed: %s", client_address[0], exc)
            return None
        config = self.web_config
        if config is not None and not config.peer_allowed(conn.getpeercert()):
            events.log(logging.DEBUG, "sans", "TLS client %s: certificate has none of client_allowed_sans",
                       client_address[0])
            conn.close()
            return None
        return conn

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr for every reset connection.
        error = sys.exc_info()[1]
        events.log(logging.DEBUG, "connection", "connection from %s failed: %s", client_address[0],
                   f"{type(error).__name__}: {error}")


class _ServerHandler(ServerHandler):
    """wsgiref's, minus the version in ``Server`` and the traceback it prints to stderr on any error."""

    server_software = SERVER_SOFTWARE
    # Set by wsgiref at run time, missing from typeshed.
    headers_sent: bool
    environ: dict[str, Any]
    request_handler: WSGIRequestHandler  # what wsgiref's own handle() sets, for logging

    def handle_error(self) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            # The client went away mid-answer: over TLS that is an SSLEOFError, which wsgiref does not
            # count among the hang-ups it ignores (reset, broken pipe), so it printed a traceback. Nothing
            # can be sent on the connection any more.
            events.log(logging.DEBUG, "hangup", "client hung up mid-answer: %s", f"{type(error).__name__}: {error}")
            return
        events.log(logging.ERROR, "app", "request failed: %s", f"{type(error).__name__}: {error}")
        if not self.headers_sent:
            self.result = self.error_output(self.environ, self.start_response)
            self.finish_response()


class _LogStream:
    """Stands in for stderr wherever wsgiref would write to it: lines go through the log instead."""

    def write(self, text: str) -> int:
        line = text.strip().splitlines()[-1] if text.strip() else ""
        if line:
            events.log(logging.ERROR, "stderr", "http server: %s", line)
        return len(text)

    def flush(self) -> None:
        pass


class _Handler(WSGIRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(self.server.request_timeout)  # a silent client cannot hold its thread forever
        super().setup()

    def handle(self) -> None:
        # WSGIRequestHandler.handle(), with our ServerHandler and a note once the request is in.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        self.server.request_started()
        # typeshed says BufferedIOBase for wfile where wsgiref wants IO[bytes]; it is the socket's file object.
        wfile = cast(IO[bytes], self.wfile)
        handler = _ServerHandler(self.rfile, wfile, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self
        app = self.server.get_app()
        if app is None:  # set_app() runs in _Server.__init__, before any request
            self.send_error(503)
            return
        handler.run(app)

    def get_stderr(self) -> Any:
        return _LogStream()

    def version_string(self) -> str:
        return SERVER_SOFTWARE

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # no access log: request lines are not ours to keep, and this runs per scrape

    def end_headers(self) -> None:
        # Only send_error() (400, 414, 431 before any app runs) comes through here; WSGI
        # responses get the extra headers in _guard.
        config = self.server.web_config
        for name, value in (config.headers.items() if config else ()):
            self.send_header(name, value)
        super().end_headers()


def _guard(app: WSGIApp) -> WSGIApp:
    """Wrap ``app`` so rate limit and basic auth are enforced before it sees any request."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        server: _Server = environ["dbpool_exporter.server"]
        config, limiter = server.web_config, server.limiter
        extra = list(config.headers.items()) if config else []
        # The toolkit takes a token before checking credentials (a wrong password costs a bcrypt, so the
        # limit bounds that work). A request without usable credentials costs nothing to refuse, and is
        # refused before the limiter, so an unauthenticated client cannot spend the real scraper's tokens.
        if config is not None and config.refused_without_bcrypt(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                ("WWW-Authenticate", "Basic"), *extra])
            return [b"Unauthorized\n"]
        if limiter is not None and not limiter.allow():
            start_response("429 Too Many Requests", [("Content-Type", "text/plain; charset=utf-8"), *extra])
            return [b"Too Many Requests\n"]
        if config is not None and not config.check(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                ("WWW-Authenticate", "Basic"), *extra])
            return [b"Unauthorized\n"]
        if not extra:
            return app(environ, start_response)

        def start_with_headers(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            return start_response(status, headers + [h for h in extra if h[0].lower() not in present], exc_info)

        return app(environ, start_with_headers)

    return guarded


def _bind_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    if host == "":
        if socket.has_ipv6:
            try:
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
                return socket.AF_INET6, ("::", port)
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _url_host(host: str, family: int) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1" if host == "0.0.0.0" or family == socket.AF_INET else "localhost"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
