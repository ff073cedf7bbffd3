"""TLS on both ends through the real `httptp` command, on real sockets.

Certificates are made at test time with trustme (nothing committed):

    client ──https──▶ httptp ──http──▶ upstream
    client ──http──▶ httptp ──https──▶ TLS upstream
    client ──http──▶ A ──teleports──▶ B ──http──▶ upstream
"""

from __future__ import annotations

import datetime
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

trustme = pytest.importorskip("trustme")

from tests.helpers import HttpTp, Reply, Upstream, build_response, get, load, read_http_message, \
    run_httptp  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- fixtures

class Certs:
    """A CA and files for a few certificates, in a temporary directory."""

    def __init__(self, tmp):
        self.dir = tmp
        self.ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem)
        self.other_ca = trustme.CA()
        self.other_ca_file = self.write("other-ca.pem", self.other_ca.cert_pem)

    def write(self, name, blob) -> str:
        path = str(self.dir / name)
        blob.write_to_path(path)
        return path

    def issue(self, name, *names, ca=None, **kw) -> tuple[str, str]:
        cert = (ca or self.ca).issue_cert(*(names or ("localhost", "127.0.0.1")), **kw)
        cert_file = str(self.dir / f"{name}.pem")
        with open(cert_file, "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        key_file = self.write(f"{name}.key", cert.private_key_pem)
        return cert_file, key_file

    def client_context(self, **kw) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        for k, v in kw.items():
            setattr(ctx, k, v)
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server_pair(certs):
    return certs.issue("server", "localhost", "127.0.0.1")


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.close()


def tls_args(pair):
    return [f"-inTLSCert={pair[0]}", f"-inTLSKey={pair[1]}"]


def https_get(port, ctx, path="/", server_hostname="localhost", session=None):
    """One request on a new TLS connection: (response bytes, session, session_reused)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t = ctx.wrap_socket(s, server_hostname=server_hostname, session=session)
    try:
        t.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        data = b""
        while True:
            chunk = t.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, t.session, t.session_reused
    finally:
        t.close()


def no_traceback(proc: HttpTp):
    assert "Traceback" not in proc.output and "internal error" not in proc.output, proc.output


class TLSUpstream(Upstream):
    """The recording Upstream behind TLS (optionally requiring a client certificate)."""

    def __init__(self, pair, client_ca=None, **kw):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pair)
        if client_ca:
            self.ctx.load_verify_locations(client_ca)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        super().__init__(**kw)

    def _serve(self, c):
        try:
            c.settimeout(5)
            c = self.ctx.wrap_socket(c, server_side=True)
            c.settimeout(None)
        except (OSError, ssl.SSLError):
            c.close()
            return
        super()._serve(c)


# --------------------------------------------------------------------------- https in

def test_https_in_to_http_upstream(certs, server_pair, upstream):
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}") as p:
        ctx = certs.client_context()
        ctx.set_alpn_protocols(["http/1.1"])
        c = http.client.HTTPSConnection("localhost", p.port, context=ctx, timeout=5)
        status, _, body = get(c, "/a")
        assert status == 200 and body == b"up"
        assert c.sock.version() in ("TLSv1.3", "TLSv1.2")
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        status, _, body = get(c, "/b", method="POST", body=b"x" * 100000)   # keep-alive
        assert status == 200
        c.close()
    no_traceback(p)


def test_https_handshake_does_not_block_the_worker(certs, server_pair, upstream):
    """A client stuck mid-handshake must not stop one worker from serving others."""
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", workers=1) as p:
        stuck = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(5)]
        for s in stuck:
            s.sendall(b"\x16\x03\x01")          # the start of a ClientHello, then nothing
        t0 = time.monotonic()
        data = https_get(p.port, certs.client_context())[0]
        assert data.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 2
        for s in stuck:
            s.close()


def test_scanner_garbage_and_plaintext_on_https_port(certs, server_pair, upstream):
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", "-inHeaderTimeout=1s", "-logAllErrors", workers=1) as p:
        # plain HTTP: nginx's 400, then close
        s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 400 ") and b"plain HTTP request was sent to HTTPS" in data
        # garbage that looks like a TLS record, and garbage that does not
        for junk in (b"\x16\x03\x01\x00\x10" + os.urandom(16), b"\x00\xff" * 20):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            s.sendall(junk)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            s.close()
        # a client that never finishes its handshake is cut by -inHeaderTimeout
        s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        s.sendall(b"\x16\x03\x01")
        t0 = time.monotonic()
        try:
            assert s.recv(4096) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 4
        s.close()
        # still serving
        data = https_get(p.port, certs.client_context())[0]
        assert data.startswith(b"HTTP/1.1 200")
    no_traceback(p)
    assert "stopped: 1 requests served" in p.output
    failed = [l for l in p.lines if "TLS handshake failed" in l]   # one counted failure each
    assert len(failed) == 4, p.output
    assert "plain HTTP request" in failed[0] and "timed out" in failed[-1]


def test_sni_picks_the_certificate(certs, tmp_path):
    a = certs.issue("sni-a", "a.example", "localhost")
    b = certs.issue("sni-b", "*.b.example")
    up = Upstream()
    try:
        with HttpTp("-inType=https", f"-inTLSCert={a[0]},{b[0]}", f"-inTLSKey={a[1]},{b[1]}",
                    "-outType=http", f"-out={up.addr}") as p:
            def served_names(sni):
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(certs.ca_file)
                ctx.check_hostname = False
                s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
                t = ctx.wrap_socket(s, server_hostname=sni)
                cert = t.getpeercert()
                t.close()
                return {v for k, v in cert["subjectAltName"] if k == "DNS"}
            assert served_names("a.example") == {"a.example", "localhost"}
            assert served_names("x.b.example") == {"*.b.example"}
            assert served_names("X.B.EXAMPLE") == {"*.b.example"}     # case-insensitive
            assert served_names("y.x.b.example") == {"a.example", "localhost"}  # one label only
            assert served_names("unknown.example") == {"a.example", "localhost"}
            assert served_names(None) == {"a.example", "localhost"}   # no SNI: the default
    finally:
        up.close()


def test_session_resumption_across_workers(certs, server_pair, upstream):
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", workers=2) as p:
        ctx = certs.client_context()
        data, session, _ = https_get(p.port, ctx)
        assert session is not None and data.startswith(b"HTTP/1.1 200")
        reused = sum(https_get(p.port, ctx, session=session)[2] for _ in range(20))
        assert reused == 20
    # both workers served some of them (the kernel spreads connections)
    served = p.output.split("per worker block:")[1]
    assert served.count("=") == 2, p.output


def test_ticket_key_shared_by_two_processes(certs, server_pair, upstream):
    args = ["-inType=https", *tls_args(server_pair), "-outType=http", f"-out={upstream.addr}",
            "-inTLSSessionTicketKey=correct horse battery staple"]
    with HttpTp(*args, workers=1) as p1, HttpTp(*args, workers=1) as p2, \
            HttpTp(*args[:-1], "-inTLSSessionTicketKey=other", workers=1) as p3:
        ctx = certs.client_context()
        _, session, _ = https_get(p1.port, ctx)

        def resumed(port):
            return https_get(port, ctx, session=session)[2]
        assert resumed(p2.port) and resumed(p1.port)
        assert not resumed(p3.port)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_versions_and_ciphers(certs, server_pair, upstream):
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", workers=1) as p:
        def handshake(ctx):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            try:
                t = ctx.wrap_socket(s, server_hostname="localhost")
                v = t.version(), t.cipher()[0]
                t.close()
                return v
            except (ssl.SSLError, ConnectionResetError):
                return None
            finally:
                s.close()
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            ctx = certs.client_context()
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.minimum_version = ctx.maximum_version = old
            assert handshake(ctx) is None
        for weak in ("AES128-SHA", "AES256-SHA256", "ECDHE-RSA-AES128-SHA", "DHE-RSA-AES128-GCM-SHA256"):
            ctx = certs.client_context()
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(weak)
            assert handshake(ctx) is None, weak
        ctx = certs.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        version, cipher = handshake(ctx)
        assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA" in cipher)


SSLYZE = shutil.which("sslyze") or ("/tmp/sslyze-venv/bin/sslyze"
                                    if os.path.exists("/tmp/sslyze-venv/bin/sslyze") else None)


@pytest.mark.skipif(SSLYZE is None, reason="sslyze is not installed")
def test_sslyze(certs, server_pair, upstream, tmp_path):
    import json
    with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", workers=1) as p:
        out = tmp_path / "scan.json"
        subprocess.run([SSLYZE, "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2",
                        "--tlsv1_3", f"--json_out={out}", f"localhost:{p.port}"],
                       capture_output=True, timeout=90)
        scan = json.loads(out.read_text())["server_scan_results"][0]["scan_result"]
        for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites",
                    "tls_1_1_cipher_suites"):
            assert scan[old]["result"]["accepted_cipher_suites"] == [], old
        tls12 = [c["cipher_suite"]["name"] for c in
                 scan["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"]]
        assert tls12 and all("ECDHE" in n and ("GCM" in n or "CHACHA20" in n) for n in tls12), tls12
        assert scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]


# --------------------------------------------------------------------------- mutual TLS

@pytest.mark.parametrize("kind", ["https", "teleports"])
def test_mutual_tls_accepted_and_refused(certs, server_pair, upstream, kind):
    good = certs.issue("client-good", "client.example")
    wrong = certs.issue("client-wrong", "client.example", ca=certs.other_ca)
    args = [f"-inType={kind}", *tls_args(server_pair), f"-inTLSClientCA={certs.ca_file}",
            "-outType=http", f"-out={upstream.addr}"]
    with HttpTp(*args, workers=1) as b:
        if kind == "https":
            def fetch(pair):
                ctx = certs.client_context()
                if pair:
                    ctx.load_cert_chain(*pair)
                try:
                    data = https_get(b.port, ctx)[0]
                    return data.startswith(b"HTTP/1.1 200")
                except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                    return False
            assert fetch(good)
            assert not fetch(None)
            assert not fetch(wrong)
        else:
            def fetch(pair):
                extra = [f"-outTLSCert={pair[0]}", f"-outTLSKey={pair[1]}"] if pair else []
                with HttpTp("-outType=teleports", f"-out=localhost:{b.port}",
                            f"-outTLSCA={certs.ca_file}", *extra, workers=1) as a:
                    c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
                    return get(c, "/")[0] == 200
            assert fetch(good)
            assert not fetch(None)
            assert not fetch(wrong)
    no_traceback(b)


# --------------------------------------------------------------------------- https out

def test_https_out_verified(certs, server_pair):
    up = TLSUpstream(server_pair)
    try:
        with HttpTp("-outType=https", f"-out=localhost:{up.port}", f"-outTLSCA={certs.ca_file}",
                    workers=1) as p:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            for i in range(5):
                status, _, body = get(c, f"/{i}")
                assert status == 200 and body == b"up"
            assert up.connections == 1          # kept alive through TLS
        no_traceback(p)
    finally:
        up.close()


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-name"])
def test_https_out_verification_fails(certs, server_pair, case):
    up = TLSUpstream(server_pair)
    args = [f"-outTLSCA={certs.other_ca_file if case == 'wrong-ca' else certs.ca_file}"]
    if case == "wrong-name":
        args.append("-outTLSServerName=not-this-one.example")
    try:
        with HttpTp("-outType=https", f"-out=localhost:{up.port}", "-logAllErrors", *args,
                    workers=1) as p:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            status, _, _ = get(c, "/")
            assert status == 502
            time.sleep(0.2)
        lines = [l for l in p.lines if "TLS handshake with" in l]
        assert len(lines) == 1 and "certificate verify failed" in lines[0], p.output
        assert up.requests == 0
        no_traceback(p)
    finally:
        up.close()


def test_https_out_insecure_warns(certs, server_pair):
    up = TLSUpstream(server_pair)
    try:
        with HttpTp("-outType=https", f"-out=localhost:{up.port}",
                    f"-outTLSCA={certs.other_ca_file}", "-outTLSInsecure", workers=1) as p:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            assert get(c, "/")[0] == 200
        assert sum("-outTLSInsecure" in l and "NOT verified" in l for l in p.lines) == 1
    finally:
        up.close()


def test_https_out_client_certificate(certs, server_pair):
    client = certs.issue("out-client", "client.example")
    up = TLSUpstream(server_pair, client_ca=certs.ca_file)
    try:
        with HttpTp("-outType=https", f"-out=localhost:{up.port}", f"-outTLSCA={certs.ca_file}",
                    f"-outTLSCert={client[0]}", f"-outTLSKey={client[1]}", workers=1) as p:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            assert get(c, "/")[0] == 200
        with HttpTp("-outType=https", f"-out=localhost:{up.port}", f"-outTLSCA={certs.ca_file}",
                    workers=1) as p:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            assert get(c, "/")[0] == 502
    finally:
        up.close()


# --------------------------------------------------------------------------- teleports

@pytest.mark.parametrize("codec", ["flate", "zstd"])
def test_teleports_chain(certs, server_pair, upstream, codec):
    """http → A (teleports out) → B (teleports in, teleports out) → C (teleports in) → http."""
    tls_out = ["-outType=teleports", f"-outTLSCA={certs.ca_file}", f"-outCompress={codec}"]
    c_ = HttpTp("-inType=teleports", *tls_args(server_pair), f"-inCompress={codec}",
                "-outType=http", f"-out={upstream.addr}", workers=1)
    b = HttpTp("-inType=teleports", *tls_args(server_pair), f"-inCompress={codec}",
               *tls_out, f"-out=localhost:{c_.port}", workers=1)
    a = HttpTp(*tls_out, f"-out=localhost:{b.port}", workers=2)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
        assert get(conn, "/x") == (200, {"content-length": "2"}, b"up")
        body = os.urandom(1_000_000)
        status, _, _ = get(conn, "/p", method="POST", body=body)
        assert status == 200 and upstream.received[-1].endswith(body)
        res = load("127.0.0.1", a.port, threads=16, duration=2)
        assert res.failed == 0 and res.ok > 100, res.errors[:3]
    finally:
        for p in (a, b, c_):
            p.__exit__(None, None, None)
    for p in (a, b, c_):
        no_traceback(p)


def test_teleports_big_bodies_both_ways_concurrently(certs, server_pair):
    """Reader and writer greenlets share one TLS socket: large requests and large
    responses in flight at once must not corrupt or stall the stream."""
    big = os.urandom(300_000)
    up = Upstream(handler=lambda m, p, h, b: Reply(body=big + b[:10]))
    b = HttpTp("-inType=teleports", *tls_args(server_pair), "-inCompress=none",
               "-outType=http", f"-out={up.addr}", workers=1)
    a = HttpTp("-outType=teleports", f"-outTLSCA={certs.ca_file}", "-outCompress=none",
               f"-out=localhost:{b.port}", "-outTimeout=20s", workers=1)
    errors = []

    def worker(i):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
            for j in range(5):
                payload = os.urandom(200_000)
                status, _, got = get(conn, "/", method="POST", body=payload)
                if status != 200 or got != big + payload[:10]:
                    errors.append((i, j, status, len(got)))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
    try:
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors[:3]
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        up.close()
    no_traceback(a)
    no_traceback(b)


def test_teleports_refuses_plaintext_unless_allowed(certs, server_pair, upstream):
    for allow in (False, True):
        extra = ["-inTLSAllowPlaintext"] if allow else []
        with HttpTp("-inType=teleports", *tls_args(server_pair), *extra, "-outType=http",
                    f"-out={upstream.addr}", workers=1) as b:
            with HttpTp("-outType=teleport", f"-out=127.0.0.1:{b.port}", workers=1) as a:
                c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
                status = get(c, "/")[0]
            assert status == (200 if allow else 502)
        if not allow:
            assert "did not ask for TLS" in b.output
            assert "requires TLS" in a.output
        no_traceback(b)


def test_plain_teleport_listener_refuses_tls_client(certs, upstream):
    with HttpTp("-inType=teleport", "-outType=http", f"-out={upstream.addr}", workers=1) as b:
        with HttpTp("-outType=teleports", f"-out=localhost:{b.port}",
                    f"-outTLSCA={certs.ca_file}", workers=1) as a:
            c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
            assert get(c, "/")[0] == 502
        assert "asked for TLS" in b.output


def test_teleports_out_wrong_name(certs, server_pair, upstream):
    with HttpTp("-inType=teleports", *tls_args(server_pair), "-outType=http",
                f"-out={upstream.addr}", workers=1) as b:
        with HttpTp("-outType=teleports", f"-out=localhost:{b.port}", f"-outTLSCA={certs.ca_file}",
                    "-outTLSServerName=elsewhere.example", workers=1) as a:
            c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
            assert get(c, "/")[0] == 502
        assert "certificate verify failed" in a.output
        no_traceback(a)
        no_traceback(b)


# --------------------------------------------------------------------------- bad files

def _one_line_exit_2(args, flag):
    r = run_httptp(*args, "-in=127.0.0.1:0", "-outType=http", "-out=127.0.0.1:9")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"httptp: {flag}:"), r.stderr
    assert "listening" not in r.stderr
    return lines[0]


def test_bad_certificate_files_exit_2(certs, server_pair, tmp_path):
    cert, key = server_pair
    other_cert, other_key = certs.issue("other", "localhost")
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = certs.issue("expired", "localhost", not_before=now - datetime.timedelta(days=10),
                          not_after=now - datetime.timedelta(days=1))
    future = certs.issue("future", "localhost", not_before=now + datetime.timedelta(days=1),
                         not_after=now + datetime.timedelta(days=10))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    unreadable = str(tmp_path / "missing.pem")
    https = "-inType=https"
    assert "expired" in _one_line_exit_2([https, *tls_args(expired)], "-inTLSCert")
    assert "not valid before" in _one_line_exit_2([https, *tls_args(future)], "-inTLSCert")
    assert "does not match" in _one_line_exit_2([https, f"-inTLSCert={cert}",
                                                 f"-inTLSKey={other_key}"], "-inTLSKey")
    assert "cannot read" in _one_line_exit_2([https, f"-inTLSCert={unreadable}",
                                              f"-inTLSKey={key}"], "-inTLSCert")
    assert "not a PEM certificate" in _one_line_exit_2([https, f"-inTLSCert={garbage}",
                                                        f"-inTLSKey={key}"], "-inTLSCert")
    assert "not a PEM private key" in _one_line_exit_2([https, f"-inTLSCert={cert}",
                                                        f"-inTLSKey={garbage}"], "-inTLSKey")
    assert "pair up" in _one_line_exit_2([https, f"-inTLSCert={cert},{other_cert}",
                                          f"-inTLSKey={key}"], "-inTLSCert")
    assert "teleports needs a certificate" in _one_line_exit_2(["-inType=teleports"], "-inTLSCert")
    # https without a certificate is autocert (tests/integration/test_acme.py)
    assert "cannot read" in _one_line_exit_2([https, *tls_args(server_pair),
                                              f"-inTLSClientCA={unreadable}"], "-inTLSClientCA")
    r = run_httptp("-outType=https", "-out=127.0.0.1:9", f"-outTLSCert={expired[0]}",
                   f"-outTLSKey={expired[1]}")
    assert r.returncode == 2 and r.stderr.startswith("httptp: -outTLSCert:") and "expired" in r.stderr
    r = run_httptp("-outType=https", "-out=127.0.0.1:9", f"-outTLSCA={garbage}")
    assert r.returncode == 2 and r.stderr.startswith("httptp: -outTLSCA:"), r.stderr
    r = run_httptp(https, *tls_args(server_pair), "-outType=http", "-out=127.0.0.1:9",
                   "-checkConfig")
    assert r.returncode == 0 and "configuration OK" in r.stdout


def test_reload_keeps_old_tls_when_new_certificate_is_bad(certs, tmp_path, upstream):
    cert, key = certs.issue("reload", "localhost")
    conf = tmp_path / "httptp.conf"
    conf.write_text(f"inTLSCert = {cert}\ninTLSKey = {key}\n")
    with HttpTp("-inType=https", f"-config={conf}", "-outType=http", f"-out={upstream.addr}",
                workers=1) as p:
        conf.write_text(f"inTLSCert = {cert}\ninTLSKey = {tmp_path / 'nope.key'}\n")
        p.signal(__import__("signal").SIGHUP)
        deadline = time.monotonic() + 5
        while "reload failed" not in p.output and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed, keeping the running configuration: -inTLSKey: cannot read" in p.output
        data = https_get(p.port, certs.client_context())[0]
        assert data.startswith(b"HTTP/1.1 200")


def test_over_concurrency_on_https_answers_503_inside_tls(certs, server_pair):
    slow = Upstream(handler=lambda m, p, h, b: Reply(delay=1.0))
    try:
        with HttpTp("-inType=https", *tls_args(server_pair), "-outType=http", f"-out={slow.addr}",
                    "-concurrency=1", workers=1) as p:
            ctx = certs.client_context()
            busy = ctx.wrap_socket(socket.create_connection(("127.0.0.1", p.port), timeout=5),
                                   server_hostname="localhost")
            busy.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            data, _, _ = https_get(p.port, ctx)
            assert data.startswith(b"HTTP/1.1 503 "), data
            assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
            busy.close()
            no_traceback(p)
    finally:
        slow.close()
