"""Bodies stream through the real `httptp` command in bounded memory, both ways.

    client ──http──▶ httptp -workers=1 ──http──▶ a threaded upstream written here

The upstream makes its bodies on the fly from a 1 MiB random pattern and
hashes what it is sent, so neither side of the test holds a whole body
either.  Memory is the worker's (the master's only child): its peak RSS
(VmHWM after ``clear_refs``, and VmRSS sampled every 10 ms) minus its RSS
just before the case.  These are memory bounds, not timings: each case only
waits, boundedly, for bytes.

* 200 MB responses (Content-Length, chunked) and 100 MB uploads (chunked,
  Content-Length) grow the worker by less than 64 MB, every byte intact;
* a client that reads slowly, and an upstream that reads slowly, hold the
  other side back (the bytes in flight stay bounded) with the same bound;
* a failure once the head went out cuts the connection (no 502 appended);
* a client that leaves mid-response is logged as 499.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import socket
import threading
import time

import pytest

from tests.helpers import HttpTp, PeakRSS, wait_until

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
MB = 1000 * 1000
BOUND = 64 * MiB                 # the worker's RSS growth allowed per case
BIG = 200 * MB
UPLOAD = 100 * MB
PIECE = 256 * 1024
PATTERN = os.urandom(MiB)
SLOW_SECONDS = 2.5               # how long a slow peer dawdles before it reads at full speed


def pieces(n: int, size: int = PIECE):
    """``n`` bytes as memoryviews of PATTERN at varying offsets (no two
    neighbouring pieces alike, so a lost or repeated piece changes the hash)."""
    view = memoryview(PATTERN)
    i = off = 0
    while off < n:
        k = min(size, n - off)
        start = (i * 104729) % (len(PATTERN) - size)
        yield view[start:start + k]
        off += k
        i += 1


@functools.lru_cache(maxsize=None)
def digest(n: int) -> str:
    h = hashlib.sha256()
    for p in pieces(n):
        h.update(p)
    return h.hexdigest()


# --------------------------------------------------------------------------- the upstream

class StreamUpstream:
    """A threaded HTTP/1.1 upstream that makes and takes bodies on the fly.

    GET /cl/N          N bytes with a Content-Length
    GET /chunked/N     N bytes, chunked
    GET /cut/cl        Content-Length 1000000, 1000 bytes, then close
    GET /cut/chunked   a chunk of 1000 bytes, half of the next, then close
    POST /upload       reads the body (Content-Length or chunked) and answers
                       "<length> <sha256>"
    POST /slow-upload  the same, reading 4 KiB at a time with sleeps for
                       SLOW_SECONDS first (``slow_over`` is set when that ends)
    POST /slowly       the same, 64 KiB every 25 ms from start to end
    POST /stuck        reads nothing and answers nothing until ``unstick`` is set

    ``sent``: body bytes sent on the current download; ``received``: body
    bytes read on the current upload; ``aborted``: downloads the proxy cut.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # a fixed receive window (inherited by accepted sockets): a slow
        # upstream then holds back what it is sent instead of buffering MBs
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.sent = 0
        self.received = 0
        self.aborted = 0
        self.finished = 0
        self.uploads: list[tuple[int, str]] = []
        self.slow_over = threading.Event()
        self.unstick = threading.Event()
        self.progress = [0]           # a slow upload's client sets it: what it has sent
        self.in_flight = None         # sent - received as the slow phase ended
        self._conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.settimeout(30)
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline(65537)
                if not line:
                    return
                method, path = line.split(b" ")[:2]
                headers = {}
                while (h := f.readline(65537)) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if path == b"/stuck":
                    self.unstick.wait(30)
                    return
                if method == b"POST":
                    self._upload(c, f, path, headers)
                else:
                    if not self._download(c, path):
                        return
        except OSError:
            self.aborted += 1
        finally:
            try:
                c.close()
            except OSError:
                pass

    def _download(self, c, path: bytes) -> bool:
        """Answer a GET; False when the connection is to close."""
        kind, _, arg = path.strip(b"/").partition(b"/")
        self.sent = 0
        if kind == b"cut":
            if arg == b"cl":
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3e8\r\n" + b"y" * 1000 + b"\r\n3e8\r\n" + b"z" * 500)
            return False
        n = int(arg)
        if kind == b"chunked":
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for p in pieces(n):
                c.sendall(b"%x\r\n" % len(p))
                c.sendall(p)
                c.sendall(b"\r\n")
                self.sent += len(p)
            c.sendall(b"0\r\n\r\n")
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            for p in pieces(n):
                c.sendall(p)
                self.sent += len(p)
        self.finished += 1
        return True

    def _upload(self, c, f, path: bytes, headers: dict) -> None:
        slow_until = time.monotonic() + SLOW_SECONDS if path == b"/slow-upload" else 0
        steady = path == b"/slowly"
        self.received = 0
        h = hashlib.sha256()

        def take(k: int) -> None:
            while k:
                if slow_until:
                    if time.monotonic() < slow_until:
                        data = f.read(min(k, 4096))
                        time.sleep(0.005)
                    else:
                        if not self.slow_over.is_set():
                            self.in_flight = self.progress[0] - self.received
                            self.slow_over.set()
                        data = f.read(min(k, MiB))
                elif steady:
                    data = f.read(min(k, 65536))
                    time.sleep(0.025)
                else:
                    data = f.read(min(k, MiB))
                if not data:
                    raise ConnectionError("the body ended early")
                h.update(data)
                self.received += len(data)
                k -= len(data)

        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int(f.readline(100).split(b";")[0], 16)
                if size == 0:
                    while f.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(size)
                assert f.readline(3) == b"\r\n"
        else:
            take(int(headers[b"content-length"]))
        if slow_until and not self.slow_over.is_set():      # all of it came while slow
            self.in_flight = self.progress[0] - self.received
            self.slow_over.set()
        self.uploads.append((self.received, h.hexdigest()))
        answer = b"%d %s" % (self.received, h.hexdigest().encode())
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    def close(self):
        self.unstick.set()
        self.sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------- memory

# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def up():
    u = StreamUpstream()
    yield u
    u.close()


def start(up, *args, tmp_path=None):
    """httptp with one worker in front of ``up``, warmed up (its code paths
    imported and run once) so that the case measures only itself."""
    p = HttpTp("-outType=http", f"-out={up.addr}", "-outMaxBodySize=1073741824",
               "-inMaxBodySize=1073741824", *args, workers=1)
    try:
        [pid] = wait_until(p.worker_pids, 10) or [None]
        assert pid, p.output
        c = connection(p.port)
        for path in ("/cl/3000000", "/chunked/3000000"):
            c.request("GET", path)
            r = c.getresponse()
            assert r.status == 200 and len(r.read()) == 3000000
        c.close()
        for chunked in (False, True):
            assert upload(p.port, 3000000, chunked) == (3000000, digest(3000000))
    except BaseException:
        p.__exit__(None, None, None)
        raise
    return p, pid


def connection(port: int, rcvbuf: int = 0, timeout: float = 30.0) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if rcvbuf:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)    # before connect: the window
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        conn.sock = sock
    return conn


def read_all(r: http.client.HTTPResponse, h=None) -> int:
    """Read a response body to its end, hashing into ``h``; its length."""
    n = 0
    while True:
        data = r.read(MiB)
        if not data:
            return n
        if h is not None:
            h.update(data)
        n += len(data)


