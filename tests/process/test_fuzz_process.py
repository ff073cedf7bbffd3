"""Mutated traffic at the real `httptp` command (docs/fuzzing.md).

A few hundred damaged HTTP requests in front of a real upstream, and damaged
or garbage teleport streams for every codec at a teleport listener.  The
worker must stay the same process, never log a traceback or an internal
error, and answer only 1xx/2xx/4xx (a 5xx would be the input breaking
something) or close the connection.  Seeded, so every run sends the same
bytes; each connection is half-closed after its bytes so nothing waits on
a timeout.
"""

from __future__ import annotations

import random
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from httptp.teleport import handshake
from httptp.teleport.codecs import compressor, decompressor
from httptp.teleport.framing import FrameReader, encode_request
from httptp.teleport.handshake import BY_NAME
from tests.helpers import HttpTp, Peer, Upstream, decompress_all

pytestmark = pytest.mark.timeout(120)

SEED = 20260914
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: fuzz\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    b"hello",
    b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n"
    b"0\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
    b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /again HTTP/1.0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"DELETE http://a/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    b"PATCH /u HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    b"\r\nGET HTTP://[::1]:8080?q HTTP/1.1\r\nHost: [::1]:8080\r\nProxy-Connection: close\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: x-1.example.com.:\r\n\r\n",
]
TOKENS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b"\x7f", b"\xff", b"0", b"f",
          b"\r\n ", b"\r\n\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
          b"Content-Length: 99999999999999999999\r\n", b"Host: b\r\n", b"Connection: close\r\n",
          b"Transfer-Encoding: gzip, chunked\r\n", b"X: " + b"v" * 5000 + b"\r\n",
          b"ffffffffffffffff\r\n", b"HTTP/1.1\r\n", b"GET ", b"%", b"\xc3\xa9", b"@", b"[",
          b"u:p@", b"Host: \r\n", b"http://", b"*"]


def mutate(rnd: random.Random, data: bytes, tokens=TOKENS) -> bytes:
    """1-4 edits: flip a bit, insert a token or random bytes, delete or
    duplicate a range, truncate, duplicate or drop a line."""
    for _ in range(rnd.randint(1, 4)):
        n = len(data)
        pos = rnd.randint(0, n)
        op = rnd.randrange(7)
        if op == 0 and n:
            i = min(pos, n - 1)
            data = data[:i] + bytes((data[i] ^ (1 << rnd.randrange(8)),)) + data[i + 1:]
        elif op == 1:
            data = data[:pos] + rnd.choice(tokens) + data[pos:]
        elif op == 2:
            data = data[:pos] + rnd.randbytes(rnd.randint(1, 6)) + data[pos:]
        elif op == 3:
            data = data[:pos] + data[pos + rnd.randint(1, 10):]
        elif op == 4:
            end = min(n, pos + rnd.randint(1, 40))
            data = data[:end] + data[pos:end] + data[end:]
        elif op == 5 and rnd.random() < 0.3:
            data = data[:pos]
        else:
            lines = data.split(b"\r\n")
            i = rnd.randrange(len(lines))
            if rnd.random() < 0.5:
                lines.insert(rnd.randrange(len(lines) + 1), lines[i])
            else:
                del lines[i]
            data = b"\r\n".join(lines)
    return data


