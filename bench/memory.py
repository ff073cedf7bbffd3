"""Part 6 of bench/suite.py: how much a worker's memory grows while big bodies pass.

Four cases, each on a fresh ``httptp -workers=1`` (so one case's freed but
still mapped memory cannot hide the next one's growth), after one small
warm-up exchange through it:

  download     a 300 MiB response (http → http), read by the client as fast as it can;
  upload       a 100 MiB POST body (Content-Length) that the upstream reads to the end;
  slow reader  the 300 MiB response read at ~1 MiB/s through a 64 KiB receive
               buffer for a bounded time (15 s; --quick: 8 s), then the client closes;
  flate bomb   on a teleport listener (``-inType=teleport -inCompress=flate``), a raw
               teleport client whose flate stream says POST with Content-Length
               2,000,000,000, then 1 GiB of zeros (about 1 MiB on the wire).

Growth is the worker's peak resident memory during the case minus its RSS
just before: VmRSS of /proc/PID/status sampled every 10 ms, and VmHWM when
its peak can be reset first (``echo 5 > /proc/PID/clear_refs``, root or the
same user), whichever is higher.  The target is 64 MiB for each (issue 11).
For a, b and c httptp gets ``-inMaxBodySize`` and ``-outMaxBodySize`` of
1 GiB, so that the bodies pass at all; the bomb meets the default limits.

The upstream is this file run as a script (``python bench/memory.py
upstream``): a threaded server on 127.0.0.1 that answers ``GET /bytes/N``
with N zero bytes (Content-Length, from one 1 MiB buffer: ~GB/s) and any
request with a body with ``got N``, after reading the body to the end
(Content-Length or chunked).  Keep-alive both.  Everything runs on loopback;
every socket has a timeout and every case a deadline.
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import PeakRSS, status_bytes  # noqa: E402  (one RSS sampler for bench and tests)

MiB = 1 << 20
TARGET = 64 * MiB
DOWNLOAD = 300 * MiB
UPLOAD = 100 * MiB
BOMB_PLAIN = 1024 * MiB
BOMB_LENGTH = 2_000_000_000                 # what the bomb's head announces
SLOW_RATE = MiB                             # bytes per second the slow reader reads
SLOW_RCVBUF = 64 * 1024
CASE_TIMEOUT = 120.0                        # seconds, each case
BIG_LIMITS = ("-inMaxBodySize=1073741824", "-outMaxBodySize=1073741824")
ZEROS = bytes(MiB)

CASES = [  # (key, title, what the client does)
    ("download", "300 MiB response, fast reader", "GET of 300 MiB, read as fast as the client can"),
    ("upload", "100 MiB upload", "POST of 100 MiB with Content-Length; the upstream reads it all"),
    ("slow", "300 MiB response, slow reader",
     "GET of 300 MiB, read at ~1 MiB/s through a 64 KiB SO_RCVBUF for {slow:g} s, then closed"),
    ("bomb", "flate bomb on a teleport listener",
     "teleport POST announcing 2,000,000,000 bytes, then 1 GiB of zeros as ~1 MiB of flate"),
]


# --------------------------------------------------------------------------- the upstream

def _read_body(sock: socket.socket, buf: bytes, headers: dict) -> tuple[int, bytes]:
    """Read and count a request body (Content-Length or chunked) without holding it;
    returns (its size, the bytes after it)."""
    sink = bytearray(MiB)

    def more() -> bytes:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed in the body")
        return data

    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        total = 0
        while True:
            while b"\r\n" not in buf:
                buf += more()
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + buf:          # trailers, then the blank line
                    buf += more()
                return total, (b"\r\n" + buf).partition(b"\r\n\r\n")[2]
            total += size
            left = size + 2                                   # the chunk and its CRLF
            take = min(left, len(buf))
            buf, left = buf[take:], left - take
            while left:
                n = sock.recv_into(sink, min(left, len(sink)))
                if not n:
                    raise ConnectionError("closed in the body")
                left -= n
    size = int(headers.get(b"content-length", b"0"))
    take = min(size, len(buf))
    buf, left = buf[take:], size - take
    while left:
        n = sock.recv_into(sink, min(left, len(sink)))
        if not n:
            raise ConnectionError("closed in the body")
        left -= n
    return size, buf


class _Upstream(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.settimeout(300)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, target = lines[0].split(b" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])}
                got, buf = _read_body(sock, buf, headers)
                if method == b"GET" and target.startswith(b"/bytes/"):
                    size = int(target[len(b"/bytes/"):])
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % size)
                    view = memoryview(ZEROS)
                    while size:
                        n = min(size, len(ZEROS))
                        sock.sendall(view[:n])
                        size -= n
                else:
                    body = b"got %d\n" % got
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve_upstream() -> None:
    server = _Server(("127.0.0.1", 0), _Upstream)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# --------------------------------------------------------------------------- /proc

def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def wait_idle(pid: int, timeout: float = 30.0) -> None:
    """Until ``pid`` has used no CPU for half a second (at most ``timeout``)."""
    last, still = -1, 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and still < 5:
        now = cpu_ticks(pid)
        still = still + 1 if now == last else 0
        last = now
        time.sleep(0.1)


# --------------------------------------------------------------------------- the clients

def _connection(port: int, rcvbuf: int = 0, timeout: float = 30.0) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if rcvbuf:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)     # before connect: the window
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        conn.sock = sock
    return conn


def _check_deadline(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"{what}: not done after {CASE_TIMEOUT:g} s")


def download(port: int, size: int, deadline: float, rate: float = 0, seconds: float = 0) -> dict:
    """GET /bytes/SIZE and read the body (at ``rate`` bytes/s for ``seconds`` when given)."""
    slow = rate > 0
    conn = _connection(port, SLOW_RCVBUF if slow else 0)
    try:
        t0 = time.monotonic()
        conn.request("GET", f"/bytes/{size}")
        resp = conn.getresponse()
        buf = memoryview(bytearray(64 * 1024 if slow else MiB))
        got, t_head = 0, time.monotonic()             # the slow reader's pace counts from the head
        while True:
            _check_deadline(deadline, "download")
            if slow:
                elapsed = time.monotonic() - t_head
                if elapsed >= seconds:
                    break
                ahead = got / rate - elapsed
                if ahead > 0:
                    time.sleep(ahead)
            n = resp.readinto(buf)
            if not n:
                break
            got += n
        out = {"status": resp.status, "bytes": got, "seconds": time.monotonic() - t0}
        if not slow and got != size:
            out["note"] = f"got {got:,} of {size:,} bytes"
        return out
    finally:
        conn.close()


def upload(port: int, size: int, deadline: float) -> dict:
    """POST SIZE zero bytes with Content-Length; the upstream answers ``got N``."""
    conn = _connection(port)

    def body():
        left = size
        view = memoryview(ZEROS)
        while left:
            _check_deadline(deadline, "upload")
            n = min(left, len(ZEROS))
            yield view[:n]
            left -= n

    try:
        t0 = time.monotonic()
        conn.request("POST", "/upload", body=body(), headers={"Content-Length": str(size),
                                                               "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        answer = resp.read(1000)
        out = {"status": resp.status, "bytes": size, "seconds": time.monotonic() - t0}
        if answer.strip() != b"got %d" % size:
            out["note"] = f"the upstream answered {answer[:80]!r}"
        return out
    finally:
        conn.close()


# The teleport wire, as PROTOCOL.md has it, with nothing from httptp: a 15-byte
# handshake (magic, version 0, codec 0 = flate, no TLS), then a raw DEFLATE stream
# (sync flush per batch) of frames [uint32 LE request id][HTTP/1.1 message].
_HANDSHAKE = b"httpteleport" + bytes((0, 0, 0))


def _deflate(data: bytes) -> bytes:
    """``data`` as byte-aligned DEFLATE blocks that refer to nothing before them, so
    they may follow any sync-flushed stream, and repeat."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)


