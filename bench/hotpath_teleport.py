"""Microseconds of CPU per request through a teleport chain, in one process.

The chain of bench/suite.py parts 2 and 3, on one gevent hub:

    client --unix--> A (ClientConn + Proxy, -outType=teleport)
           --tcp 127.0.0.1--> B (TeleportServerConn + Proxy, -outType=unix)
           --unix--> upstream

A and B are real ``Worker`` objects built from real configurations, each with
its own stats block, so everything but the accept loops and the processes is
the code a deployment runs.  The same clients are then run straight against
the upstream; the difference is what the chain (A and B together) costs per
request.  The teleport leg is TCP because teleport addresses are host:port.

    python bench/hotpath_teleport.py [--codec zstd] [--delay 0] [--post]
                                     [--requests N] [--conns C] [--profile]
                                     [--callers REGEX]
    python bench/hotpath_teleport.py --aggregate py-spy-raw.txt

``--post`` sends RTB-like bid requests (bench/rtb.py ``Traffic(1)``, ~1.5 KB
of JSON) and the upstream answers like the suite's bidder: 204 to 3 requests
in 5, else a ~530-byte bid with fresh ids.  Without it: a GET answered with
the ~2 KB body of bench/hotpath.py.

To see where the time goes, sample it (more than ~500 Hz perturbs gevent's
timing):

    py-spy record -r 400 --function -f raw -o /tmp/spy.txt -- \\
        python bench/hotpath_teleport.py --post --codec zstd
    python bench/hotpath_teleport.py --aggregate /tmp/spy.txt

Nothing here touches the network beyond 127.0.0.1: the other sockets are unix
sockets in a temp dir, and every loop is bounded by ``--requests``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import gevent
from gevent import socket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hotpath import REQUEST as GET_REQUEST, RESPONSE as GET_RESPONSE  # noqa: E402
from hotpath import connect_to, read_response  # noqa: E402

NO_BID = (b"HTTP/1.1 204 No Content\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 11:00:00 GMT\r\n"
          b"Connection: keep-alive\r\n\r\n")
# The suite's nginx bidder: the ids change with every answer.
BID = (b'{"id":"%(id)s","seatbid":[{"seat":"bidder-1","bid":[{"id":"%(id)s-0","impid":"1",'
       b'"price":0.8123,"adm":"<a href=\\"https://click.acme-shoes.com/c?s=news.example&amp;'
       b'cr=cr-%(n)d\\"><img src=\\"https://cdn.acme-shoes.com/300x250/cr-%(n)d.jpg\\" '
       b'width=\\"300\\" height=\\"250\\"></a>","adomain":["acme-shoes.com"],"crid":"cr-%(n)d",'
       b'"w":300,"h":250,"nurl":"https://win.bidder.example/n?id=%(id)s&t=%(n)d"}]}],'
       b'"cur":"USD","bidid":"%(id)s"}')
POST_BODIES = 2000


def post_requests() -> list[bytes]:
    """wrk's requests of suite part 3: its Lua script's headers, one body each."""
    import rtb
    traffic = rtb.Traffic(1)
    head = (b"POST /openrtb2/auction HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in rtb.HEADERS.items()))
    out = []
    for _ in range(POST_BODIES):
        body = traffic.request()
        out.append(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return out


# --------------------------------------------------------------------------- upstream

def _bid_answer(n: int) -> bytes:
    if n % 5 < 3:
        return NO_BID
    body = BID % {b"id": os.urandom(16).hex().encode(), b"n": n}
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 11:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
            % len(body) + body)


def upstream_server(path: str, post: bool) -> gevent.Greenlet:
    """A keep-alive upstream: GET_RESPONSE to a GET, a bidder's answer to a POST."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(128)

    def conn(sock):
        buf = b""
        n = 0
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            out = []
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                size = 0
                at = buf.find(b"Content-Length: ", 0, end)
                if at >= 0:
                    at += 16
                    size = int(buf[at:buf.index(b"\r\n", at)])
                if len(buf) < end + 4 + size:
                    break
                buf = buf[end + 4 + size:]
                n += 1
                out.append(_bid_answer(n) if post else GET_RESPONSE)
            if out:
                sock.sendall(b"".join(out))

    def accept():
        while True:
            s, _ = lsock.accept()
            gevent.spawn(conn, s)
    return gevent.spawn(accept)


