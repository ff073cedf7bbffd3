"""Real-socket test helpers: a recording upstream, the real `httptp` command, clients.

Nothing here is mocked: upstreams are real servers on loopback or unix sockets,
httptp runs as the installed command in a subprocess.  Every wait is bounded.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HTTPTP = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")


def wait_until(predicate, timeout=10.0, step=0.02):
    """Poll ``predicate`` until it returns something true (returned) or
    ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return False


# --------------------------------------------------------------------------- upstream

@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: list = field(default_factory=list)
    delay: float = 0.0
    raw: bytes | None = None        # send these bytes instead of a built response
    close: bool = False             # close the connection after replying
    chunked: bool = False


def read_http_message(f) -> tuple[bytes, bytes, dict] | None:
    """Read one request from a buffered socket file: (raw head, body, headers lower)."""
    lines = []
    while True:
        line = f.readline(65537)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    raw_head = b"".join(lines)
    headers = {}
    for line in lines[1:-1]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), value.strip())
    body = b""
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            line = f.readline()
            if not line:
                return None         # the proxy cut the body (e.g. its 413): the connection ends
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            parts.append(f.read(size))
            f.readline()
        body = b"".join(parts)
    elif b"content-length" in headers:
        body = f.read(int(headers[b"content-length"]))
    return raw_head, body, headers