class TeleportPeer:
    """A raw teleport client announcing flate, after one warm-up GET (id 1)."""

    def __init__(self, port: int, deadline: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(_HANDSHAKE)
        theirs = b""
        while len(theirs) < 15:
            part = self.sock.recv(15 - len(theirs))
            if not part:
                raise ConnectionError("the listener closed during the handshake")
            theirs += part
        if theirs[:12] != b"httpteleport" or theirs[13] != 0:
            raise RuntimeError(f"unexpected handshake {theirs!r} (expected flate: -inCompress=flate)")
        self.inflate, self.plain = zlib.decompressobj(-15), bytearray()
        self.sock.sendall(_deflate((1).to_bytes(4, "little") + b"GET /bytes/16 HTTP/1.1\r\nHost: x\r\n\r\n"))
        if (warm := self.status(1, deadline)) != 200:
            raise RuntimeError(f"the warm-up request got {warm}")

    def status(self, req_id: int, deadline: float) -> int:
        """The status of the response frame for ``req_id`` (the listener answers with flate)."""
        mark = req_id.to_bytes(4, "little") + b"HTTP/1.1 "
        while (i := self.plain.find(mark)) < 0 or len(self.plain) < i + len(mark) + 3:
            _check_deadline(deadline, "bomb")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"the listener closed before answering request {req_id}")
            self.plain += self.inflate.decompress(data)
        return int(self.plain[i + len(mark):i + len(mark) + 3])

    def bomb(self, plain_size: int, deadline: float, pid: int) -> dict:
        """Request 2: a POST announcing BOMB_LENGTH bytes, then ``plain_size`` zeros;
        its answer, then until the worker is idle (the rest decompressed and skipped)."""
        t0 = time.monotonic()
        wire = len(head := _deflate((2).to_bytes(4, "little") + b"POST /bomb HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: %d\r\n\r\n" % BOMB_LENGTH))
        block = _deflate(ZEROS) * 16
        sent = 0
        try:
            self.sock.sendall(head)
            while sent < plain_size:
                _check_deadline(deadline, "bomb")
                self.sock.sendall(block)
                wire += len(block)
                sent += 16 * len(ZEROS)
        except (BrokenPipeError, ConnectionResetError):
            pass                                        # the listener hung up: that bounds memory too
        try:
            status: int | str = self.status(2, deadline)
        except OSError as e:
            status = f"no answer ({e})"
        wait_idle(pid, max(1.0, deadline - time.monotonic()))
        return {"status": status, "bytes": sent, "wire": wire, "seconds": time.monotonic() - t0}

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- one case