def upload(port: int, n: int, chunked: bool, path: str = "/upload", progress=None):
    """POST ``n`` bytes (chunked or with a Content-Length) on a raw socket;
    the upstream's answer ``(length, sha256)`` it read."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        framing = (b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % n)
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % (path.encode(), framing))
        for p in pieces(n):
            if chunked:
                s.sendall(b"%x\r\n" % len(p))
                s.sendall(p)
                s.sendall(b"\r\n")
            else:
                s.sendall(p)
            if progress is not None:
                progress[0] += len(p)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        r = http.client.HTTPResponse(s)
        r.begin()
        body = r.read()
        assert r.status == 200, (r.status, body)
        length, sha = body.split()
        return int(length), sha.decode()
    finally:
        s.close()


def no_traceback(p: HttpTp):
    assert "Traceback" not in p.output and "internal error" not in p.output, p.output


# --------------------------------------------------------------------------- (a) big responses

@pytest.mark.parametrize("kind", ["cl", "chunked"])
def test_a_200mb_response_streams_in_bounded_memory(up, kind):
    p, pid = start(up)
    with p:
        mem = PeakRSS(pid)
        c = connection(p.port)
        c.request("GET", f"/{kind}/{BIG}")
        r = c.getresponse()
        assert r.status == 200
        if kind == "cl":
            assert r.getheader("Content-Length") == str(BIG)
        else:
            assert r.getheader("Transfer-Encoding") == "chunked"
        h = hashlib.sha256()
        assert read_all(r, h) == BIG
        growth = mem.stop()
        assert h.hexdigest() == digest(BIG)
        # the framing ended right: the same connection goes on
        c.request("GET", "/cl/10")
        r = c.getresponse()
        assert r.status == 200 and r.read() == bytes(PATTERN[:10])
        c.close()
        print(f"{kind}: worker RSS growth {growth / MiB:.1f} MiB")
        assert growth < BOUND, f"the worker grew by {growth / MiB:.1f} MiB"
    no_traceback(p)


# --------------------------------------------------------------------------- (b) big uploads

@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_b_100mb_upload_streams_in_bounded_memory(up, chunked):
    p, pid = start(up)
    with p:
        mem = PeakRSS(pid)
        got = upload(p.port, UPLOAD, chunked)
        growth = mem.stop()
        assert got == (UPLOAD, digest(UPLOAD))
        print(f"chunked={chunked}: worker RSS growth {growth / MiB:.1f} MiB")
        assert growth < BOUND, f"the worker grew by {growth / MiB:.1f} MiB"
    no_traceback(p)


# --------------------------------------------------------------------------- (c) a slow reader

def test_c_slow_reader_holds_the_upstream_back(up):
    p, pid = start(up)
    with p:
        mem = PeakRSS(pid)
        c = connection(p.port, rcvbuf=64 * 1024)
        c.request("GET", f"/cl/{BIG}")
        r = c.getresponse()
        assert r.status == 200
        h = hashlib.sha256()
        n = 0
        until = time.monotonic() + SLOW_SECONDS
        while time.monotonic() < until:         # small reads, with pauses
            data = r.read(4096)
            assert data
            h.update(data)
            n += len(data)
            time.sleep(0.005)
        # the upstream could only send what the buffers on the way hold:
        # httptp stopped reading it (no -outTimeout meanwhile: the client is the slow one)
        in_flight = up.sent - n
        slow_growth = mem.growth()
        assert in_flight < BIG // 2, f"{in_flight / MiB:.1f} MiB in flight"
        n += read_all(r, h)
        growth = mem.stop()
        assert n == BIG and h.hexdigest() == digest(BIG)
        c.close()
        print(f"slow reader: {in_flight / MiB:.1f} MiB in flight; worker RSS growth "
              f"{slow_growth / MiB:.1f} MiB while slow, {growth / MiB:.1f} MiB in all")
        assert growth < BOUND, f"the worker grew by {growth / MiB:.1f} MiB"
    no_traceback(p)


# --------------------------------------------------------------------------- (d) a slow upstream

@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_d_slow_upstream_holds_the_client_back(up, chunked):
    """The upstream reads the upload slowly for longer than -outTimeout (3 s
    by default: it bounds the *wait*, and the upstream is reading), while the
    client sends as fast as it can."""
    p, pid = start(up, "-outTimeout=1s")
    with p:
        mem = PeakRSS(pid)
        sent = up.progress
        box = {}

        def send():
            try:
                box["got"] = upload(p.port, UPLOAD, chunked, "/slow-upload", progress=sent)
            except Exception as e:         # reported below
                box["error"] = e

        t = threading.Thread(target=send, daemon=True)
        t.start()
        assert up.slow_over.wait(30)
        in_flight = up.in_flight
        slow_growth = mem.growth()
        t.join(60)
        growth = mem.stop()
        assert "error" not in box, box["error"]
        assert box["got"] == (UPLOAD, digest(UPLOAD))
        print(f"slow upstream: {in_flight / MiB:.1f} MiB in flight; worker RSS growth "
              f"{slow_growth / MiB:.1f} MiB while slow, {growth / MiB:.1f} MiB in all")
        assert in_flight < UPLOAD // 2, f"{in_flight / MiB:.1f} MiB in flight"
        assert growth < BOUND, f"the worker grew by {growth / MiB:.1f} MiB"
    no_traceback(p)


def test_d_slow_client_upload_is_not_an_upstream_timeout(up):
    """A client that sends its body slower than -outTimeout: the upstream
    waits for the client, not the other way round (-inIdleTimeout bounds the
    client), so the upload goes through."""
    p, _ = start(up, "-outTimeout=1s")
    with p:
        n = 5 * PIECE
        s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n)
        for piece in pieces(n):                 # 5 pieces, SLOW_SECONDS in all
            s.sendall(piece)
            time.sleep(SLOW_SECONDS / 5)
        r = http.client.HTTPResponse(s)
        r.begin()
        body = r.read()
        s.close()
        assert r.status == 200, (r.status, body)
        assert body == b"%d %s" % (n, digest(n).encode())
    no_traceback(p)


def test_d_upstream_slow_to_the_end(up):
    """An upstream that reads the whole body slowly (~2.6 MB/s): the client's
    last bytes sit in the buffers on the way for longer than -outTimeout once
    the body is complete, while the upstream still takes them: not a 504."""
    p, _ = start(up, "-outTimeout=1s")
    with p:
        n = 6 * MB
        assert upload(p.port, n, False, "/slowly") == (n, digest(n))
    no_traceback(p)


def test_d_stuck_upstream_still_times_out_mid_body(up, tmp_path):
    """An upstream that stops taking the body (its buffers full, nothing
    drains) is timed out after -outTimeout: 504, logged; the worker serves on."""
    log = tmp_path / "access.log"
    p, _ = start(up, "-outTimeout=1s", f"-accessLog={log}")
    with p:
        s = socket.create_connection(("127.0.0.1", p.port), timeout=30)
        s.sendall(b"POST /stuck HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
        answer = b""
        try:
            for piece in pieces(UPLOAD):
                s.sendall(piece)                # blocks once every buffer is full
            answer = s.recv(65536)
        except OSError:
            pass                                # cut while sending: the log tells why
        s.close()
        assert not answer or answer.startswith(b"HTTP/1.1 504 "), answer[:200]
        line = wait_until(lambda: [l for l in log.read_text().splitlines() if "/stuck" in l], 15)
        assert line and '"POST /stuck HTTP/1.1" 504 ' in line[0], line
        up.unstick.set()
        c = connection(p.port, timeout=10)
        c.request("GET", "/cl/1000")
        r = c.getresponse()
        assert r.status == 200 and len(r.read()) == 1000
        c.close()
    no_traceback(p)


# --------------------------------------------------------------------------- (e) a failure after the head

def test_e_failure_after_the_head_cuts_the_connection(up):
    p, _ = start(up)
    with p:
        # Content-Length 1000000, 1000 bytes, then the upstream closes
        c = connection(p.port, timeout=10)
        c.request("GET", "/cut/cl")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Length") == "1000000"
        with pytest.raises(http.client.IncompleteRead) as info:
            r.read()
        assert info.value.partial == b"x" * 1000
        c.close()
        # the same on the wire: the head, the 1000 bytes, the end; nothing appended
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.sendall(b"GET /cut/cl HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"x" * 1000, data[-300:]
        assert b"502" not in data and b"Bad Gateway" not in data

        # a chunked response cut mid-chunk: no last chunk invented
        c = connection(p.port, timeout=10)
        c.request("GET", "/cut/chunked")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Transfer-Encoding") == "chunked"
        with pytest.raises(http.client.IncompleteRead) as info:
            r.read()
        assert info.value.partial.startswith(b"y" * 1000)
        assert set(info.value.partial[1000:]) <= {ord("z")}
        c.close()
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.sendall(b"GET /cut/chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        s.close()
        assert data.startswith(b"HTTP/1.1 200 ") and not data.endswith(b"0\r\n\r\n"), data[-100:]
        assert b"502" not in data and b"Bad Gateway" not in data

        # and the next request, on a new connection, is served
        c = connection(p.port, timeout=10)
        c.request("GET", "/cl/100000")
        r = c.getresponse()
        assert r.status == 200 and r.read() == b"".join(pieces(100000))
        c.close()
    no_traceback(p)


# --------------------------------------------------------------------------- (f) 499

def test_f_client_gone_mid_response_is_logged_499(up, tmp_path):
    log = tmp_path / "access.log"
    p, pid = start(up, f"-accessLog={log}")
    with p:
        mem = PeakRSS(pid)
        s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        s.sendall(b"GET /cl/%d HTTP/1.1\r\nHost: x\r\n\r\n" % BIG)
        got = 0
        while got < 2 * MiB:
            chunk = s.recv(65536)
            assert chunk
            got += len(chunk)
        # close with unread bytes: the kernel resets the connection
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        line = wait_until(lambda: [l for l in log.read_text().splitlines()
                                   if f"/cl/{BIG}" in l], 15)
        assert line and f'"GET /cl/{BIG} HTTP/1.1" 499 ' in line[0], line
        size = int(line[0].split('" 499 ')[1].split()[0])
        assert 0 < size < BIG                   # the body bytes that went through
        # the upstream connection was let go, not read to the end
        assert wait_until(lambda: up.aborted >= 1, 15)
        assert up.sent < BIG
        growth = mem.stop()
        assert growth < BOUND
        # still serving
        c = connection(p.port, timeout=10)
        c.request("GET", "/cl/1000")
        r = c.getresponse()
        assert r.status == 200 and len(r.read()) == 1000
        c.close()
    no_traceback(p)
