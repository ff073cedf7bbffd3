"""The gevent library and OS threads: ``Server(handler, threads=N)`` runs
handlers that block the ordinary way (``time.sleep``, a lock, a driver) in a
gevent thread pool, and a ``Client`` used from a thread other than its own
says so clearly.  Plus the httpx-like conveniences of the gevent ``Client``.
Real loopback sockets, no monkey-patching, every wait bounded."""

from __future__ import annotations

import threading
import time

import gevent
import pytest

from httptp.teleport import Client, HTTPStatusError, Server, WrongThread

pytestmark = pytest.mark.timeout(60)


class Sink(list):
    def __call__(self, msg):
        self.append(msg)


def test_threads_run_blocking_handlers_side_by_side():
    """N requests whose handlers each block on a threading.Barrier of N:
    they can only all return if N handlers run at the same time (on the hub
    alone the first would block everything).  The most seen at once is N."""
    n = 6
    barrier = threading.Barrier(n, timeout=10)
    lock = threading.Lock()
    running = [0, 0]                                 # now, most at once
    threads_seen = set()

    def handler(req):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            threads_seen.add(threading.get_ident())
        try:
            if req.path != "/again":
                barrier.wait()                       # blocks this OS thread
            time.sleep(0.01)                         # the ordinary blocking sleep
        finally:
            with lock:
                running[0] -= 1
        return 200, {}, f"ok {req.path}"

    srv = Server(handler, threads=n, log=Sink())
    addr = srv.start("127.0.0.1:0")
    try:
        with Client(addr, timeout=20) as c:
            jobs = [gevent.spawn(c.get, f"/{i}") for i in range(n)]
            gevent.joinall(jobs, timeout=30)
            assert [j.get().text for j in jobs] == [f"ok /{i}" for i in range(n)]
            assert running[1] == n
            assert threading.get_ident() not in threads_seen
            # the hub kept serving while handlers blocked in threads
            assert c.get("/again").text == "ok /again"
    finally:
        srv.stop(timeout=2)


def test_threads_limit_how_many_run_at_once():
    lock = threading.Lock()
    running = [0, 0]

    def handler(req):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return 200, {}, b"ok"

    srv = Server(handler, threads=2, log=Sink())
    addr = srv.start("127.0.0.1:0")
    try:
        with Client(addr, timeout=20) as c:
            jobs = [gevent.spawn(c.get, "/") for _ in range(8)]
            gevent.joinall(jobs, timeout=30)
            assert [j.get().content for j in jobs] == [b"ok"] * 8
            assert 1 <= running[1] <= 2
    finally:
        srv.stop(timeout=2)


def test_a_handler_exception_in_a_thread_is_a_500():
    def handler(req):
        raise KeyError("nope")
    logs = Sink()
    srv = Server(handler, threads=1, log=logs)
    addr = srv.start("127.0.0.1:0")
    try:
        with Client(addr) as c:
            r = c.get("/")
            assert (r.status_code, r.content) == (500, b"internal error\n")
    finally:
        srv.stop(timeout=2)
    assert any("KeyError" in line for line in logs)


def test_a_client_refuses_a_foreign_thread():
    srv = Server(lambda req: (200, {}, b"hi"), log=Sink())
    addr = srv.start("127.0.0.1:0")
    try:
        with Client(addr) as c:
            assert c.get("/").content == b"hi"          # this thread owns it now
            box = {}

            def other():
                try:
                    c.get("/")
                except Exception as e:                   # noqa: BLE001 - kept for the check
                    box["error"] = e
            t = threading.Thread(target=other, name="worker-7")
            t.start()
            while t.is_alive():                          # bounded: the thread fails at once
                gevent.sleep(0.01)
                t.join(0.01)
            err = box["error"]
            assert isinstance(err, WrongThread) and isinstance(err, RuntimeError)
            assert "worker-7" in str(err) and "one Client per thread" in str(err)
            assert c.get("/").content == b"hi"          # still fine here
    finally:
        srv.stop(timeout=2)


def test_httpx_like_conveniences():
    def handler(req):
        if req.path.startswith("/json"):
            return 200, {"Content-Type": "application/json"}, (
                '{"path": "%s", "host": "%s", "n": %d}'
                % (req.path, req.header("host"), req.json()["n"] if req.body else 0))
        return 503, {"Retry-After": "1"}, "busy"

    srv = Server(handler, log=Sink())
    addr = srv.start("127.0.0.1:0")
    try:
        with Client(addr) as c:
            r = c.post("http://svc.local/json", params=[("a", "1"), ("a", "2")], json={"n": 7})
            assert r.raise_for_status() is r
            assert r.json() == {"path": "/json?a=1&a=2", "host": "svc.local", "n": 7}
            assert r.headers.get("CONTENT-TYPE") == "application/json"
            assert r.status == r.status_code == 200 and r.body == r.content
            r = c.delete("/x", headers={"X-A": "b"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            with pytest.raises(HTTPStatusError, match="Server error '503"):
                r.raise_for_status()
            # the low-level call is still there
            assert c.do("GET", "/json", host="h").json()["host"] == "h"
    finally:
        srv.stop(timeout=2)


def test_a_client_inside_a_running_asyncio_loop_says_to_use_the_async_one():
    import asyncio

    async def main():
        with Client("127.0.0.1:1") as c:
            with pytest.raises(RuntimeError, match="AsyncClient"):
                c.get("/")
    asyncio.run(main())
