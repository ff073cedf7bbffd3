"""Teleport between two (or three) real `httptp` processes, every leg on real sockets.

    client → A (http in, teleport out) → [relay] → B (teleport in, http out) → upstream
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from pathlib import Path

import pytest

from tests.helpers import (HttpTp, Relay, Reply, UnixHTTPConnection, Upstream, decompress_all, get,
                           raw_exchange)

pytestmark = pytest.mark.timeout(120)

CODECS = ["none", "flate", "snappy", "zstd", "brotli"]
VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "teleport-go"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors/teleport-go")


def echo(method, path, headers, body):
    if path == b"/204":
        return Reply(status=204)
    if path == b"/304":
        return Reply(status=304)
    if path.startswith(b"/chunked"):
        return Reply(body=b"chunked:" + body, chunked=True)
    return Reply(body=b"%s %s %d:" % (method, path, len(body)) + body[:64],
                 headers=[(b"X-Host", headers.get(b"host", b""))])


class Chain:
    def __init__(self, *, a_args=(), b_args=(), workers=1, upstream=None, relay=True):
        self.up = upstream or Upstream(handler=echo)
        self.b = HttpTp("-inType=teleport", "-outType=http", f"-out={self.up.addr}", *b_args,
                        workers=workers)
        self.relay = Relay(self.b.addr) if relay else None
        target = self.relay.addr if relay else self.b.addr
        self.a = HttpTp("-outType=teleport", f"-out={target}", *a_args, workers=workers)

    def conn(self):
        return http.client.HTTPConnection(self.a.host, self.a.port, timeout=10)

    def close(self):
        for p in (self.a, self.b):
            p.__exit__(None, None, None)
        if self.relay:
            self.relay.close()
        self.up.close()


@pytest.fixture
def chain_factory():
    made = []

    def make(**kw):
        c = Chain(**kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("req_codec", CODECS)
@pytest.mark.parametrize("resp_codec", ["flate", "zstd"])
def test_codec_pairs_through_the_chain(chain_factory, req_codec, resp_codec):
    ch = chain_factory(a_args=[f"-outCompress={req_codec}"], b_args=[f"-inCompress={resp_codec}"])
    c = ch.conn()
    status, headers, body = get(c, "/x?y=1", headers={"Host": "foobar0.com"})
    assert status == 200 and body == b"GET /x?y=1 0:" and headers["x-host"] == "foobar0.com"
    payload = os.urandom(3000).hex().encode()
    status, _, body = get(c, "/post", method="POST", body=payload)
    assert status == 200 and body == b"POST /post %d:" % len(payload) + payload[:64]


@pytest.mark.parametrize("codec", ["none", "flate", "snappy", "zstd"])
def test_batching_delays_both_ways(chain_factory, codec):
    ch = chain_factory(a_args=[f"-outCompress={codec}", "-outDelay=10ms"],
                       b_args=[f"-inCompress={codec}", "-inDelay=10ms"])
    import threading
    results = []

    def one(i):
        c = ch.conn()
        results.append(get(c, f"/r{i}")[2])
    ts = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert sorted(results) == sorted(b"GET /r%d 0:" % i for i in range(50))
    # one teleport connection carried all 50
    assert ch.relay.connections == 1


def test_bodies_head_204_304_and_chunked(chain_factory):
    ch = chain_factory()
    c = ch.conn()
    for size in (1, 4 * 1024 * 1024):
        body = os.urandom(size)
        status, _, got = get(c, "/big", method="PUT", body=body)
        assert status == 200 and got == b"PUT /big %d:" % size + body[:64]
    status, headers, got = get(c, "/h", method="HEAD")
    assert status == 200 and got == b""
    assert get(c, "/204")[0] == 204
    assert get(c, "/304")[0] == 304
    status, _, got = get(c, "/chunked", method="POST", body=b"abc")
    assert status == 200 and got == b"chunked:abc"
    status, _, got = get(c, "/after")       # the stream is still in sync
    assert got == b"GET /after 0:"


def test_auto_answers_in_the_clients_codec(chain_factory):
    ch = chain_factory(a_args=["-outCompress=snappy"], b_args=["-inCompress=auto"])
    assert get(ch.conn(), "/auto")[2] == b"GET /auto 0:"


def test_out_conns_per_addr_opens_real_connections(chain_factory):
    ch = chain_factory(a_args=["-outConnsPerAddr=3"])
    import threading

    def burst():
        c = ch.conn()
        for i in range(20):
            get(c, f"/c{i}")
    ts = [threading.Thread(target=burst) for _ in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert ch.relay.connections == 3


def test_middle_hop_teleport_to_teleport(chain_factory):
    ch = chain_factory(relay=False)
    mid = HttpTp("-inType=teleport", "-outType=teleport", f"-out={ch.b.addr}", "-inCompress=zstd",
                 "-outCompress=snappy", workers=1)
    try:
        a = HttpTp("-outType=teleport", f"-out={mid.addr}", "-outCompress=brotli", workers=1)
        try:
            c = http.client.HTTPConnection(a.host, a.port, timeout=10)
            assert get(c, "/3hops", method="POST", body=b"z" * 5000)[2] == b"POST /3hops 5000:" + b"z" * 64
        finally:
            a.__exit__(None, None, None)
    finally:
        mid.__exit__(None, None, None)


def test_unix_in_and_unix_out_around_teleport(tmp_path):
    up = Upstream(handler=echo, unix_path=str(tmp_path / "up.sock"))
    b = HttpTp("-inType=teleport", "-outType=unix", f"-out={up.addr}", workers=1)
    in_path = str(tmp_path / "in.sock")
    a = HttpTp("-inType=unix", f"-in={in_path}", "-outType=teleport", f"-out={b.addr}", workers=1)
    try:
        status, _, body = get(UnixHTTPConnection(in_path), "/u")
        assert status == 200 and body == b"GET /u 0:"
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        up.close()


def test_dead_teleport_peer_gives_502_then_recovers(chain_factory):
    ch = chain_factory()
    c = ch.conn()
    assert get(c, "/1")[0] == 200
    ch.relay.cut()                              # the link dies mid-stream
    statuses = [get(ch.conn(), f"/{i}")[0] for i in range(3)]
    assert statuses[-1] == 200, statuses      # reconnected (after the 1 s back-off at most)
    assert all(s in (200, 502) for s in statuses)
    assert "Traceback" not in ch.a.output + ch.b.output


def test_peer_that_never_handshakes_gives_504_within_out_timeout():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)                          # accepts (kernel), never answers
    a = HttpTp("-outType=teleport", f"-out=127.0.0.1:{silent.getsockname()[1]}",
               "-outTimeout=500ms", workers=1)
    try:
        t0 = time.monotonic()
        status, _, body = get(http.client.HTTPConnection(a.host, a.port, timeout=10), "/")
        assert status in (502, 504) and time.monotonic() - t0 < 4
    finally:
        a.__exit__(None, None, None)
        silent.close()


def test_garbage_after_handshake_is_dropped_and_counted(chain_factory):
    ch = chain_factory(relay=False)
    host, port = ch.b.host, ch.b.port
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"httpteleport\x00\x01\x00")               # codec none, no TLS
    assert s.recv(15) == b"httpteleport\x00\x00\x00"      # B answers in flate (its -inCompress)
    s.sendall(b"\x01\x00\x00\x00NOT HTTP AT ALL\r\n\r\n")
    s.settimeout(5)
    assert s.recv(100) == b""                            # closed, nothing answered
    s.close()
    assert get(ch.conn(), "/still")[0] == 200           # B serves others
    assert "Traceback" not in ch.b.output


def test_bad_magic_and_unknown_codec_close_the_connection(chain_factory):
    ch = chain_factory(relay=False)
    for hello in (b"httpteleporX\x00\x01\x00", b"httpteleport\x07\x01\x00", b"httpteleport\x00\x09\x00"):
        s = socket.create_connection((ch.b.host, ch.b.port), timeout=5)
        s.sendall(hello)
        s.settimeout(5)
        data = b""
        try:
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        s.close()
        assert len(data) <= 15
    assert "Traceback" not in ch.b.output


@pytest.mark.skipif(not VECTORS.is_dir(), reason="../shared/vectors/teleport-go not found")
@pytest.mark.parametrize("case", ["none", "flate", "snappy", "flate-delay5ms"])
def test_go_client_stream_replayed_into_our_teleport_server(case):
    """The bytes a real Go httptp client sent, fed to our teleport-in httptp."""
    index = json.loads((VECTORS / "index.json").read_text())
    spec = next(c for c in index["cases"] if c["case"] == case)
    def like_the_capture(m, p, h, b):   # what the upstream of the Go capture answered
        if p == b"/nobid":
            return Reply(status=204)
        return Reply(body=b"len=%d" % len(b) if m == b"PUT" else b"echo:" + p)
    up = Upstream(handler=like_the_capture)
    b = HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}",
               f"-inCompress={spec['server_compress']}", workers=1)
    try:
        stream = (VECTORS / spec["c2s_file"]).read_bytes()
        data = raw_exchange((b.host, b.port), stream, timeout=3)
    finally:
        b.__exit__(None, None, None)
        up.close()
    from httptp.teleport.codecs import decompressor
    from httptp.teleport.framing import FrameReader
    from httptp.teleport.handshake import BY_NAME, decode
    codec, tls = decode(data[:15])
    assert codec == BY_NAME[spec["server_compress"]] and not tls
    frames = FrameReader("response", 65536).feed(decompress_all(decompressor(codec), data[15:]))
    got = {rid: (head.status, body) for rid, head, body in frames}
    want = {i + 1: (e["response"]["status"], e["response"]["body"].encode())
            for i, e in enumerate(spec["exchanges"])}
    assert got == want
    assert up.requests == len(spec["exchanges"])


def test_term_on_teleport_listener_finishes_inflight_requests(chain_factory):
    import signal
    import threading
    slow = Upstream(handler=lambda m, p, h, b: Reply(body=b"slow " + p, delay=1.0))
    ch = chain_factory(upstream=slow)
    results = []

    def one(i):
        results.append(get(ch.conn(), f"/s{i}")[::2])
    ts = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    time.sleep(0.4)
    ch.b.signal(signal.SIGTERM)
    for t in ts:
        t.join(15)
    assert sorted(results) == [(200, b"slow /s%d" % i) for i in range(4)]
    assert ch.b.wait(15) == 0
    assert "Traceback" not in ch.b.output


def test_stats_show_the_bytes_saved_on_the_link():
    """B's /expvar and /prometheus count teleport bytes before and after the codec;
    the compressed side matches what the relay saw on the wire."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    up = Upstream(handler=echo)
    b = HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}", "-inCompress=zstd",
               "-expvarAddr=127.0.0.1:0", workers=1)
    relay = Relay(b.addr)
    a = HttpTp("-outType=teleport", f"-out={relay.addr}", "-outCompress=zstd", workers=1)
    try:
        c = http.client.HTTPConnection(a.host, a.port, timeout=10)
        for i in range(50):
            get(c, f"/same/path/{i}", method="POST", body=b'{"id": "%d", "imp": [], "site": {}}' % i)
        import re
        port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", b.output).group(1))
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/expvar", timeout=5).read())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/prometheus", timeout=5).read().decode()
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        relay.close()
        up.close()
    assert stats["teleportReceivedPlainBytes"] > 3 * stats["teleportReceivedCompressedBytes"] > 0
    assert stats["teleportSentPlainBytes"] > stats["teleportSentCompressedBytes"] > 0
    # the wire carried the compressed bytes plus the 15-byte handshake each way
    assert relay.up_bytes == stats["teleportReceivedCompressedBytes"] + 15
    assert relay.down_bytes == stats["teleportSentCompressedBytes"] + 15
    ratios = {s.labels["direction"]: s.value for f in text_string_to_metric_families(text)
              if f.name == "httptp_teleport_compression_ratio" for s in f.samples}
    assert ratios["received"] > 3
