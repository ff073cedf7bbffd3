"""ACME end to end against a real ACME server on loopback: Debian's ``pebble``,
with ``pebble-challtestsrv`` as its DNS server so that every test host name
resolves to 127.0.0.1 and pebble really validates HTTP-01 against our HTTP-01
server and TLS-ALPN-01 against a TLS server of ours.

Nothing is mocked.  Every wait is bounded; pebble and challtestsrv are killed
in teardown.  Skipped (with the reason) only where pebble is not installed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.request

import pytest

pytest.importorskip("acme", reason="certbot's acme package is not installed")
trustme = pytest.importorskip("trustme", reason="trustme is not installed")

from cryptography import x509  # noqa: E402

from httptp import acme as hacme  # noqa: E402
from httptp.certstore import AutocertStore, client_hello_alpn, offers_acme_tls  # noqa: E402
from tests.helpers import HttpTp, Upstream, free_port, wait_until  # noqa: E402

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(PEBBLE is None or CHALLTESTSRV is None,
                       reason="pebble / pebble-challtestsrv not installed "
                              "(apt-get install pebble; `make test` does it as root)"),
]


def wait_for(pred, timeout: float, step: float = 0.05, what: str = "condition"):
    value = wait_until(pred, timeout, step)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Pebble:
    """pebble + pebble-challtestsrv (DNS: every name is 127.0.0.1) on free ports."""

    def __init__(self, tmp_path, http_port: int, tls_port: int, *,
                 validity: int | None = None, always_valid: bool = False) -> None:
        self.dir = tmp_path / "pebble"
        self.dir.mkdir()
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        server.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        ca.cert_pem.write_to_path(str(self.dir / "ca.pem"))
        self.ca_file = str(self.dir / "ca.pem")
        self.port, self.mgmt_port, self.dns_port = free_port(), free_port(), free_port()
        conf = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.dir / "cert.pem"),
            "privateKey": str(self.dir / "key.pem"),
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}
        if validity:
            conf["pebble"]["certificateValidityPeriod"] = validity
        (self.dir / "pebble.json").write_text(json.dumps(conf))
        self.procs: list[subprocess.Popen] = []
        self.log = open(self.dir / "log.txt", "wb")
        self.procs.append(subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "",
             "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0",
                   PEBBLE_AUTHZREUSE="0")
        if always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        self.procs.append(subprocess.Popen(
            [PEBBLE, "-config", str(self.dir / "pebble.json"),
             "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        try:
            wait_for(lambda: _port_open(self.port) and _port_open(self.mgmt_port), 15,
                     what="pebble to listen")
        except AssertionError:
            self.close()
            raise AssertionError("pebble did not start:\n" + self.output())
        self.directory = f"https://127.0.0.1:{self.port}/dir"

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "log.txt").read_text(errors="replace")

    def _get(self, path: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}{path}",
                                    context=ctx, timeout=5) as r:
            return r.read()

    def root_pem(self) -> bytes:
        """Pebble's issuing root (regenerated at every start)."""
        return self._get("/roots/0")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


@pytest.fixture
def pebble_factory(tmp_path):
    started = []

    def start(http_port: int, tls_port: int, **kw) -> Pebble:
        p = Pebble(tmp_path, http_port, tls_port, **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        p.close()


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def _leaf(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())[0]


def _manager(cache, pebble, **kw) -> hacme.AcmeManager:
    lines: list[str] = []
    kw.setdefault("log", lines.append)
    m = hacme.AcmeManager(str(cache), directory_url=pebble.directory,
                          directory_ca=pebble.ca_file, **kw)
    m.lines = lines   # type: ignore[attr-defined]
    return m


# -- the ACME logic directly --------------------------------------------------------

def test_http01_order_validated_by_pebble_against_our_http01_server(tmp_path, pebble_factory):
    sock = _listen()
    server = hacme.ChallengeHTTPServer(sock, https_port=8443)
    server.start()
    try:
        pebble = pebble_factory(sock.getsockname()[1], free_port())
        cache = tmp_path / "cache"
        m = _manager(cache, pebble, http_server=server, challenges=["http-01"],
                     email="ops@example.org")
        path = m.obtain("www.test-http.example")
        assert path == str(cache / "www.test-http.example")
        leaf = _leaf(path)
        assert hacme.cert_names(leaf) == ["www.test-http.example"]
        assert hacme.read_bundle(path) is not None            # key matches the leaf
        # the cache is private
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(cache / hacme.ACCOUNT_KEY).st_mode) == 0o600
        assert not server.tokens, "the token is withdrawn after the order"
        # A second manager on the same cache reuses the account (no new registration).
        m2 = _manager(cache, pebble, http_server=server, challenges=["http-01"])
        m2.obtain("two.test-http.example")
        assert not any("registered" in line for line in m2.lines), m2.lines
    finally:
        server.shutdown()
        sock.close()


