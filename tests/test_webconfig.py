"""--web.config.file: exporter-toolkit format parsing, real TLS clients, basic auth with no way around it."""

from __future__ import annotations

import base64
import http.client
import logging
import shutil
import socket
import ssl
import subprocess
import textwrap
from typing import Any

import bcrypt
import pytest

from dbpool_exporter.httpserver import parse_listen_address, serve_wsgi
from dbpool_exporter.webconfig import WebConfig, WebConfigError, load_web_config
from webtls import OTHER_PASSWORD, PASSWORD, App, basic, client_ctx, raw, request, tls_block, users_block, write

pytestmark = pytest.mark.timeout(120)

@pytest.fixture
def serve():
    started = []

    def start(config: WebConfig | None, app: App | None = None, **kw: Any):
        app = app or App()
        server = serve_wsgi(app, "127.0.0.1", 0, config, **kw)
        started.append(server)
        return server, app

    yield start
    for server in started:
        server.shutdown()


# --- TLS -----------------------------------------------------------------------------------------

def test_tls_serves_metrics_to_a_verifying_client(tmp_path, pki, serve):
    config = load_web_config(write(tmp_path, tls_block(pki) + textwrap.dedent("""\
        http_server_config:
          headers:
            Strict-Transport-Security: max-age=31536000
            X-Content-Type-Options: nosniff
        """)))
    server, _ = serve(config)
    assert server.url == f"https://127.0.0.1:{server.port}"
    status, headers, body = request(server, ctx=client_ctx(pki))
    assert status == 200
    assert b"webcfg_test_up 1.0" in body
    assert headers["Strict-Transport-Security"] == "max-age=31536000"
    assert headers["X-Content-Type-Options"] == "nosniff"
    # A client that does not trust our CA must refuse the server.
    with pytest.raises(ssl.SSLCertVerificationError):
        request(server, ctx=ssl.create_default_context())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_tls_with_client_cert_and_basic_auth(tmp_path, pki, hashes, serve):
    config = load_web_config(write(tmp_path, tls_block(
        pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki / "ca.crt")) + users_block(hashes)))
    server, _ = serve(config)

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(pki / "ca.crt"), *args,
                               "-o", "/dev/null", "-w", "%{http_code}", server.url + "/metrics"],
                              capture_output=True, text=True, timeout=30)

    cert = ["--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")]
    assert curl(*cert, "-u", f"alice:{PASSWORD}").stdout == "200"
    assert curl(*cert, "-u", "alice:wrong").stdout == "401"
    assert curl(*cert).stdout == "401"
    no_cert = curl("-u", f"alice:{PASSWORD}")
    assert no_cert.returncode != 0 and no_cert.stdout in ("", "000")
    rogue = curl("--cert", str(pki / "rogue.crt"), "--key", str(pki / "rogue.key"), "-u", f"alice:{PASSWORD}")
    assert rogue.returncode != 0 and rogue.stdout in ("", "000")


