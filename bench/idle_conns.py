"""Hold N idle keep-alive HTTP connections open to a server (part 4 of bench/suite.py).

Every connection sends one GET and reads the whole response, so the server
holds it as a real idle keep-alive connection, not a half-open one.  The
connections come from several loopback source addresses (127.0.0.2, .3, ...):
one source address and one destination give at most the ephemeral port range
(32768-60999 here, ~28K ports).  IP_BIND_ADDRESS_NO_PORT lets the kernel pick
the port at connect() by the whole 4-tuple.  At most --window connections are
in flight at a time, so the server's accept queue (somaxconn) never overflows.
Then they are held until stdin closes (the bench is done, or gone), SIGTERM,
or --hold seconds.

One thread, one epoll, non-blocking sockets and no gevent: the client side
adds nothing to the server's work but the connections themselves.  Each
connection takes a descriptor here as well; where RLIMIT_NOFILE is too low for
N, run several holders on the same sources (bench/suite.py does): the kernel
keeps their 4-tuples apart.

    python bench/idle_conns.py 127.0.0.1:PORT --conns 100000

Prints one line for each event, on stdout:

    progress opened=N answered=N failed=N          every second while opening
    holding N failed=F errors={...} sources=K seconds=S
    closed-by-server N                              while holding, when it changes
    released N                                      at the end
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import select
import signal
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: idle-conns\r\n\r\n"
LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
PORTS_USED = 0.7        # share of the ephemeral range we plan to use per source address


def sources_needed(conns: int) -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = map(int, f.read().split())
    return max(1, math.ceil(conns / ((hi - lo + 1) * PORTS_USED)))


def response_done(buf: bytes) -> int | None:
    """The status once ``buf`` holds a whole response, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status = int(buf[9:12])
    m = LENGTH.search(buf, 0, end)
    need = 0 if status in (204, 304) or not m else int(m.group(1))
    return status if len(buf) >= end + 4 + need else None


class Holder:
    def __init__(self, target: tuple[str, int], sources: list[str]):
        self.target, self.sources = target, sources
        self.ep = select.epoll()
        self.pending: dict[int, list] = {}     # fd → [sock, response so far, or None before the request]
        self.held: dict[int, socket.socket] = {}
        self.opened = self.failed = self.closed_by_server = 0
        self.errors: dict[str, int] = {}

    def fail(self, fd: int, why: str) -> None:
        sock, _ = self.pending.pop(fd)
        self.ep.unregister(fd)
        sock.close()
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1

    def open_one(self) -> bool:
        """Start one connection; False when this process is out of descriptors."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                return False
            raise
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((self.sources[self.opened % len(self.sources)], 0))
            err = sock.connect_ex(self.target)
        except OSError as e:
            err = e.errno
        self.opened += 1
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            name = errno.errorcode.get(err, str(err))
            self.errors[name] = self.errors.get(name, 0) + 1
            return True
        self.pending[sock.fileno()] = [sock, None]
        self.ep.register(sock.fileno(), select.EPOLLOUT)
        return True

    def on_pending(self, fd: int) -> None:
        entry = self.pending[fd]
        sock, buf = entry
        if buf is None:                                       # connected, or failed to
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.fail(fd, errno.errorcode.get(err, str(err)))
            sock.send(REQUEST)
            entry[1] = bytearray()
            self.ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            return self.fail(fd, errno.errorcode.get(e.errno, str(e.errno)))
        if not data:
            return self.fail(fd, "closed before the response")
        buf += data
        status = response_done(bytes(buf))
        if status is None:
            return
        if status != 200:
            return self.fail(fd, f"status {status}")
        del self.pending[fd]
        self.held[fd] = sock                                  # still registered: tells us of a close

    def on_held(self, fd: int) -> None:
        self.ep.unregister(fd)
        self.held.pop(fd).close()
        self.closed_by_server += 1

    def open_all(self, conns: int, window: int, seconds: float, stall: float) -> None:
        """Open ``conns`` connections, at most ``window`` in flight; give up after
        ``seconds``, or when none was answered or failed for ``stall`` seconds
        (the server stopped accepting: its descriptors or -concurrency ran out)."""
        now = time.monotonic()
        deadline, next_report, last_change, done = now + seconds, now + 1, now, 0
        fds_left = True
        while len(self.held) + self.failed < conns and now < deadline and now - last_change < stall:
            while fds_left and self.opened < conns and len(self.pending) < window:
                fds_left = self.open_one()
            if not fds_left and not self.pending:
                break
            for fd, _ in self.ep.poll(0.1):
                if fd in self.pending:
                    self.on_pending(fd)
                elif fd in self.held:
                    self.on_held(fd)
            now = time.monotonic()
            if len(self.held) + self.failed != done:
                done, last_change = len(self.held) + self.failed, now
            if now >= next_report:
                next_report += 1
                print(f"progress opened={self.opened} answered={len(self.held)} failed={self.failed}",
                      flush=True)
        for fd in list(self.pending):
            self.fail(fd, "no answer in time")
        if conns > self.opened:                                # never opened
            self.failed += conns - self.opened
            why = "out of time" if fds_left else "out of descriptors (RLIMIT_NOFILE)"
            self.errors[f"not opened: {why}"] = conns - self.opened

    def hold(self, seconds: float) -> None:
        """Until stdin reaches EOF or ``seconds`` pass; report the server's closes."""
        try:
            self.ep.register(sys.stdin.fileno(), select.EPOLLIN | select.EPOLLHUP)
        except PermissionError:                 # stdin is a file or /dev/null: hold for the time cap
            pass
        deadline = time.monotonic() + seconds
        reported = self.closed_by_server
        while time.monotonic() < deadline:
            for fd, _ in self.ep.poll(1.0):
                if fd == sys.stdin.fileno():
                    if not os.read(fd, 4096):
                        return
                elif fd in self.held:
                    self.on_held(fd)
            if self.closed_by_server != reported:
                reported = self.closed_by_server
                print(f"closed-by-server {reported}", flush=True)

    def release(self) -> int:
        n = len(self.held)
        for sock in self.held.values():
            sock.close()
        for sock, _ in self.pending.values():
            sock.close()
        self.held.clear()
        self.pending.clear()
        return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="HOST:PORT of the server (loopback)")
    ap.add_argument("--conns", type=int, default=100000)
    ap.add_argument("--sources", type=int, default=0,
                    help="source addresses 127.0.0.2... to use (0: enough for --conns)")
    ap.add_argument("--window", type=int, default=200, help="connections in flight while opening")
    ap.add_argument("--open-seconds", type=float, default=300, help="time cap for opening them all")
    ap.add_argument("--stall-seconds", type=float, default=15,
                    help="stop opening when nothing was answered for this long")
    ap.add_argument("--hold", type=float, default=900, help="time cap for holding them")
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    if not host.startswith("127."):
        raise SystemExit("idle_conns: loopback targets only")
    count = args.sources or sources_needed(args.conns)
    sources = [f"127.0.0.{2 + i}" for i in range(min(count, 250))]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    holder = Holder((host, int(port)), sources)
    t0 = time.monotonic()
    try:
        holder.open_all(args.conns, args.window, args.open_seconds, args.stall_seconds)
        print(f"holding {len(holder.held)} failed={holder.failed} errors={holder.errors} "
              f"sources={len(sources)} seconds={time.monotonic() - t0:.1f}", flush=True)
        holder.hold(args.hold)
    finally:
        print(f"released {holder.release()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