def test_http01_server_redirects_get_and_refuses_other_methods(tmp_path):
    sock = _listen()
    server = hacme.ChallengeHTTPServer(sock, https_port=8443)
    server.tokens["tok123"] = "tok123.thumb"
    server.start()
    try:
        port = sock.getsockname()[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/.well-known/acme-challenge/tok123", headers={"Host": "a.example"})
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"tok123.thumb")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/.well-known/acme-challenge/nope", headers={"Host": "a.example"})
        assert conn.getresponse().status == 404
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/some/path?q=1", headers={"Host": "a.example:80"})
        r = conn.getresponse()
        assert r.status == 301
        assert r.getheader("Location") == "https://a.example:8443/some/path?q=1"
        # other methods are refused, not redirected (as Go's autocert does)
        for method in ("POST", "PUT", "OPTIONS", "PROPFIND"):
            assert _http01_request(port, method, "/form") == (400, b"use https\n", None)
    finally:
        server.shutdown()
        sock.close()


def _http01_request(port: int, method: str, path: str, host: str = "a.example"):
    """(status, body, Location) of one request with a small body on the HTTP-01 port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"user=ops&secret=x", headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read(), r.getheader("Location")
    finally:
        conn.close()


def test_tls_alpn01_order_validated_by_pebble(tmp_path, pebble_factory):
    """Pebble validates our RFC 8737 certificate, served through AutocertStore's
    challenge_context by a small TLS server when the client offers acme-tls/1."""
    tls_sock = _listen()
    tls_port = tls_sock.getsockname()[1]
    pebble = pebble_factory(free_port(), tls_port)
    cache = tmp_path / "cache"
    m = _manager(cache, pebble, challenges=["tls-alpn-01"])
    store = AutocertStore(str(cache), "^.*$", make_context=_server_context)
    seen = []
    stop = threading.Event()

    def serve():
        tls_sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = tls_sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                hello = conn.recv(4096, socket.MSG_PEEK)
                alpn = client_hello_alpn(hello)
                seen.append(alpn)
                base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

                def sni(sslsock, name, _ctx):
                    ctx = store.challenge_context(name) if offers_acme_tls(hello) else None
                    if ctx is not None:
                        sslsock.context = ctx
                base.sni_callback = sni
                base.set_alpn_protocols(["acme-tls/1"])
                with base.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        path = m.obtain("alpn.test-tls.example")
        assert hacme.cert_names(_leaf(path)) == ["alpn.test-tls.example"]
        assert ["acme-tls/1"] in seen, seen
        assert not os.listdir(cache / hacme.ALPN_DIR), "the challenge is withdrawn"
    finally:
        stop.set()
        thread.join(5)
        tls_sock.close()


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_tls_alpn01_certificate_has_the_rfc8737_shape():
    import hashlib
    pem = hacme.tls_alpn_01_certificate("x.example", "tok.thumb")
    cert = x509.load_pem_x509_certificate(pem)
    ext = cert.extensions.get_extension_for_oid(hacme.ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    assert hacme.cert_names(cert) == ["x.example"]


def test_renewal_decision_and_backoff(tmp_path, pebble_factory):
    sock = _listen()
    server = hacme.ChallengeHTTPServer(sock)
    server.start()
    try:
        pebble = pebble_factory(sock.getsockname()[1], free_port())
        cache = tmp_path / "cache"
        m = _manager(cache, pebble, http_server=server, renew_before=3600.0)
        host = "renew.test-http.example"
        old = _leaf(m.obtain(host))
        m.run_once()
        assert m.orders == 1, "a fresh certificate is not renewed"
        # A renewal window longer than the lifetime: due at once, but at most
        # once per renew_min_gap for a host this process just renewed.
        m2 = _manager(cache, pebble, http_server=server,
                      renew_before=100 * 365 * 86400.0, renew_min_gap=3600.0)
        m2.run_once()
        assert m2.orders == 1
        new = _leaf(str(cache / host))
        assert new.serial_number != old.serial_number
        m2.run_once()
        assert m2.orders == 1
        assert any("not shorter than the lifetime" in line for line in m2.lines)
        # A failing order backs off and keeps the old certificate.
        m3 = hacme.AcmeManager(str(cache), directory_url=f"https://127.0.0.1:{free_port()}/dir",
                               directory_ca=pebble.ca_file, renew_before=100 * 365 * 86400.0,
                               http_server=server, log=(lines := []).append)
        m3.run_once()
        m3.run_once()
        assert m3.orders == 0 or m3.orders == 1
        assert sum("failed" in line for line in lines) == 1, lines
        assert "keeps serving" in lines[-1]
        assert _leaf(str(cache / host)).serial_number == new.serial_number
    finally:
        server.shutdown()
        sock.close()


def test_requests_from_workers_are_served_by_the_helper_loop(tmp_path, pebble_factory):
    """AutocertStore (worker side) asks; AcmeManager.run() (helper side) orders."""
    sock = _listen()
    server = hacme.ChallengeHTTPServer(sock)
    server.start()
    pebble = pebble_factory(sock.getsockname()[1], free_port())
    cache = tmp_path / "cache"
    m = _manager(cache, pebble, http_server=server)
    thread = threading.Thread(target=m.run, daemon=True)
    thread.start()
    try:
        loaded = []

        def make(cert, key):
            loaded.append(cert)
            return _server_context(cert, key)
        store = AutocertStore(str(cache), r"\.test-http\.example$", make_context=make,
                              request_timeout=30)
        assert store.context_for("other.example") is None        # not matching: no order
        ctx = store.context_for("Req.Test-HTTP.example")
        assert isinstance(ctx, ssl.SSLContext)
        assert store.context_for("req.test-http.example") is ctx   # cached
        assert m.orders == 1
        assert not os.listdir(cache / hacme.REQUESTS_DIR)
        # a renewed file is picked up (after the once-a-second check)
        hacme.write_atomic(str(cache / "req.test-http.example"),
                           open(cache / "req.test-http.example", "rb").read())
        time.sleep(1.1)
        assert store.context_for("req.test-http.example") is not ctx
        assert len(loaded) == 2
    finally:
        m.stop()
        thread.join(10)
        server.shutdown()
        sock.close()


# -- end to end through the real `httptp -inType=https` ---------------------------------

def _https_get(port: int, host: str, root_pem: bytes, timeout: float = 10.0):
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                                server_hostname=host)
    try:
        conn.request("GET", "/", headers={"Host": host})
        r = conn.getresponse()
        body = r.read()
        serial = x509.load_der_x509_certificate(conn.sock.getpeercert(True)).serial_number
        return r.status, body, serial
    finally:
        conn.close()


def _autocert_args(cache, pebble, https_port, http_port, *extra):
    """httptp's autocert flags; ``pebble`` None: a directory URL where nothing listens."""
    directory = pebble.directory if pebble else f"https://127.0.0.1:{free_port()}/dir"
    ca = (f"-autocertDirectoryCA={pebble.ca_file}",) if pebble else ()
    return (f"-in=127.0.0.1:{https_port}", "-inType=https",
            f"-autocertCacheDir={cache}", f"-autocertDirectory={directory}", *ca,
            f"-autocertHTTPAddr=127.0.0.1:{http_port}",
            r"-autocertHostRegexp=\.test-e2e\.example$", *extra)


