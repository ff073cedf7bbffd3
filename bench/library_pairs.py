"""In-process req/s of the teleport library: a client and a server in one
process on loopback, the gevent pair (``Client``/``Server``) against the
asyncio pair (``AsyncClient``/``AsyncServer``) on the default loop and on
uvloop.  Each run sends ``--requests`` small POSTs with ``--concurrency`` in
flight on one connection, after a warm-up; the best of ``--rounds`` is
printed, one line per pair.  Not part of ``make bench``: it takes seconds.

    python bench/library_pairs.py [--requests 5000] [--concurrency 50] [--codec zstd]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BODY = b'{"id":"a1b2c3","imp":[{"id":"1","banner":{"w":300,"h":250},"bidfloor":0.5}]}'


def gevent_pair(n: int, conc: int, codec: str) -> float:
    import gevent
    from gevent.pool import Pool
    from httptp.teleport import Client, Server

    srv = Server(lambda req: (200, {"Content-Type": "application/json"}, req.body),
                 compress=codec)
    addr = srv.start("127.0.0.1:0")
    c = Client(addr, compress=codec, max_pending=conc * 2)
    pool = Pool(conc)

    def one(_):
        assert c.post("/bid", BODY).status_code == 200
    list(pool.imap_unordered(one, range(200)))          # warm-up
    t0 = time.perf_counter()
    list(pool.imap_unordered(one, range(n)))
    dt = time.perf_counter() - t0
    c.close()
    srv.stop(timeout=1)
    gevent.sleep(0)
    return n / dt


def asyncio_pair(n: int, conc: int, codec: str, loop: str) -> float:
    import asyncio
    from httptp.teleport.aio import AsyncClient, AsyncServer

    async def handler(req):
        return 200, {"Content-Type": "application/json"}, req.body

    async def main():
        async with AsyncServer(handler, compress=codec) as srv:
            addr = await srv.start("127.0.0.1:0")
            async with AsyncClient(addr, compress=codec, max_pending=conc * 2) as c:
                async def worker(count):
                    for _ in range(count):
                        assert (await c.post("/bid", BODY)).status_code == 200
                await asyncio.gather(*(worker(200 // conc + 1) for _ in range(conc)))
                t0 = time.perf_counter()
                await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
                return (n // conc * conc) / (time.perf_counter() - t0)

    factory = None
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--codec", default="zstd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)      # a pair, in this process
    a = ap.parse_args()
    if a.one:
        if a.one == "gevent":
            rate = gevent_pair(a.requests, a.concurrency, a.codec)
        else:
            rate = asyncio_pair(a.requests, a.concurrency, a.codec, a.one)
        print(f"{rate:.0f}")
        return
    pairs = ["gevent", "asyncio"]
    try:
        import uvloop  # noqa: F401
        pairs.append("uvloop")
    except ImportError:
        pass
    best = {p: 0.0 for p in pairs}
    for _ in range(a.rounds):               # alternate the pairs, each in a fresh process
        for p in pairs:
            out = subprocess.run([sys.executable, __file__, "--one", p,
                                  f"--requests={a.requests}", f"--concurrency={a.concurrency}",
                                  f"--codec={a.codec}"], capture_output=True, text=True,
                                 timeout=300, check=True)
            best[p] = max(best[p], float(out.stdout.strip()))
    for p in pairs:
        print(f"{p:8s} {best[p]:8.0f} req/s  ({a.requests} POSTs, {a.concurrency} in flight, "
              f"{a.codec}, one connection, best of {a.rounds})")


if __name__ == "__main__":
    main()
