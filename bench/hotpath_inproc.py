"""Python CPU per proxied request with no syscall at all: the protocol objects alone.

``bench/hotpath.py`` measures the proxy with real sockets, so its figure
includes the kernel's share and moves with the machine's load.  This one
drives the same objects (a real ``Worker``: ``ClientConn``, ``Proxy``,
``Exchange``, the upstream pool and ``UpstreamConn``) by calling their
``data_received`` directly, with the transports' sockets swapped for fakes that
take every write: what is left is the Python the hot path runs per request
(parsing, checks, header policy, balancing, timers, counters, serialising).
It is the figure to compare before and after a change to the hot path; run it
a few times (alternating) and compare.

    python bench/hotpath_inproc.py [--requests N] [--parser httptools|h11] [--profile]
"""

from __future__ import annotations

import argparse
import os
import socket as _socket
import sys
import time

import gevent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hotpath  # noqa: E402  (the same request, response and worker setup)


class _Sink:
    """A socket that takes every byte at once (``Transport.write`` sends here)."""

    def __init__(self):
        self.sent = 0

    def send(self, data) -> int:
        self.sent += 1
        return len(data)

    def fileno(self) -> int:       # only for close(): never a real descriptor
        return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--parser", default="httptools")
    ap.add_argument("--profile", action="store_true", help="cProfile the run")
    args = ap.parse_args()

    from httptp.io.http_server import ClientConn
    from httptp.io.transport import IN, Transport

    worker, in_path = hotpath.start_worker(args.parser)
    hotpath.run_clients(hotpath.connect_to(in_path), 1, 2)     # one pooled upstream connection
    pool = worker.proxy.upstreams[0]
    (up,) = pool._idle
    up_sink = up.transport.sock = _Sink()

    ours, peer = _socket.socketpair()
    conn = ClientConn(worker.ctx, None)
    conn.transport = Transport(ours, conn, worker.stats.q, worker.base, IN)
    worker.clients.add(conn)
    conn.start()
    client_sink = conn.transport.sock = _Sink()

    request, response = hotpath.REQUEST, hotpath.RESPONSE
    creceived, ureceived = conn.data_received, up.data_received

    def run(n: int) -> float:
        t0 = time.process_time()
        for _ in range(n):
            creceived(request)
            ureceived(response)
        return time.process_time() - t0

    run(2000)
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    # in batches: the fastest batch is the figure least disturbed by the
    # rest of the machine (the median is shown beside it)
    batch = max(1, args.requests // 20)
    times = sorted(run(batch) / batch for _ in range(args.requests // batch))
    if prof is not None:
        prof.disable()
    n = batch * len(times)
    if client_sink.sent < n or up_sink.sent < n:
        raise SystemExit(f"hotpath_inproc: {client_sink.sent} responses and {up_sink.sent} "
                         f"upstream requests for {n} requests")
    print(f"{n} requests, parser {args.parser}: {times[0] * 1e6:.1f} us of Python per proxied "
          f"request, no syscalls (fastest of {len(times)} batches; median "
          f"{times[len(times) // 2] * 1e6:.1f})")
    if prof is not None:
        import pstats
        pstats.Stats(prof, stream=sys.stdout).sort_stats(
            os.environ.get("HOTPATH_SORT", "tottime")).print_stats(int(os.environ.get("HOTPATH_N", "30")))
    peer.close()
    gevent.get_hub().loop.break_()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
