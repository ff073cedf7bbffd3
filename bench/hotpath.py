"""Microseconds of CPU per proxied request, in one process, without wrk's noise.

A client greenlet and an upstream greenlet talk to a real httptp worker object
(its accept watcher, ``ClientConn`` + ``Proxy``, http in, unix-socket http out) over unix
sockets, all on one gevent hub.  The same client and upstream are then run
directly against each other; the difference is what the proxy costs per
request.  It is a profiling aid: run it under py-spy or with ``--profile``
(cProfile, sorted by own time) to see where the hot path spends its time.

    python bench/hotpath.py [--requests N] [--conns C] [--parser httptools|h11] [--profile]
                            [--only proxied|direct]

Nothing here touches the network: the sockets are unix sockets in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import gevent
from gevent import socket

BODY = b'{"id":"%s","seatbid":[{"bid":[{"id":"1","impid":"1","price":0.42,"adm":"%s"}]}]}' % (
    b"a" * 32, b"x" * 1900)
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 11:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
            % len(BODY) + BODY)
REQUEST = (b"GET /bid?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")


def upstream_server(path: str) -> gevent.Greenlet:
    """A keep-alive upstream that answers every request head with RESPONSE."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(128)

    def conn(sock):
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                buf = buf[end + 4:]
                sock.sendall(RESPONSE)

    def accept():
        while True:
            s, _ = lsock.accept()
            gevent.spawn(conn, s)
    return gevent.spawn(accept)


def read_response(sock, buf: bytes) -> bytes:
    """Read one whole response (Content-Length framing as both the upstream and
    the proxy send it; 204 and 304 have none) after ``buf``; return what
    follows it.  Anything but 200/204/304 stops the run."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            if buf.startswith(b"HTTP/1.1 204 ") or buf.startswith(b"HTTP/1.1 304 "):
                total = end + 4
            elif buf.startswith(b"HTTP/1.1 200 "):
                at = buf.find(b"Content-Length: ", 0, end) + 16
                total = end + 4 + int(buf[at:buf.index(b"\r\n", at)])
            else:
                raise SystemExit(f"hotpath: unexpected response {buf[:end].decode()!r}")
            if len(buf) >= total:
                return buf[total:]
        data = sock.recv(65536)
        if not data:
            raise SystemExit("hotpath: the connection closed early")
        buf += data


def client(connect, n: int) -> None:
    """One keep-alive client: ``n`` requests, each response read whole."""
    sock = connect()
    buf = b""
    for _ in range(n):
        sock.sendall(REQUEST)
        buf = read_response(sock, buf)
    sock.close()


def run_clients(connect, conns: int, per_conn: int) -> float:
    t0 = time.process_time()
    gevent.joinall([gevent.spawn(client, connect, per_conn) for _ in range(conns)], raise_error=True)
    return time.process_time() - t0


def start_worker(parser: str):
    """A real worker object on this hub (http in on a unix socket, unix out to
    ``upstream_server``), accepting with its own watcher as in ``serve()``;
    returns (worker, the path clients connect to)."""
    from httptp.config import load_config
    from httptp.stats import Stats
    from httptp.supervisor.arbiter import _upstream_names
    from httptp.workers.worker import Worker

    tmp = tempfile.mkdtemp(prefix="httptp-hotpath-")
    up_path, in_path = os.path.join(tmp, "up.sock"), os.path.join(tmp, "in.sock")
    upstream_server(up_path)
    cfg = load_config([f"-in={in_path}", "-inType=unix", f"-out={up_path}", "-outType=unix",
                       "-workers=1", "-expvarAddr=", f"-httpParser={parser}",
                       "-logAllErrors"], {})
    stats = Stats.create(max_blocks=4)
    ids = stats.assign_upstreams(_upstream_names(cfg))
    block = stats.claim_block(os.getpid(), 0, 0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(in_path)
    listener.listen(128)
    worker = Worker(cfg, listener, stats, block, 0, 0, list(ids))
    worker._accept_watcher = gevent.get_hub().loop.io(worker.listener.fileno(), 1)
    worker._accept_watcher.start(worker._on_accept)
    return worker, in_path


def connect_to(path: str):
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return s
    return connect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60000)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--parser", default="httptools")
    ap.add_argument("--profile", action="store_true", help="cProfile the proxied run")
    ap.add_argument("--only", choices=("proxied", "direct"),
                    help="run one of the two (bench/count_instructions.py --sockets)")
    args = ap.parse_args()

    worker, in_path = start_worker(args.parser)
    up_path = os.path.join(os.path.dirname(in_path), "up.sock")

    per_conn = max(1, args.requests // args.conns)
    n = per_conn * args.conns
    run_clients(connect_to(in_path), args.conns, 200)      # warm up pools and caches
    if args.only is not None:
        run_clients(connect_to(in_path if args.only == "proxied" else up_path), args.conns,
                    per_conn)
        return 0
    direct = run_clients(connect_to(up_path), args.conns, per_conn)
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    proxied = run_clients(connect_to(in_path), args.conns, per_conn)
    if prof is not None:
        prof.disable()
    print(f"{n} requests on {args.conns} connections, parser {args.parser}")
    print(f"  client+upstream only : {direct / n * 1e6:6.1f} us CPU/request")
    print(f"  through the proxy    : {proxied / n * 1e6:6.1f} us CPU/request")
    print(f"  the proxy's share    : {(proxied - direct) / n * 1e6:6.1f} us CPU/request")
    if prof is not None:
        import pstats
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