# --------------------------------------------------------------------------- clients

def client(connect, requests: list[bytes], cursor: list, n: int) -> None:
    """One keep-alive client: ``n`` requests, each response read whole
    (Content-Length framing; 204 and 304 have no body).  The request is the
    next one of ``requests`` after ``cursor[0]``, a cursor shared with the other
    clients of the same wrk thread, as the suite's Lua script does (so a body
    comes back only after the whole list: no unrealistically long matches for
    the compressor)."""
    sock = connect()
    buf = b""
    count = len(requests)
    for _ in range(n):
        i = cursor[0] = (cursor[0] + 1) % count
        sock.sendall(requests[i])
        buf = read_response(sock, buf)
    sock.close()


def run_clients(connect, requests: list[bytes], conns: int, per_conn: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``conns`` clients of ``per_conn`` requests."""
    cursors = [[0], [997]]             # wrk -t2: two threads, each with its own cursor
    t0, w0 = time.process_time(), time.perf_counter()
    gevent.joinall([gevent.spawn(client, connect, requests, cursors[i % 2], per_conn)
                    for i in range(conns)], raise_error=True)
    return time.process_time() - t0, time.perf_counter() - w0


# --------------------------------------------------------------------------- the chain

def build_worker(argv: list[str], listener):
    """A Worker with its own stats block, as one httptp process would have."""
    from httptp.config import load_config
    from httptp.stats import Stats
    from httptp.supervisor.arbiter import _upstream_names
    from httptp.workers.worker import Worker
    cfg = load_config(argv + ["-workers=1", "-expvarAddr=", "-logAllErrors"], {})
    stats = Stats.create(max_blocks=2)
    ids = stats.assign_upstreams(_upstream_names(cfg))
    block = stats.claim_block(os.getpid(), 0, 0)
    return Worker(cfg, listener, stats, block, 0, 0, list(ids))


def start_chain(tmp: str, up_path: str, codec: str, delay: str):
    """B then A; return (A's unix path, A's worker, B's worker).  Each accepts
    with its own watcher (``Worker._on_accept``), as in a worker process."""
    b_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    b_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    b_listener.bind(("127.0.0.1", 0))
    b_listener.listen(128)
    b_port = b_listener.getsockname()[1]
    b = build_worker([f"-in=127.0.0.1:{b_port}", "-inType=teleport", f"-inCompress={codec}",
                      f"-inDelay={delay}", f"-out={up_path}", "-outType=unix"], b_listener)

    in_path = os.path.join(tmp, "a.sock")
    a_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    a_listener.bind(in_path)
    a_listener.listen(128)
    a = build_worker([f"-in={in_path}", "-inType=unix", f"-out=127.0.0.1:{b_port}",
                      "-outType=teleport", f"-outCompress={codec}", f"-outDelay={delay}"],
                     a_listener)
    loop = gevent.get_hub().loop
    for w in (b, a):
        w._accept_watcher = loop.io(w.listener.fileno(), 1)
        w._accept_watcher.start(w._on_accept)
    return in_path, a, b


def link_counters(a, b) -> tuple[int, int, int, int, int, int]:
    """(plain HTTP bytes on A's client side, bytes on A's teleport link,
    A's teleport writes (batches), A's teleport reads, B's writes, B's reads)."""
    ca = a.stats.block_counters(a.block)
    cb = b.stats.block_counters(b.block)
    return (ca["inBytesRead"] + ca["inBytesWritten"], ca["outBytesRead"] + ca["outBytesWritten"],
            ca["outWriteCalls"], ca["outReadCalls"], cb["inWriteCalls"], cb["inReadCalls"])


# --------------------------------------------------------------------------- py-spy output

# Where a sampled stack starts (the greenlet's function) says whose work it is.
# Both httptp sides run in the hub's callbacks (no greenlet per connection,
# exchange or link since issue 11), so the hub's share is all of A and B.
ROLES = (
    ("client ", "bench: clients"),
    ("upstream_server.", "bench: upstream"),
    ("Hub.run", "hub (libev callbacks: all of A and B)"),
)


def _role(root: str) -> str:
    for prefix, role in ROLES:
        if root.startswith(prefix):
            return role
    return "other (start-up, imports)"


def aggregate(path: str, top: int) -> None:
    """Self and inclusive sample counts per function, and samples per role,
    from ``py-spy -f raw`` (one ``frame;frame;... count`` line per stack,
    outermost first): of this tool's process, or of a real worker
    (``py-spy record -p PID``, where connection work starts in Hub.run).  Stacks of gevent's resolver thread (a getaddrinfo
    thread parked on a lock) are left out: they are not the hub's CPU."""
    own, incl, roles = Counter(), Counter(), Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or "threadpool.py" in stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            roles[_role(frames[0])] += n
            for name in set(frames):
                incl[name] += n
    print(f"{total} samples")
    for title, table, rows in (("role", roles, len(roles)), ("self", own, top),
                               ("inclusive", incl, top)):
        print(f"\n{title:>9}  function")
        for name, n in table.most_common(rows):
            print(f"{100 * n / total:8.1f}%  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--requests", type=int, default=40000)
    ap.add_argument("--conns", type=int, default=64, help="client connections (wrk -c of the suite)")
    ap.add_argument("--codec", default="zstd", choices=("none", "flate", "snappy", "zstd", "brotli"))
    ap.add_argument("--delay", default="0", help="-outDelay and -inDelay (e.g. 0, 5ms)")
    ap.add_argument("--post", action="store_true", help="RTB-like POST bodies to a bidder")
    ap.add_argument("--profile", action="store_true", help="cProfile the chained run (own time)")
    ap.add_argument("--callers", metavar="REGEX",
                    help="with --profile: also who called the functions matching REGEX")
    ap.add_argument("--aggregate", metavar="RAW", help="summarise a py-spy raw file and exit")
    ap.add_argument("--top", type=int, default=40, help="rows of --aggregate and --profile")
    args = ap.parse_args()
    if args.aggregate:
        aggregate(args.aggregate, args.top)
        return 0

    requests = post_requests() if args.post else [GET_REQUEST]
    tmp = tempfile.mkdtemp(prefix="httptp-hotpath-tp-")
    try:
        up_path = os.path.join(tmp, "up.sock")
        upstream_server(up_path, args.post)
        in_path, a, b = start_chain(tmp, up_path, args.codec, args.delay)
        per_conn = max(1, args.requests // args.conns)
        n = per_conn * args.conns
        run_clients(connect_to(in_path), requests, args.conns, 200)     # warm up
        direct, _ = run_clients(connect_to(up_path), requests, args.conns, per_conn)
        before = link_counters(a, b)
        prof = None
        if args.profile:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        chained, wall = run_clients(connect_to(in_path), requests, args.conns, per_conn)
        if prof is not None:
            prof.disable()
        after = link_counters(a, b)
        kind = "POST (RTB bodies)" if args.post else "GET"
        print(f"{n} {kind} requests on {args.conns} connections, codec {args.codec}, "
              f"delay {args.delay}")
        print(f"  client+upstream only : {direct / n * 1e6:6.1f} us CPU/request")
        print(f"  through the chain    : {chained / n * 1e6:6.1f} us CPU/request "
              f"({n / wall:,.0f} req/s on one core)")
        print(f"  the chain's share    : {(chained - direct) / n * 1e6:6.1f} us CPU/request")
        plain, link, a_w, a_r, b_w, b_r = (y - x for x, y in zip(before, after))
        print(f"  link / plain bytes   : {link / max(1, plain):.3f} "
              f"({link / n:,.0f} of {plain / n:,.0f} B/request)")
        print(f"  requests per write   : A {n / max(1, a_w):.2f}, B {n / max(1, b_w):.2f}; "
              f"per read: A {n / max(1, a_r):.2f}, B {n / max(1, b_r):.2f}")
        if prof is not None:
            import pstats
            st = pstats.Stats(prof, stream=sys.stdout)
            st.sort_stats("tottime").print_stats(args.top)
            if args.callers:
                st.print_callers(args.callers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
