"""WebSocket through the real `httptp` command: a real `websockets` client and server.

    client ──ws──▶ httptp (http in) ──http──▶ websockets echo server
    client ──wss─▶ httptp (https in, the test CA) ──http──▶ websockets echo server
    client ──ws──▶ A (teleport out) ──teleport──▶ B ──▶ upstream: 501, nothing sent

The request's ``Connection: upgrade`` and ``Upgrade: websocket`` must reach
the upstream, its ``101`` must come back, and from then on the connection is
a byte tunnel both ways (with flow control: a message of several MiB crosses
it), closed cleanly from either end.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

websockets = pytest.importorskip("websockets")
trustme = pytest.importorskip("trustme")

from websockets.exceptions import ConnectionClosedOK, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402
from websockets.sync.server import serve  # noqa: E402

from tests.helpers import HttpTp, Upstream, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(60)

BIG = 3 * 1024 * 1024 + 17          # well over HIGH_WATER and 1 MiB: the tunnel must pause


class EchoServer:
    """A `websockets` echo server in a thread.  A text message ``"close me"``
    makes the server close first (1000, "server bye").  ``closes`` records,
    per connection, the close code the server saw."""

    def __init__(self, compression=None):
        self.closes: list = []
        self.paths: list = []
        self.headers: list = []
        self.lock = threading.Lock()
        self.server = serve(self._handler, "127.0.0.1", 0, compression=compression,
                            max_size=None, ping_interval=None)
        self.port = self.server.socket.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handler(self, ws):
        with self.lock:
            self.paths.append(ws.request.path)
            self.headers.append(ws.request.headers)
        try:
            for message in ws:
                if message == "close me":
                    ws.close(1000, "server bye")
                    break
                ws.send(message)
        finally:
            with self.lock:
                self.closes.append(ws.close_code)

    def close(self):
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(cert, key, client ssl context trusting the test CA)."""
    import ssl
    d = tmp_path_factory.mktemp("ws-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = str(d / "server.pem"), str(d / "server.key")
    with open(cert_file, "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(key_file)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return cert_file, key_file, ctx


def no_traceback(proc: HttpTp):
    assert "Traceback" not in proc.output and "internal error" not in proc.output, proc.output


def _connect(url, ctx=None, **kw):
    kw.setdefault("compression", None)
    return connect(url, ssl=ctx, proxy=None, max_size=None, ping_interval=None,
                   open_timeout=10, close_timeout=10, **kw)


def _echo_round(ws):
    """Several text and binary messages, some sent before any echo is read,
    and one of several MiB each way: every one comes back, in order, intact."""
    for i in range(5):
        ws.send(f"hello {i} ✓")
        assert ws.recv(timeout=10) == f"hello {i} ✓"
    small = [os.urandom(n) for n in (1, 125, 126, 65535, 65536, 200000)]
    for m in small:                      # all in flight before any echo is read
        ws.send(m)
    for m in small:
        got = ws.recv(timeout=10)
        assert isinstance(got, bytes) and got == m
    big = os.urandom(BIG)
    ws.send(big)
    got = ws.recv(timeout=30)
    assert len(got) == BIG and hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    text = "é" * (600 * 1024)            # 1.2 MB of UTF-8 as one text message
    ws.send(text)
    assert ws.recv(timeout=30) == text


def _client_closes(ws, echo):
    ws.close()
    assert ws.close_code == 1000                          # the server's close frame came back
    assert wait_until(lambda: 1000 in echo.closes, 10), echo.closes


def _upstream_closes(ws):
    ws.send("close me")
    with pytest.raises(ConnectionClosedOK):
        ws.recv(timeout=10)
    assert ws.close_code == 1000 and ws.close_reason == "server bye"


# --------------------------------------------------------------------------- http → http

def test_websocket_echo_http_to_http(echo):
    with HttpTp("-outType=http", f"-out={echo.addr}", workers=1) as p:
        with _connect(f"ws://127.0.0.1:{p.port}/chat?room=1") as ws:
            assert ws.response.status_code == 101
            _echo_round(ws)
            _client_closes(ws, echo)
        assert echo.paths == ["/chat?room=1"]
        # the upstream saw a real upgrade request (httptp forwards both headers)
        h = echo.headers[0]
        assert h["Upgrade"].lower() == "websocket" and "upgrade" in h["Connection"].lower()
        # the upstream closes first
        with _connect(f"ws://127.0.0.1:{p.port}/second") as ws:
            ws.send("ping")
            assert ws.recv(timeout=10) == "ping"
            _upstream_closes(ws)
        assert wait_until(lambda: len(echo.closes) == 2, 10)
        # and the proxy still serves new tunnels after both kinds of close
        with _connect(f"ws://127.0.0.1:{p.port}/third") as ws:
            ws.send(b"\x00\x01")
            assert ws.recv(timeout=10) == b"\x00\x01"
    no_traceback(p)


def test_websocket_permessage_deflate_negotiated_through_the_proxy():
    """The extension headers go both ways untouched (compressed frames are just bytes)."""
    server = EchoServer(compression="deflate")
    try:
        with HttpTp("-outType=http", f"-out={server.addr}", workers=1) as p:
            with _connect(f"ws://127.0.0.1:{p.port}/", compression="deflate") as ws:
                assert "permessage-deflate" in ws.response.headers.get(
                    "Sec-WebSocket-Extensions", "")
                msg = "compressible " * 100000
                ws.send(msg)
                assert ws.recv(timeout=10) == msg
                ws.close()
                assert ws.close_code == 1000
        no_traceback(p)
    finally:
        server.close()


def test_websocket_many_tunnels_at_once(echo):
    """Several tunnels through one worker at the same time, each its own stream."""
    with HttpTp("-outType=http", f"-out={echo.addr}", workers=1) as p:
        errors = []

        def run(i):
            try:
                with _connect(f"ws://127.0.0.1:{p.port}/{i}") as ws:
                    payload = os.urandom(300000 + i)
                    for _ in range(3):
                        ws.send(payload)
                        assert ws.recv(timeout=20) == payload
            except Exception as e:          # reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert not errors, errors
        assert wait_until(lambda: len(echo.closes) == 6, 10)
        assert all(code == 1000 for code in echo.closes), echo.closes
    no_traceback(p)


# --------------------------------------------------------------------------- https → http

def test_websocket_echo_https_to_http(echo, tls):
    cert, key, ctx = tls
    with HttpTp("-inType=https", f"-inTLSCert={cert}", f"-inTLSKey={key}", "-outType=http",
                f"-out={echo.addr}", workers=1) as p:
        with _connect(f"wss://localhost:{p.port}/secure", ctx) as ws:
            assert ws.response.status_code == 101
            _echo_round(ws)
            _client_closes(ws, echo)
        with _connect(f"wss://localhost:{p.port}/again", ctx) as ws:
            ws.send(b"x" * 70000)
            assert ws.recv(timeout=10) == b"x" * 70000
            _upstream_closes(ws)
        assert wait_until(lambda: len(echo.closes) == 2, 10)
        with _connect(f"wss://localhost:{p.port}/third", ctx) as ws:
            ws.send("still here")
            assert ws.recv(timeout=10) == "still here"
    no_traceback(p)


# --------------------------------------------------------------------------- over teleport

def test_websocket_over_teleport_is_refused_with_501():
    up = Upstream()
    b = HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}", workers=1)
    try:
        with HttpTp("-outType=teleport", f"-out={b.addr}", workers=1) as a:
            with pytest.raises(InvalidStatus) as info:
                _connect(f"ws://127.0.0.1:{a.port}/chat")
            assert info.value.response.status_code == 501
            assert b"Upgrade cannot cross a teleport link" in info.value.response.body
            # the refusal keeps the connection: a plain request behind it is served
            s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                      b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"up"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            assert data.startswith(b"HTTP/1.1 501 "), data
            assert b"HTTP/1.1 200 " in data and data.endswith(b"up"), data
            # only the plain request crossed the link
            assert up.requests == 1 and up.received[0].startswith(b"GET /plain ")
        no_traceback(a)
    finally:
        b.__exit__(None, None, None)
        up.close()