def test_httptp_obtains_reuses_and_renews(tmp_path, pebble_factory):
    up = Upstream(name="backend")
    https_port, http_port = free_port(), free_port()
    pebble = pebble_factory(http_port, https_port)
    root = pebble.root_pem()
    cache = tmp_path / "cache"
    host = "site.test-e2e.example"
    base = _autocert_args(cache, pebble, https_port, http_port, f"-out={up.addr}",
                          "-outType=http")
    try:
        # 1. a first request for a new host name obtains a certificate
        with HttpTp(*base, workers=2) as p:
            status, body, serial1 = _https_get(https_port, host, root, timeout=60)
            assert (status, body) == (200, b"backend")
            assert p.output.count("ordering a certificate for") == 1, p.output
            # plain http: redirected to https
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
            conn.request("GET", "/x", headers={"Host": host})
            r = conn.getresponse()
            assert r.status == 301 and r.getheader("Location") == \
                f"https://{host}:{https_port}/x"
        # 2. a restart reuses the cache: no new order
        with HttpTp(*base, workers=2) as p:
            status, _, serial2 = _https_get(https_port, host, root)
            assert status == 200 and serial2 == serial1
            time.sleep(1.0)
            assert "ordering a certificate for" not in p.output, p.output
        # 3. a renewal window longer than the lifetime: renewed while traffic flows
        with HttpTp(*base, "-autocertRenewBefore=1000000h", workers=2) as p:
            stop = threading.Event()
            results: list = []

            def client():
                while not stop.is_set():
                    try:
                        results.append(_https_get(https_port, host, root, timeout=5))
                    except Exception as err:       # noqa: BLE001 - counted below
                        results.append(err)
                    time.sleep(0.02)
            t = threading.Thread(target=client, daemon=True)
            t.start()
            try:
                wait_for(lambda: any(isinstance(r, tuple) and r[2] != serial1 for r in results),
                         60, what="the renewed certificate to be served")
            finally:
                stop.set()
                t.join(10)
            errors = [r for r in results if not isinstance(r, tuple) or r[0] != 200]
            assert not errors, errors[:3]
            assert p.output.count("ordering a certificate for") == 1, p.output
    finally:
        up.close()