def test_plain_http_and_garbage_on_a_tls_port_do_not_hurt_the_server(tmp_path, pki, serve):
    server, app = serve(load_web_config(write(tmp_path, tls_block(pki))), handshake_timeout=0.5)
    status, _, body = request(server)  # plain HTTP
    assert status == 400 and b"HTTPS server" in body
    assert raw(server.port, b"\x00\x01\x02garbage\r\n\r\n") == b""
    # A client that opens a connection and never speaks: others are served meanwhile, and the
    # server drops it once the handshake timeout passes.
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        assert request(server, ctx=client_ctx(pki))[0] == 200
        assert silent.recv(1) == b""
    finally:
        silent.close()
    # A TLS 1.2-only client against a TLS 1.3-only server fails; the server carries on.
    strict = load_web_config(write(tmp_path, tls_block(pki, min_version="TLS13"), "strict.yml"))
    server13, _ = serve(strict)
    with pytest.raises(ssl.SSLError):
        request(server13, ctx=client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert request(server13, ctx=client_ctx(pki))[0] == 200
    assert request(server, ctx=client_ctx(pki))[0] == 200
    assert app.calls == ["/metrics", "/metrics"]


def test_request_client_cert_admits_like_go(tmp_path, pki, serve):
    # Go asks for a certificate but never verifies or requires it: any client gets in.
    config = load_web_config(write(tmp_path, tls_block(pki, client_auth_type="RequestClientCert")))
    server, _ = serve(config)
    for cert in (None, "client", "rogue"):
        assert request(server, ctx=client_ctx(pki, cert))[0] == 200


@pytest.mark.parametrize("mode", ["RequireAndVerifyClientCert", "VerifyClientCertIfGiven"])
def test_client_certificates(tmp_path, pki, serve, mode):
    config = load_web_config(write(tmp_path, tls_block(pki, client_auth_type=mode,
                                                       client_ca_file=str(pki / "ca.crt"))))
    server, app = serve(config)
    assert request(server, ctx=client_ctx(pki, "client"))[0] == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        request(server, ctx=client_ctx(pki, "rogue"))
    if mode == "RequireAndVerifyClientCert":
        with pytest.raises((OSError, http.client.HTTPException)):
            request(server, ctx=client_ctx(pki))
        assert app.calls == ["/metrics"]
    else:
        assert request(server, ctx=client_ctx(pki))[0] == 200
        assert app.calls == ["/metrics", "/metrics"]


def test_client_allowed_sans(tmp_path, pki, serve):
    def server_for(sans: str):
        text = tls_block(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file="ca.crt")
        text += f"  client_allowed_sans: {sans}\n"
        return serve(load_web_config(write(pki, text, "sans.yml")))[0]

    # IPv6 SANs compare as addresses: OpenSSL prints 2001:DB8:0:0:0:0:0:7, Go 2001:db8::7.
    for sans in ('["scraper.example"]', '["2001:db8::7"]'):
        assert request(server_for(sans), ctx=client_ctx(pki, "client"))[0] == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        request(server_for('["other.example"]'), ctx=client_ctx(pki, "client"))


def test_inline_cert_key_and_client_ca(tmp_path, pki, serve):
    def indent(name: str) -> str:
        return textwrap.indent((pki / name).read_text(), "    ")

    text = (f"tls_server_config:\n  cert: |\n{indent('server.crt')}  key: |\n{indent('server.key')}"
            f"  client_ca: |\n{indent('ca.crt')}  client_auth_type: RequireAndVerifyClientCert\n")
    config = load_web_config(write(tmp_path, text))
    assert "PRIVATE KEY" not in repr(config)
    server, _ = serve(config)
    assert request(server, ctx=client_ctx(pki, "client"))[0] == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        request(server, ctx=client_ctx(pki, "rogue"))


def test_cipher_suites_curves_and_versions_are_honoured(tmp_path, pki, serve):
    from dbpool_exporter.webconfig import _TLS12_CIPHERS

    for go_name, openssl_name in _TLS12_CIPHERS.items():  # the table matches this OpenSSL
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers(openssl_name)
        assert [c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"] == [openssl_name], go_name
    text = tls_block(pki, max_version="TLS12",
                     cipher_suites="[TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]")
    server, _ = serve(load_web_config(write(tmp_path, text)))
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    with client_ctx(pki).wrap_socket(conn, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    only256 = client_ctx(pki)
    only256.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    with pytest.raises(ssl.SSLError):
        request(server, ctx=only256)
    assert request(server, ctx=client_ctx(pki))[0] == 200
    # TLS 1.3 key exchange, where the group is independent of the certificate's curve.
    server, _ = serve(load_web_config(write(tmp_path, tls_block(pki, curve_preferences="[CurveP384]"), "c.yml")))
    p256 = client_ctx(pki)
    p256.set_ecdh_curve("prime256v1")
    with pytest.raises(ssl.SSLError):
        request(server, ctx=p256)
    p384 = client_ctx(pki)
    p384.set_ecdh_curve("secp384r1")
    assert request(server, ctx=p384)[0] == 200


def test_relative_paths_resolve_from_the_config_directory(tmp_path, pki, serve, monkeypatch):
    conf = tmp_path / "etc"
    (conf / "tls").mkdir(parents=True)
    for name in ("server.crt", "server.key"):
        shutil.copy(pki / name, conf / "tls" / name)
    path = write(conf, "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n")
    monkeypatch.chdir(tmp_path)
    config = load_web_config("etc/web.yml")
    assert config.tls is not None and config.tls.cert_file == str(conf / "tls" / "server.crt")
    monkeypatch.chdir("/")
    server, _ = serve(config)
    assert request(server, ctx=client_ctx(pki))[0] == 200
    assert load_web_config(path).tls == config.tls


# --- basic auth: no way around the check ---------------------------------------------------------

PATHS = ["/metrics", "/", "/-/healthy", "/-/ready", "/metrics/../metrics", "//metrics", "/%2e%2e/metrics",
         "/metrics?x=1", "http://127.0.0.1/metrics"]


def test_basic_auth_guards_every_path_and_method(tmp_path, hashes, serve, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="dbpool_exporter")
    config = load_web_config(write(tmp_path, users_block(hashes) + textwrap.dedent("""\
        http_server_config:
          headers:
            X-Frame-Options: deny
        """)))
    server, app = serve(config)
    good = basic("alice", PASSWORD)
    long_pw = "x" * 72
    long_hash = bcrypt.hashpw(long_pw.encode(), bcrypt.gensalt(4)).decode()
    config_long = load_web_config(write(tmp_path, users_block({"carol": long_hash}), "long.yml"))
    denied: list[list[tuple[str, str]]] = [
        [],
        [("Authorization", basic("alice", "wrong"))],
        [("Authorization", basic("mallory", PASSWORD))],
        [("Authorization", basic("alice", ""))],
        [("Authorization", basic("alice", PASSWORD + ":"))],
        [("Authorization", basic("bob", PASSWORD))],  # alice's password is not bob's
        [("Authorization", "Bearer " + good.split()[1])],
        [("Authorization", "Basic !!!notbase64")],
        [("Authorization", "Basic " + base64.b64encode(b"alice" + PASSWORD.encode()).decode())],
        [("Authorization", good), ("Authorization", basic("alice", "wrong"))],  # two headers
        [("Authorization", basic("alice", "wrong")), ("Authorization", good)],
        [("X-Authorization", good)],
        [("Proxy-Authorization", good)],
        [("Authorization", basic("alice", "wrong")), ("X-Padding", "a" * 8000)],
    ]
    for path in PATHS:
        for method in ("GET", "HEAD", "POST", "OPTIONS"):
            for headers in denied:
                status, resp_headers, _ = request(server, path, method=method, headers=headers)
                assert status == 401, (path, method, headers[:1])
                assert resp_headers["WWW-Authenticate"] == "Basic"
                assert resp_headers["X-Frame-Options"] == "deny"
    assert app.calls == []  # the app never saw an unauthenticated request

    for path in PATHS:
        status, headers, body = request(server, path, headers=[("Authorization", good)])
        assert status in (200, 404) and status != 401, path
        assert headers["X-Frame-Options"] == "deny"
    assert request(server, "/metrics", headers=[("Authorization", good)])[2].count(b"webcfg_test_up 1.0") == 1
    for path in ("/-/healthy", "/-/ready", "/"):
        assert request(server, path, headers=[("Authorization", good)])[0] == 200
    # Go's BasicAuth takes the scheme in any case; so do we.
    assert request(server, headers=[("Authorization", "basic " + good.split()[1])])[0] == 200
    assert request(server, headers=[("Authorization", basic("bob", OTHER_PASSWORD))])[0] == 200

    # bcrypt only reads 72 bytes: a 73-byte password that starts like the real one must not pass.
    assert config_long.check(basic("carol", long_pw))
    assert not config_long.check(basic("carol", long_pw + "y"))

    calls = len(app.calls)
    huge = raw(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 70000 + b"\r\n\r\n")
    assert not huge.startswith(b"HTTP/1.0 200") and b"webcfg_test_up" not in huge
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    assert raw(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.0 431")
    http09 = raw(server.port, b"GET /metrics\r\n\r\n")
    assert b"webcfg_test_up" not in http09 and b"Unauthorized" in http09
    assert raw(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization:" + good.encode()[:-2]
               + b"\r\n\r\n").startswith(b"HTTP/1.0 401")
    assert len(app.calls) == calls

    # Nothing about the credentials reaches logs or the terminal.
    out, err = capfd.readouterr()
    for secret in (PASSWORD, good.split()[1], hashes["alice"]):
        assert secret not in caplog.text and secret not in out and secret not in err


def test_basic_auth_over_tls_with_a_go_exporter_config(tmp_path, pki, hashes, serve):
    """A file as written for node_exporter: comments, quoting, toolkit defaults spelled out, a $2y$ hash."""
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(pki / name, tmp_path / name)
    path = write(tmp_path, f"""\
        # web-config.yml for node_exporter --web.config.file=web-config.yml
        tls_server_config:
          # Certificate and key files for server to use to authenticate to client.
          cert_file: server.crt
          key_file: "server.key"
          client_auth_type: "RequireAndVerifyClientCert"
          client_ca_file: ca.crt
          min_version: TLS12
          max_version: TLS13
          cipher_suites:
            - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            - TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
          prefer_server_cipher_suites: true
          curve_preferences: [X25519]

        http_server_config:
          http2: true
          headers:
            X-Content-Type-Options: nosniff
            X-Frame-Options: sameorigin
            Content-Security-Policy: "default-src 'self'"

        # htpasswd -nBC 10 "" | tr -d ':\\n'
        basic_auth_users:
          prometheus: {hashes["alice"]}
        """)
    config = load_web_config(path)
    assert config.users == ["prometheus"] and config.auth_required and config.http2
    assert hashes["alice"] not in repr(config)
    server, app = serve(config)
    ctx = client_ctx(pki, "client")
    status, headers, body = request(server, headers=[("Authorization", basic("prometheus", PASSWORD))], ctx=ctx)
    assert status == 200 and b"webcfg_test_up" in body
    assert headers["Content-Security-Policy"] == "default-src 'self'"
    assert request(server, headers=[("Authorization", basic("prometheus", "nope"))], ctx=ctx)[0] == 401
    assert request(server, "/-/healthy", ctx=ctx)[0] == 401
    assert app.calls == ["/metrics"]


def test_bcrypt_prefixes_and_the_cache(hashes):
    base = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    for prefix in ("$2a$", "$2b$", "$2y$"):
        config = WebConfig(users={"alice": prefix + base[4:]})
        assert config.check(basic("alice", PASSWORD)), prefix
        assert not config.check(basic("alice", PASSWORD + "!")), prefix
    config = WebConfig(users=hashes)
    good = basic("alice", PASSWORD)
    for _ in range(3):  # the second and third are cache hits
        assert config.check(good)
        assert not config.check(basic("alice", "wrong"))
        assert not config.check(basic("bob", PASSWORD))
        assert not config.check(basic("mallory", PASSWORD))
        assert not config.check(None)
    # A new config (a reload with another hash) never sees the old cache.
    rotated = WebConfig(users={"alice": bcrypt.hashpw(b"new-password", bcrypt.gensalt(4)).decode()})
    assert not rotated.check(good)
    assert rotated.check(basic("alice", "new-password"))
    # The cache is bounded and evicts; evicted entries are simply checked again.
    many = WebConfig(users={"alice": hashes["alice"]})
    for i in range(150):
        assert not many.check(basic("alice", f"guess-{i}"))
    assert many.check(good) and many.check(good)
    assert WebConfig().check(None)  # no users: no auth


def test_rate_limit_and_config_swap(tmp_path, hashes, pki, serve):
    text = users_block({"alice": hashes["alice"]}) + "rate_limit:\n  interval: 1h\n  burst: 3\n"
    server, _ = serve(load_web_config(write(tmp_path, text)))
    good = [("Authorization", basic("alice", PASSWORD))]
    assert [request(server, headers=good)[0] for _ in range(4)] == [200, 200, 200, 429]
    server.set_web_config(load_web_config(write(tmp_path, users_block({"bob": hashes["bob"]}), "b.yml")))
    assert request(server, headers=good)[0] == 401
    assert request(server, headers=[("Authorization", basic("bob", OTHER_PASSWORD))])[0] == 200
    with pytest.raises(ValueError, match="HTTP and HTTPS"):
        server.set_web_config(load_web_config(write(tmp_path, tls_block(pki), "tls.yml")))


# --- bad files -----------------------------------------------------------------------------------

BAD = [
    ("unknown top-level key", "tls_config:\n  cert_file: x\n", "tls_config", "unknown key"),
    ("unknown nested key", "{tls}  certfile: x\n", "tls_server_config.certfile", "unknown key"),
    ("missing cert file", "tls_server_config:\n  cert_file: missing.crt\n  key_file: {key}\n",
     "tls_server_config.cert_file", "no such file: {dir}/missing.crt"),
    ("missing key", "tls_server_config:\n  cert_file: {crt}\n", "tls_server_config.key_file", "missing"),
    ("cert and cert_file", "{tls}  cert: x\n", "tls_server_config.cert", "not both"),
    ("bad client_auth_type", "{tls}  client_auth_type: RequireCert\n", "tls_server_config.client_auth_type",
     "unknown value"),
    ("unverifiable client_auth_type", "{tls}  client_auth_type: RequireAnyClientCert\n",
     "tls_server_config.client_auth_type", "RequireAndVerifyClientCert"),
    ("CA without client auth", "{tls}  client_ca_file: {ca}\n", "tls_server_config.client_auth_type", "NoClientCert"),
    ("bad min_version", "{tls}  min_version: TLS14\n", "tls_server_config.min_version", "unknown TLS version"),
    ("legacy min_version", "{tls}  min_version: TLS10\n", "tls_server_config.min_version", "TLS10"),
    ("min above max", "{tls}  min_version: TLS13\n  max_version: TLS12\n", "tls_server_config.min_version", "above"),
    ("unknown cipher", "{tls}  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "tls_server_config.cipher_suites[0]",
     "unknown cipher suite"),
    ("3DES cipher", "{tls}  cipher_suites: [TLS_RSA_WITH_3DES_EDE_CBC_SHA]\n", "tls_server_config.cipher_suites[0]",
     "3DES"),
    ("unknown curve", "{tls}  curve_preferences: [CurveP224]\n", "tls_server_config.curve_preferences[0]", "unknown"),
    ("two curves", "{tls}  curve_preferences: [X25519, CurveP256]\n", "tls_server_config.curve_preferences", "one"),
    ("sans without required certs", "{tls}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca}\n"
     "  client_allowed_sans: [a]\n", "tls_server_config.client_allowed_sans", "RequireAndVerifyClientCert"),
    ("setting without TLS", "tls_server_config:\n  min_version: TLS13\n", "tls_server_config.min_version",
     "no effect"),
    ("key does not match", "tls_server_config:\n  cert_file: {crt}\n  key_file: {dir}/client.key\n",
     "tls_server_config.key_file", "does not match"),
    ("encrypted key", "tls_server_config:\n  cert_file: {crt}\n  key_file: {dir}/encrypted.key\n",
     "tls_server_config.key_file", "encrypted"),
    ("header on two lines", "http_server_config:\n  headers:\n    Content-Security-Policy: \"a\\r\\nSet-Cookie: x\"\n",
     "http_server_config.headers.Content-Security-Policy", "single-line"),
    ("cert not PEM", "tls_server_config:\n  cert_file: {dir}/client.ext\n  key_file: {key}\n",
     "tls_server_config.cert_file", "no PEM certificate"),
    ("CA file not PEM", "{tls}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {dir}/client.ext\n",
     "tls_server_config.client_ca_file", "no usable PEM"),
    ("section not a mapping", "tls_server_config: [1, 2]\n", "tls_server_config", "expected a mapping"),
    ("non-bcrypt hash", "basic_auth_users:\n  alice: hunter2\n", "basic_auth_users.alice", "not a bcrypt hash"),
    ("$2x$ hash", "basic_auth_users:\n  alice: '$2x$04$" + "a" * 53 + "'\n", "basic_auth_users.alice",
     "not a bcrypt hash"),
    ("users not a mapping", "basic_auth_users: [alice]\n", "basic_auth_users", "mapping"),
    ("duplicate user", "basic_auth_users:\n  alice: '{hash}'\n  alice: '{hash}'\n", "{path}:3:3",
     "duplicate key 'alice'"),
    ("colon in user", "basic_auth_users:\n  'a:b': '{hash}'\n", "basic_auth_users.a:b", "':'"),
    ("header not allowed", "http_server_config:\n  headers:\n    Server: x\n", "http_server_config.headers.Server",
     "unknown key"),
    ("bad header value", "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
     "http_server_config.headers.X-Frame-Options", "unknown value 'allow'"),
    ("http2 not a bool", "http_server_config:\n  http2: maybe\n", "http_server_config.http2", "true or false"),
    ("bad rate interval", "rate_limit:\n  interval: soon\n  burst: 1\n", "rate_limit.interval", "duration"),
    ("not a mapping", "- tls_server_config\n", "{path}", "expected a mapping"),
    ("bad YAML", "tls_server_config: [\n", "{path}:2:1", "invalid YAML"),
    ("missing file", None, "{path}", "No such file"),
]


@pytest.mark.parametrize(("text", "key", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_files_name_the_key_in_one_line(tmp_path, pki, hashes, text, key, words):
    subst = {"tls": tls_block(pki), "crt": pki / "server.crt", "key": pki / "server.key", "ca": pki / "ca.crt",
             "dir": pki, "hash": hashes["alice"], "path": tmp_path / "web.yml"}
    path = str(tmp_path / "web.yml")
    if text is not None:
        path = write(pki if "missing.crt" in text else tmp_path, text.format(**subst))
        subst["path"] = path
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key.format(**subst) + ": "), message
    assert words.format(**subst) in message, message
    assert "hunter2" not in message and hashes["alice"] not in message


def test_empty_file_and_go_duration_forms(tmp_path):
    config = load_web_config(write(tmp_path, "# nothing configured\n"))
    assert not config.tls_enabled and not config.auth_required and config.ssl_context() is None
    for text, seconds in (("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0), ("100000000", 0.1)):
        config = load_web_config(write(tmp_path, f"rate_limit:\n  interval: {text}\n  burst: 5\n"))
        assert config.rate_limit == (pytest.approx(seconds), 5)
    assert load_web_config(write(tmp_path, "rate_limit:\n  interval: 0\n")).rate_limit is None


def test_every_schema_problem_one_line_each_and_no_aliases(tmp_path):
    """Types, unknown keys and unknown names are all reported at once; aliases are refused as in the daemon config."""
    text = ("tls_server_config:\n  min_version: TLS14\n  cipher_suites: [TLS_X, TLS_RSA_WITH_AES_128_CBC_SHA]\n"
            "http_server_config: {http2: maybe, gzip: true}\nrate_limit: {interval: soon, burst: -1}\n")
    with pytest.raises(WebConfigError) as info:
        load_web_config(write(tmp_path, text))
    assert [p.split(": ")[0] for p in info.value.problems] == [
        "tls_server_config.min_version", "tls_server_config.cipher_suites[0]", "http_server_config.gzip",
        "http_server_config.http2", "rate_limit.interval", "rate_limit.burst"]
    assert str(info.value).count("\n") == 5
    with pytest.raises(WebConfigError, match="aliases"):
        load_web_config(write(tmp_path, "x: &h nosniff\nhttp_server_config: {headers: {X-Frame-Options: *h}}\n"))
    for text in ("25h", "-1s", ".inf"):
        with pytest.raises(WebConfigError, match="rate_limit.interval: must"):
            load_web_config(write(tmp_path, f"rate_limit:\n  interval: {text}\n  burst: 1\n"))


# --- listen addresses and the server's lifecycle --------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    (":9188", ("", 9188)), ("127.0.0.1:9188", ("127.0.0.1", 9188)), ("[::1]:9188", ("::1", 9188)),
    ("localhost:0", ("localhost", 0)), ("0.0.0.0:65535", ("0.0.0.0", 65535)), ("[::]:80", ("::", 80)),
])
def test_parse_listen_address(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "9188", "127.0.0.1", ":", ":http", ":65536", ":-1", "::1:9188", "[::1]",
                                  "[::1]9188", "[nothost]:9188", "[::1:9188", "http://127.0.0.1:9188", " :9188"])
def test_parse_listen_address_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_listen_address(text)
    assert "\n" not in str(info.value)


def test_shutdown_closes_the_socket_and_ipv6_works(serve):
    app = App()
    server = serve_wsgi(app, "127.0.0.1", 0)
    assert request(server)[0] == 200
    server.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    try:
        v6 = serve_wsgi(app, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert v6.url == f"http://[::1]:{v6.port}"
        conn = http.client.HTTPConnection("::1", v6.port, timeout=10)
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        v6.shutdown()
    with pytest.raises(OSError, match="cannot listen"):
        held = serve_wsgi(app, "127.0.0.1", 0)
        try:
            serve_wsgi(app, "127.0.0.1", held.port)
        finally:
            held.shutdown()
