"""What ``Server(handler, threads=N)`` costs: the gevent library pair in one
process (loopback, one connection, codec none), a trivial echo handler run in
greenlets (``threads=0``) or in a thread pool, 4,000 POSTs with 50 in flight,
three rounds after a warm-up; prints req/s and the process's CPU per request
of each round.  Numbers: docs/benchmarks.md (issue 15).

    python bench/library_threads.py 0
    python bench/library_threads.py 8
"""

from __future__ import annotations

import sys
import time

from gevent.pool import Pool

from httptp.teleport import Client, Server


def main(threads: int, n: int = 4000, conc: int = 50) -> None:
    srv = Server(lambda req: (200, {}, req.body), threads=threads, compress="none")
    addr = srv.start("127.0.0.1:0")
    c = Client(addr, compress="none", max_pending=conc * 4)
    pool = Pool(conc)

    def one(_):
        return c.post("/", b"x" * 80)
    list(pool.imap_unordered(one, range(500)))          # warm-up
    for _ in range(3):
        t0, cpu0 = time.perf_counter(), time.process_time()
        list(pool.imap_unordered(one, range(n)))
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(f"threads={threads} {n / dt:.0f} req/s, {cpu / n * 1e6:.0f} us CPU/request")
    c.close()
    srv.stop(timeout=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