def measure(pid: int, run) -> dict:
    """Run ``run(deadline)`` while sampling ``pid``'s RSS; its figures plus
    before, peak and growth (bytes).  An exception is recorded, not raised."""
    time.sleep(0.3)                                     # the warm-up's buffers are freed
    rss = PeakRSS(pid)
    out: dict = {}
    try:
        out = run(time.monotonic() + CASE_TIMEOUT)
    except Exception as e:                              # noqa: BLE001 - recorded in the report
        out = {"error": f"{type(e).__name__}: {e}"}
    finally:
        growth = rss.stop()
    out.update(before=rss.start, peak=rss.start + growth, growth=growth, hwm=rss.hwm,
               samples=rss.samples, after=status_bytes(pid, "VmRSS"))
    return out


def warm_up(port: int) -> None:
    """One small GET and one small POST through the proxy: pools, buffers, code."""
    deadline = time.monotonic() + 30
    download(port, 1024, deadline)
    upload(port, 1024, deadline)


def run_case(key: str, port: int, pid: int, slow_seconds: float) -> dict:
    if key == "bomb":
        peer = TeleportPeer(port, time.monotonic() + 30)
        try:
            return measure(pid, lambda deadline: peer.bomb(BOMB_PLAIN, deadline, pid))
        finally:
            peer.close()
    warm_up(port)
    if key == "download":
        return measure(pid, lambda deadline: download(port, DOWNLOAD, deadline))
    if key == "upload":
        return measure(pid, lambda deadline: upload(port, UPLOAD, deadline))
    return measure(pid, lambda deadline: download(port, DOWNLOAD, deadline, SLOW_RATE, slow_seconds))


if __name__ == "__main__":
    if sys.argv[1:] != ["upstream"]:
        raise SystemExit(f"usage: python {os.path.relpath(__file__)} upstream")
    serve_upstream()