class Upstream:
    """A threaded HTTP/1.1 upstream that records every byte it receives.

    ``handler(method, path, headers, body) -> Reply``; default answers 200 with
    the upstream's name.  ``received`` holds the raw bytes of each request,
    ``connections`` counts accepted connections.
    """

    def __init__(self, handler=None, name="up", unix_path: str | None = None, delay: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.delay = delay
        self.handler = handler or (lambda m, p, h, b: Reply(body=self.name.encode()))
        if unix_path:
            if os.path.exists(unix_path):
                os.unlink(unix_path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.addr = unix_path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.addr = "%s:%d" % (host, self.sock.getsockname()[1])
        self.sock.listen(1024)
        self.received: list[bytes] = []
        self.requests = 0
        self.connections = 0
        self.lock = threading.Lock()
        self._stop = False
        self.dead = False               # accept, then close at once: a crashed app behind its port
        self.dead_attempts = 0
        self._conns: set = set()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.dead:
                with self.lock:
                    self.dead_attempts += 1
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()   # RST: connection reset before any response byte
                continue
            with self.lock:
                self.connections += 1
                self._conns.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                msg = read_http_message(f)
                if msg is None:
                    return
                raw_head, body, headers = msg
                with self.lock:
                    self.received.append(raw_head + body)
                    self.requests += 1
                method, path = raw_head.split(b" ", 2)[:2]
                reply = self.handler(method, path, headers, body)
                delay = reply.delay or self.delay
                if delay:
                    time.sleep(delay)
                if reply.raw is not None:
                    c.sendall(reply.raw)
                else:
                    c.sendall(build_response(reply, head_only=method == b"HEAD"))
                if reply.close:
                    return
        except OSError:
            pass
        finally:
            with self.lock:
                self._conns.discard(c)
            try:
                c.close()
            except OSError:
                pass

    def kill(self):
        """Behave like a crashed app whose port still accepts: reset the live
        connections, and accept-then-reset every new one."""
        self.dead = True
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def revive(self):
        self.dead = False

    def close_idle(self):
        """Close every open connection without a word, as an upstream's
        keep-alive timeout does (FIN, no Connection: close)."""
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        if not self.addr[0].isdigit() and os.path.exists(self.addr):
            os.unlink(self.addr)


def build_response(reply: Reply, head_only=False) -> bytes:
    reason = {200: b"OK", 204: b"No Content", 304: b"Not Modified", 404: b"Not Found",
              500: b"Internal Server Error"}.get(reply.status, b"X")
    out = [b"HTTP/1.1 %d %s\r\n" % (reply.status, reason)]
    for k, v in reply.headers:
        out.append(k + b": " + v + b"\r\n")
    if reply.close:
        out.append(b"Connection: close\r\n")
    if reply.status in (204, 304):
        out.append(b"\r\n")
        return b"".join(out)
    if reply.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n\r\n")
        if not head_only:
            body = reply.body
            for i in range(0, len(body), 7):
                piece = body[i:i + 7]
                out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            out.append(b"0\r\n\r\n")
        return b"".join(out)
    out.append(b"Content-Length: %d\r\n\r\n" % len(reply.body))
    if not head_only:
        out.append(reply.body)
    return b"".join(out)


# --------------------------------------------------------------------------- httptp

_LISTEN_RE = re.compile(r"listening on (\S+) pid=(\d+)")


class HttpTp:
    """The real `httptp` command in a subprocess.  Use as a context manager."""

    def __init__(self, *args: str, workers: int = 2, env: dict | None = None, wait: bool = True,
                 wrap: list[str] | None = None):
        # ``wrap``: a command that execs httptp (keeping the pid), e.g. setpriv.
        self.args = [*(wrap or []), HTTPTP, f"-workers={workers}", *args]
        if not any(a.startswith("-in=") or a == "-in" for a in args):
            self.args.append("-in=127.0.0.1:0")
        if not any(a.startswith("-expvarAddr") for a in args):
            self.args.append("-expvarAddr=")     # many httptp run at once: no shared stats port
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=e, start_new_session=True)
        self.lines: list[str] = []
        self._listen = threading.Event()
        self.addr = None
        self.workers = workers
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.proc.stderr, self.proc.stdout)]
        for t in self._readers:
            t.start()
        if wait:
            self.wait_listening()

    def _read(self, stream):
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = _LISTEN_RE.search(line)
            if m:
                self.addr = m.group(1)
                self._listen.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self, timeout=15.0):
        if not self._listen.wait(timeout):
            self.kill()
            raise AssertionError(f"httptp did not start: {self.args}\n{self.output}")
        self.wait_ready()

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0].strip("[]")

    def wait_ready(self, timeout=15.0):
        """Until every worker answers (one worker pid per request is not visible, so
        count 'worker ... ready' lines if the master logs them, else one request)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"httptp exited {self.proc.returncode}:\n{self.output}")
            ready = sum(1 for l in self.lines if "ready" in l and "worker" in l)
            if ready >= self.workers:
                return
            time.sleep(0.02)
        # fall back: at least the master is up; requests will queue on the sockets

    def worker_pids(self) -> list[int]:
        """The master's worker children (not its helpers: stats, ACME), by title."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        pids = []
        for pid in map(int, out.stdout.split()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"httptp: worker "):
                        pids.append(pid)
            except OSError:
                pass
        return pids

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def wait(self, timeout=30.0) -> int:
        """The exit status, once every line the process wrote is in ``lines``
        (its last lines could still be in the pipe when it has exited)."""
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def status_bytes(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


class PeakRSS:
    """A process's RSS growth over a stretch of work: its peak (VmHWM, reset
    first when we may, and VmRSS sampled every 10 ms in a thread) minus its
    RSS at the start.  For tests/process/test_streaming.py and bench/memory.py."""

    def __init__(self, pid: int):
        self.pid, self.samples = pid, 0
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")        # VmHWM := VmRSS (Linux 4.0+; root or the owner)
            self.hwm = True
        except OSError:
            self.hwm = False
        self.start = self.peak = status_bytes(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, status_bytes(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, RuntimeError):
                return
            self._stop.wait(0.01)

    def growth(self) -> int:
        peak = self.peak
        if self.hwm:
            peak = max(peak, status_bytes(self.pid, "VmHWM"))
        return peak - self.start

    def stop(self) -> int:
        """Stop sampling; the growth in bytes."""
        self._stop.set()
        self._thread.join(5)
        return self.growth()


_HANDED_OUT: set[int] = set()
_PORTS_RNG = random.Random()        # seeded from os.urandom: runs side by side differ


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port for a program that must be told its port before it binds
    (pebble's validation ports, httptp's -in, a documented config).

    A port from ``bind(0)`` is in the kernel's ephemeral range: between the choice
    and its use, any outgoing connection or port-0 bind on the machine can take it
    (EADDRINUSE, seen in CI). These come from just below that range, where the
    kernel never hands ports out itself, are never given twice in one run, and are
    checked free (no listener, no connection) when chosen."""
    low = _ephemeral_low()
    first = max(1024, low - 12000)
    if low - first < 1000:                   # an odd range: fall back on the kernel
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = _PORTS_RNG.randrange(first, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))   # no SO_REUSEADDR: TIME_WAIT counts as taken
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise AssertionError(f"no free port in {first}..{low - 1}")


def dead_address() -> str:
    """A loopback port nobody listens on (connections are refused); like
    free_port, no port-0 bind elsewhere in the run can start listening there."""
    return "127.0.0.1:%d" % free_port()


def run_httptp(*args: str, timeout=10.0, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([HTTPTP, *args], capture_output=True, text=True, timeout=timeout, env=e,
                          stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- clients

def raw_exchange(addr, data: bytes, timeout=5.0, family=socket.AF_INET, half_close=False) -> bytes:
    """Send raw bytes, read until the server closes (or timeout); return all bytes."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(addr)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)
    finally:
        s.close()


def split_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream of Content-Length framed responses."""
    out = []
    while data:
        end = data.index(b"\r\n\r\n")
        head = data[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, data[end + 4:end + 4 + n]))
        data = data[end + 4 + n:]
    return out


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10.0):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def get(conn: http.client.HTTPConnection, path="/", method="GET", body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


class LoadResult:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.statuses: dict[int, int] = {}
        self.bodies: dict[bytes, int] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    @property
    def total(self):
        return self.ok + self.failed


def load(host, port, *, threads=8, duration=3.0, max_requests=100000, path="/",
         family=socket.AF_INET, stop: threading.Event | None = None) -> LoadResult:
    """Keep-alive GET load, bounded in time and count.

    Behaves as an ordinary HTTP client: a request on a *reused* connection that
    fails before any response byte is retried once on a new connection (RFC 9112
    §9.3.1 allows it for idempotent requests); any other failure counts.
    """
    res = LoadResult()
    deadline = time.monotonic() + duration
    counter = iter(range(max_requests))
    lock = threading.Lock()

    def next_ticket():
        with lock:
            return next(counter, None)

    def one(conn_box):
        for attempt in (0, 1):
            conn = conn_box[0]
            fresh = conn is None
            if fresh:
                conn = conn_box[0] = http.client.HTTPConnection(host, port, timeout=10)
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn_box[0] = None
                return r.status, body
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionRefusedError):
                conn.close()
                conn_box[0] = None
                if fresh or attempt:
                    raise
            except Exception:
                conn.close()
                conn_box[0] = None
                raise

    def run():
        box = [None]
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if next_ticket() is None:
                break
            try:
                status, body = one(box)
            except Exception as e:
                with res.lock:
                    res.failed += 1
                    res.errors.append(repr(e))
                continue
            with res.lock:
                res.statuses[status] = res.statuses.get(status, 0) + 1
                res.bodies[body] = res.bodies.get(body, 0) + 1
                if status == 200:
                    res.ok += 1
                else:
                    res.failed += 1
        if box[0] is not None:
            box[0].close()

    ts = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + 30)
    return res


from httptp.relay import Relay  # noqa: E402,F401  (shared with the demo)


def decompress_all(dec, data: bytes) -> bytes:
    """Feed ``data`` to a teleport ``Decompressor`` and join every slice it
    gives (tests only: a driver checks its limits between slices)."""
    dec.feed(data)
    out = []
    while plain := dec.read():
        out.append(plain)
    return b"".join(out)



class Peer:
    """A teleport client on a raw socket: handshake, frames through a codec
    (``sock`` is there for raw bytes)."""

    def __init__(self, host: str, port: int, codec: str = "none", timeout: float = 30.0):
        from httptp.teleport import handshake
        from httptp.teleport.codecs import compressor, decompressor
        from httptp.teleport.framing import FrameReader
        from httptp.teleport.handshake import BY_NAME
        self.sock = socket.create_connection((host, port), timeout=timeout)
        c = BY_NAME[codec]
        self.sock.sendall(handshake.encode(c, False))
        head = b""
        while len(head) < 15:
            part = self.sock.recv(15 - len(head))
            assert part, "the server closed during the handshake"
            head += part
        theirs, _ = handshake.decode(head)
        self.comp = compressor(c, 1 if codec in ("flate", "zstd", "brotli") else None)
        self.dec = decompressor(theirs)
        self.frames = FrameReader("response", 1 << 20)
        self.got: list = []

    def send(self, plain: bytes) -> int:
        data = self.comp.compress(plain) + self.comp.flush()
        self.sock.sendall(data)
        return len(data)

    def request(self, req_id: int, method=b"GET", target=b"/", body=b"", headers=()) -> None:
        from httptp.teleport.framing import encode_request
        self.send(encode_request(req_id, method, target, [(b"Host", b"x"), *headers], body))

    def answer(self, req_id: int):
        """The response frame for ``req_id`` (head, body), or None if the server closed."""
        while True:
            for rid, head, body in self.got:
                if rid == req_id:
                    return head, body
            data = self.sock.recv(65536)
            if not data:
                return None
            self.got += self.frames.feed(decompress_all(self.dec, data))

    def closed_by_server(self) -> bool:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.got += self.frames.feed(decompress_all(self.dec, data))
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()