def exchange(host: str, port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, read until the server closes."""
    with socket.create_connection((host, port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:         # the server may close before reading everything
            pass
        out = []
        try:
            while chunk := s.recv(65536):
                out.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(out)


def check_clean(p: HttpTp, pid: int) -> None:
    assert p.worker_pids() == [pid], "the worker was replaced"
    bad = [line for line in p.lines if "Traceback" in line or "internal error" in line]
    assert not bad, "\n".join(bad[:20])


def test_mutated_http_requests_get_4xx_or_their_answer():
    up = Upstream()
    with HttpTp("-outType=http", f"-out={up.addr}", "-inMaxHeaderSize=4096",
                "-inMaxBodySize=1000", workers=1) as p:
        [pid] = p.worker_pids()
        for i, base in enumerate(REQUESTS):       # unharmed, each is answered by the upstream
            assert STATUS.findall(exchange(p.host, p.port, base))[-1] == b"200", base
        seen: dict = {}
        for i in range(300):
            rnd = random.Random(SEED + i)
            data = mutate(rnd, rnd.choice(REQUESTS))
            answer = exchange(p.host, p.port, data)
            for status in STATUS.findall(answer):
                seen[status] = seen.get(status, 0) + 1
                assert status[:1] in b"124", (i, data, answer[:300])
        print(f"statuses over 300 mutated requests: {dict(sorted(seen.items()))}")
        assert seen.get(b"400") and seen.get(b"200")      # the mutations reach both ends
        check_clean(p, pid)
        assert STATUS.findall(exchange(p.host, p.port, REQUESTS[0])) == [b"200"]
    up.close()


def _frames(rnd: random.Random) -> bytes:
    out = []
    for req_id in range(1, rnd.randint(2, 5)):
        method = rnd.choice([b"GET", b"POST", b"PUT", b"HEAD"])
        body = b"" if method in (b"GET", b"HEAD") else rnd.randbytes(rnd.randint(0, 50))
        out.append(encode_request(req_id, method, b"/t%d" % req_id,
                                  [(b"Host", b"x"), (b"X-N", b"%d" % rnd.randrange(99))], body))
    return b"".join(out)


def teleport_exchange(host: str, port: int, codec, data: bytes) -> list:
    """Our handshake, then ``data`` as the compressed stream; the statuses of
    the frames that come back until the server closes or says nothing for
    0.2 s (a stream still sound may wait for more)."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(handshake.encode(codec, False))
        head = b""
        while len(head) < 15 and (part := s.recv(15 - len(head))):
            head += part
        theirs, _ = handshake.decode(head)
        try:
            s.sendall(data)
        except OSError:
            pass
        s.settimeout(0.2)
        wire = []
        try:
            while chunk := s.recv(65536):
                wire.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    frames = FrameReader("response", 1 << 20).feed(decompress_all(decompressor(theirs),
                                                                  b"".join(wire)))
    return [head.status for _, head, _ in frames]


@pytest.mark.parametrize("codec", list(BY_NAME))
def test_damaged_teleport_streams_close_the_connection(codec):
    up = Upstream()
    c = BY_NAME[codec]
    with HttpTp("-inType=teleport", "-inCompress=auto", "-outType=http", f"-out={up.addr}",
                "-inMaxHeaderSize=4096", "-inMaxBodySize=1000", workers=1) as p:
        [pid] = p.worker_pids()
        peer = Peer(p.host, p.port, codec)           # a sound stream is served
        peer.request(1, target=b"/sound")
        assert peer.answer(1)[0].status == 200
        peer.close()
        streams = []
        for i in range(30):
            rnd = random.Random(SEED + 1000 * (list(BY_NAME).index(codec) + 1) + i)
            comp = compressor(c)
            stream = b"".join(comp.compress(part) + comp.flush()
                              for part in (_frames(rnd), _frames(rnd)))
            streams.append(mutate(rnd, stream, [b"\x00"]))
            if i % 3 == 0:      # and plain garbage after the handshake
                streams.append(rnd.randbytes(rnd.randint(1, 300)))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda d: teleport_exchange(p.host, p.port, c, d), streams))
        statuses = [s for a in answers for s in a]
        print(f"{codec}: {len(statuses)} answers to {len(streams)} damaged streams")
        assert all(200 <= s < 500 for s in statuses), statuses
        check_clean(p, pid)
    up.close()


def test_garbage_instead_of_a_teleport_handshake():
    up = Upstream()
    with HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}", workers=1) as p:
        [pid] = p.worker_pids()
        rnd = random.Random(SEED)
        good = handshake.encode(0, False)
        for i in range(40):
            data = rnd.choice([rnd.randbytes(rnd.randint(1, 64)), mutate(rnd, good, [b"\x05"]),
                               good[:12] + bytes((0, 0x77, 0)) + rnd.randbytes(20),
                               b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"])
            assert STATUS.search(exchange(p.host, p.port, data)) is None
        check_clean(p, pid)
        peer = Peer(p.host, p.port, "zstd")
        peer.request(1)
        assert peer.answer(1)[0].status == 200
        peer.close()
    up.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_trailer_fields_never_reach_the_upstream_as_headers(parser):
    """Finding TRAILERS (tests/fuzz/test_fuzz_http.py, fixed in 52b24da): with
    httptools, chunked trailer fields reached the upstream as headers, a 2nd
    Host included."""
    up = Upstream()
    with HttpTp("-outType=http", f"-out={up.addr}", f"-httpParser={parser}", workers=1) as p:
        answer = exchange(p.host, p.port, b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
                          b"chunked\r\n\r\n3\r\nabc\r\n0\r\nHost: evil\r\nX-Injected: 1\r\n\r\n")
        assert STATUS.findall(answer) == [b"200"]
        [forwarded] = up.received
        assert b"evil" not in forwarded and b"X-Injected" not in forwarded, forwarded
    up.close()
