"""The health checker's probes (httptp.io.health_probe) against real upstreams
on loopback and unix sockets: http, https, teleport; good, bad and silent."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from httptp.health import Checker
from httptp.io import health_probe
from httptp.io.health_probe import HTTPProbe, TeleportProbe
from httptp.netaddr import parse_address
from httptp.stats import HEALTH_DOWN, HEALTH_UP, Stats
from httptp.teleport.handshake import Compress
from httptp.tls import cooperative
from tests.helpers import Reply, Upstream, dead_address

pytestmark = pytest.mark.timeout(60)


def tcp(addr: str):
    return parse_address(addr, "tcp")


def health_upstream(status: int = 200, **kw) -> Upstream:
    return Upstream(lambda m, p, h, b: Reply(status=status), **kw)


@pytest.mark.parametrize("status,ok", [(200, True), (204, True), (302, True), (404, False),
                                       (500, False), (503, False)])
def test_http_status_decides(status, ok):
    up = health_upstream(status)
    try:
        verdict = HTTPProbe("/health", 2.0)(tcp(up.addr))
        assert (verdict.ok, verdict.code) == (ok, status)
        assert up.received[0].startswith(b"GET /health HTTP/1.1\r\nHost: " + up.addr.encode())
    finally:
        up.close()


def test_refused_connection_is_no_answer():
    addr = dead_address()           # nobody listens there
    verdict = HTTPProbe("/health", 2.0)(tcp(addr))
    assert (verdict.ok, verdict.code) == (False, 0)
    assert "refused" in verdict.reason.lower()


def test_silence_times_out():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)                     # accepts (the kernel does), never answers
    try:
        verdict = HTTPProbe("/health", 0.3)(tcp("127.0.0.1:%d" % s.getsockname()[1]))
        assert (verdict.ok, verdict.code, verdict.reason) == (False, 0, "no answer within 0.3 s")
    finally:
        s.close()


def test_garbage_and_reset_are_bad():
    up = Upstream(lambda m, p, h, b: Reply(raw=b"SSH-2.0-OpenSSH\r\n"))
    try:
        verdict = HTTPProbe("/health", 2.0)(tcp(up.addr))
        assert (verdict.ok, verdict.code) == (False, 0) and "not HTTP" in verdict.reason
        up.kill()                   # accept, then reset
        assert not HTTPProbe("/health", 2.0)(tcp(up.addr)).ok
    finally:
        up.close()


def test_unix_socket_upstream(tmp_path):
    path = str(tmp_path / "up.sock")
    up = health_upstream(200, unix_path=path)
    try:
        verdict = HTTPProbe("/health", 2.0)(parse_address(path, "unix"))
        assert verdict.ok and up.received[0].startswith(b"GET /health HTTP/1.1\r\nHost: localhost")
    finally:
        up.close()


def test_https_verifies_the_certificate(tmp_path):
    trustme = pytest.importorskip("trustme")
    from tests.integration.test_tls import Certs, TLSUpstream
    certs = Certs(tmp_path)
    up = TLSUpstream(certs.issue("server", "localhost", "127.0.0.1"))
    try:
        good = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        good.load_verify_locations(certs.ca_file)
        verdict = HTTPProbe("/health", 2.0, cooperative(good))(tcp(up.addr))
        assert (verdict.ok, verdict.code) == (True, 200)
        other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        other.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode())
        verdict = HTTPProbe("/health", 2.0, cooperative(other))(tcp(up.addr))
        assert not verdict.ok and verdict.reason.startswith("TLS: certificate verify failed")
    finally:
        up.close()


def teleport_server(status: int):
    from httptp.teleport import Server
    seen = []

    def handler(req):
        seen.append((req.method, req.path))
        return status, {}, b""
    srv = Server(handler, compress="flate")
    return srv, srv.start("127.0.0.1:0"), seen


@pytest.mark.parametrize("status,ok", [(200, True), (503, False)])
def test_teleport_request_for_the_path(status, ok):
    srv, addr, seen = teleport_server(status)
    try:
        probe = TeleportProbe("/health", 2.0, compress=Compress.FLATE, max_header_size=4096,
                              max_body_size=1 << 20)
        verdict = probe(tcp(addr))
        assert (verdict.ok, verdict.code) == (ok, status)
        assert seen == [("GET", "/health")]
    finally:
        srv.stop()


def test_teleport_nobody_listening():
    addr = dead_address()
    probe = TeleportProbe("/health", 1.0, compress=Compress.FLATE, max_header_size=4096,
                          max_body_size=1 << 20)
    verdict = probe(tcp(addr))
    assert (verdict.ok, verdict.code) == (False, 0)


def test_rounds_publish_into_the_shared_memory():
    good, bad = health_upstream(200), health_upstream(500)
    stats = Stats.create(2, 8)
    logs = []
    try:
        ids = stats.assign_upstreams([good.addr, bad.addr])
        checker = Checker(stats, path="/health", rise=2, fall=3, out_type="http",
                          log=logs.append, stale_after=30.0)
        health_probe.run(checker, HTTPProbe("/health", 2.0), interval=0.01, timeout=2.0,
                         rounds=3)
        assert stats.health(ids[0])[::2] == (HEALTH_UP, 200)
        assert stats.health(ids[1])[::2] == (HEALTH_DOWN, 500)
        assert abs(stats.health(ids[0])[1] - time.time()) < 60
        assert stats.totals()["outHealthChecks"] == 6
        assert good.requests == 3 and bad.requests == 3
        assert len(logs) == 1 and bad.addr in logs[0]
    finally:
        stats.close()
        good.close()
        bad.close()