def test_httptp_obtains_through_tls_alpn_01(tmp_path, pebble_factory):
    """No HTTP-01 address: the helper orders with TLS-ALPN-01, and pebble
    validates against httptp's own https port, where the worker peeks the
    ClientHello and answers acme-tls/1 with the challenge certificate."""
    up = Upstream(name="alpn-backend")
    https_port, http_port = free_port(), free_port()
    pebble = pebble_factory(http_port, https_port)
    root = pebble.root_pem()
    cache = tmp_path / "cache"
    host = "alpn.test-e2e.example"
    args = [a for a in _autocert_args(cache, pebble, https_port, http_port, f"-out={up.addr}",
                                      "-outType=http") if not a.startswith("-autocertHTTPAddr=")]
    try:
        with HttpTp(*args, "-autocertHTTPAddr=", workers=2) as p:
            status, body, _ = _https_get(https_port, host, root, timeout=60)
            assert (status, body) == (200, b"alpn-backend")
            assert "Traceback" not in p.output
    finally:
        up.close()


def _handshake(port: int, host: str, timeout: float = 20.0) -> OSError | None:
    """One TLS handshake with SNI ``host`` (certificate not checked): None if it
    completed, else the error (an ssl.SSLError carrying the server's alert, a timeout)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
    except OSError as err:
        return err


def _reason(err) -> str:
    return getattr(err, "reason", None) or repr(err)


def test_failed_order_fails_handshakes_at_once_during_its_backoff(tmp_path, pebble_factory):
    """A new user's mistake, a wrong -autocertDirectoryCA: the order fails in
    milliseconds, and every handshake for the name during the back-off (30 s)
    fails at once with the alert of a name that has no certificate, as Go's
    autocert returns the order's error.  One log line for the name (rate-limited),
    plus the helper's own.  No order without a client asking; the first
    handshake after the back-off starts a new one."""
    https_port, http_port = free_port(), free_port()
    pebble = pebble_factory(http_port, https_port)
    wrong_ca = tmp_path / "not-pebbles-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    host = "app.test-e2e.example"
    args = [a for a in _autocert_args(tmp_path / "cache", pebble, https_port, http_port)
            if not a.startswith("-autocertDirectoryCA=")]
    # One worker: each worker rate-limits its own lines.
    with HttpTp(*args, f"-autocertDirectoryCA={wrong_ca}", "-out=127.0.0.1:9",
                "-outType=http", workers=1) as p:
        no_cert = _handshake(https_port, "other.example")    # outside the regexp
        assert isinstance(no_cert, ssl.SSLError), no_cert
        started = time.monotonic()
        errors = [_handshake(https_port, host) for _ in range(3)]
        took = time.monotonic() - started
        assert [_reason(e) for e in errors] == [_reason(no_cert)] * 3, errors
        assert took < 15, f"3 handshakes took {took:.1f} s during a 30 s back-off"
        failed = f"order for {host} failed"
        wait_for(lambda: f"{failed} (1 in a row)" in p.output, 5, what="the helper's line")
        failed_at = time.monotonic()

        def host_lines() -> list[str]:
            return [line for line in p.lines if host in line]
        lines = wait_for(lambda: len(host_lines()) >= 2 and host_lines(), 5, what="the refusal")
        assert len(lines) == 2, p.output            # the helper's, and one refusal
        assert sum("retrying in 30 s" in line for line in lines) == 1, p.output
        # Past the back-off, nobody asked: no order.  The next handshake asks.
        time.sleep(max(0.0, failed_at + 32 - time.monotonic()))
        assert f"{failed} (2 in a row)" not in p.output, p.output
        asked = time.monotonic()
        assert _reason(_handshake(https_port, host)) == _reason(no_cert)
        assert time.monotonic() - asked < 15
        wait_for(lambda: f"{failed} (2 in a row)" in p.output, 5, what="a new order")
        assert "retrying in 60 s" in p.output
        # still one refusal line: the others are counted for the next minute's line
        assert len(host_lines()) == 3, p.output
        assert "Traceback" not in p.output


def test_http01_port_redirects_get_and_refuses_post(tmp_path):
    """The real command's HTTP-01 port: GET is redirected to https, a POST is
    refused with 400 (a redirect would lose its body or resend it), not 501."""
    https_port, http_port = free_port(), free_port()
    args = _autocert_args(tmp_path / "cache", None, https_port, http_port)
    with HttpTp(*args, "-out=127.0.0.1:9", "-outType=http", workers=1) as p:
        wait_for(lambda: "answering HTTP-01" in p.output, 15, what="the HTTP-01 server")
        host = "site.test-e2e.example"
        assert _http01_request(http_port, "GET", "/x?y=1", host) == \
            (301, b"use https\n", f"https://{host}:{https_port}/x?y=1")
        assert _http01_request(http_port, "POST", "/form", host) == (400, b"use https\n", None)
        assert "Traceback" not in p.output


# -- the master's ACME helper (stub workers: no TLS wiring needed) ------------------------

STUB = os.path.join(os.path.dirname(__file__), "..", "process", "stub_worker.py")


class StubMaster:
    """``tests/process/stub_worker.py``: the real Arbiter (and its helpers), stub workers."""

    def __init__(self, *args: str) -> None:
        import sys
        self.proc = subprocess.Popen([sys.executable, STUB, "-workers=2", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def helper_pid(self) -> int | None:
        import re
        for line in reversed(self.lines):
            m = re.search(r"acme helper \(pid (\d+)\) started", line)
            if m:
                return int(m.group(1))
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
        try:
            return self.proc.wait(15)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_master_runs_one_acme_helper_that_orders_respawns_and_stops(tmp_path, pebble_factory):
    https_port, http_port = free_port(), free_port()
    pebble = pebble_factory(http_port, https_port)
    cache = tmp_path / "cache"
    args = (f"-in=127.0.0.1:{https_port}", "-inType=https", "-out=127.0.0.1:9",
            "-outType=http", f"-autocertCacheDir={cache}",
            f"-autocertDirectory={pebble.directory}", f"-autocertDirectoryCA={pebble.ca_file}",
            f"-autocertHTTPAddr=127.0.0.1:{http_port}", r"-autocertHostRegexp=\.test-m\.example$")
    master = StubMaster(*args)
    try:
        wait_for(master.helper_pid, 15, what="the acme helper to start")
        wait_for(lambda: "answering HTTP-01" in master.output, 15, what="HTTP-01 server")
        # two "workers" ask for the same host at once: one order
        store1 = AutocertStore(str(cache), r"\.test-m\.example$", make_context=_server_context)
        store2 = AutocertStore(str(cache), r"\.test-m\.example$", make_context=_server_context)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("c", store2.context_for("a.test-m.example")))
        t.start()
        assert isinstance(store1.context_for("a.test-m.example"), ssl.SSLContext), master.output
        t.join(35)
        assert isinstance(box.get("c"), ssl.SSLContext)
        assert master.output.count("ordering a certificate for a.test-m.example") == 1, \
            master.output
        # the HTTP-01 port redirects other requests to https on -in's port
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        conn.request("GET", "/p", headers={"Host": "a.test-m.example"})
        r = conn.getresponse()
        assert (r.status, r.getheader("Location")) == (301, f"https://a.test-m.example:{https_port}/p")
        # a dead helper is respawned (and still answers on the port the master holds)
        old = master.helper_pid()
        os.kill(old, 9)
        wait_for(lambda: master.helper_pid() not in (None, old), 15, what="a new acme helper")
        assert isinstance(store1.context_for("b.test-m.example"), ssl.SSLContext), master.output
        # TERM stops the master, its workers and the helper
        helper = master.helper_pid()
        assert master.stop() == 0, master.output
        assert not _alive(helper)
    finally:
        master.kill()
    # a restart reuses the cache: no order
    master = StubMaster(*args)
    try:
        wait_for(lambda: "answering HTTP-01" in master.output, 15, what="HTTP-01 server")
        store = AutocertStore(str(cache), r"\.test-m\.example$", make_context=_server_context)
        assert isinstance(store.context_for("a.test-m.example"), ssl.SSLContext)
        time.sleep(1.0)
        assert "ordering" not in master.output, master.output
        assert master.stop() == 0
    finally:
        master.kill()


def test_master_without_autocert_starts_no_helper(tmp_path):
    master = StubMaster("-in=127.0.0.1:0", "-inType=http", "-out=127.0.0.1:9", "-outType=http",
                        f"-autocertCacheDir={tmp_path / 'cache'}")
    try:
        wait_for(lambda: "listening on" in master.output, 15, what="the master")
        time.sleep(0.5)
        assert "acme helper" not in master.output
        assert not (tmp_path / "cache").exists()
        assert master.stop() == 0
    finally:
        master.kill()


def _client_hello(alpn: list[str]) -> bytes:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="x.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_client_hello_alpn_parser():
    """The ClientHello peek a worker can use to tell a TLS-ALPN-01 validation apart."""
    hello = _client_hello(["acme-tls/1"])
    assert client_hello_alpn(hello) == ["acme-tls/1"]
    assert offers_acme_tls(hello)
    hello = _client_hello(["h2", "http/1.1"])
    assert client_hello_alpn(hello) == ["h2", "http/1.1"]
    assert not offers_acme_tls(hello)
    assert client_hello_alpn(b"GET / HTTP/1.1\r\n") is None
    assert client_hello_alpn(hello[:20]) is None
