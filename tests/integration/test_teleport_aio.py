"""The asyncio teleport library (``httptp.teleport.aio``) on real loopback
sockets, in this process: ``AsyncClient`` against ``AsyncServer`` on the
default loop and on uvloop, every codec, batching, TLS, limits, timeouts and
errors; and against the gevent ``Client``/``Server`` both ways (the gevent
side in this thread, the asyncio side in a thread of its own: nothing is
monkey-patched, each side has its own sockets).  Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time

import pytest

from httptp.errors import GatewayTimeout, ResponseTooLarge, UpstreamError
from httptp.teleport.aio import AsyncClient, AsyncServer, HTTPStatusError
from tests.helpers import dead_address

pytestmark = pytest.mark.timeout(90)

CODECS = ["none", "flate", "snappy", "zstd", "brotli"]


def _loops():
    kinds = ["asyncio"]
    try:
        import uvloop  # noqa: F401
        kinds.append("uvloop")
    except ImportError:
        pass
    return kinds


@pytest.fixture(params=_loops())
def loop_kind(request):
    return request.param


def arun(main, loop_kind="asyncio", timeout=30.0):
    """Run the coroutine function ``main`` on a fresh loop of ``loop_kind``,
    failing after ``timeout`` seconds."""
    async def bounded():
        async with asyncio.timeout(timeout):
            return await main()
    factory = None
    if loop_kind == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


class Sink(list):
    def __call__(self, msg):
        self.append(msg)


async def echo(req):
    """GET: the Host; POST/PUT: the body; /sleep?ms=N sleeps; /json: a JSON
    document built from the query and body."""
    if req.path.startswith("/sleep"):
        await asyncio.sleep(int(req.path.rsplit("=", 1)[1]) / 1000)
        return 200, {"Content-Type": "text/plain"}, b"slept"
    if req.path.startswith("/json"):
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"path": req.path, "body": req.json() if req.body else None,
             "ctype": req.header("content-type")})
    if req.path == "/missing":
        return 404, {}, "no such thing\n"
    if req.method in ("POST", "PUT"):
        return 200, [], req.body
    return 200, [("Content-Type", "text/plain")], req.header("host")


def gated(gate):
    """``echo``, but ``/hold`` waits for ``gate`` (an asyncio.Event): answers
    held as long as a test wants, with no timing involved."""
    async def handler(req):
        if req.path == "/hold":
            await gate.wait()
            return 200, {}, b"held"
        return await echo(req)
    return handler


# --------------------------------------------------------------------------- asyncio pair

@pytest.mark.parametrize("client_codec", CODECS)
@pytest.mark.parametrize("server_codec", ["flate", "auto"])
def test_every_codec(loop_kind, client_codec, server_codec):
    async def main():
        async with AsyncServer(echo, compress=server_codec, log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, compress=client_codec) as c:
                r = await c.do("GET", "/a", host="foobar.com")
                assert (r.status, r.body) == (200, b"foobar.com")
                big = bytes(range(256)) * 1200
                rs = await asyncio.gather(*(c.post(f"/p{i}", content=big + b"%d" % i)
                                            for i in range(20)))
                assert [r.content for r in rs] == [big + b"%d" % i for i in range(20)]
    arun(main, loop_kind)


def test_concurrent_answers_in_completion_order(loop_kind):
    async def main():
        gate = asyncio.Event()
        async with AsyncServer(gated(gate), log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, compress="zstd") as c:
                slow = asyncio.ensure_future(c.get("/hold"))
                fast = await c.get("/", host="x")
                assert fast.text == "x" and not slow.done()
                gate.set()
                assert (await slow).text == "held"
                rs = await asyncio.gather(*(c.get("/", host=f"h{i}") for i in range(300)))
                assert [r.text for r in rs] == [f"h{i}" for i in range(300)]
    arun(main, loop_kind)


def test_httpx_like_conveniences():
    async def main():
        async with AsyncServer(echo, log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr) as c:
                r = await c.request("POST", "http://api.example.com/json?a=1",
                                    params={"b": "x y"}, json={"k": [1, 2]})
                r.raise_for_status()
                assert r.status_code == 200 and r.is_success
                assert r.headers["content-type"] == "application/json"
                assert "Content-Type" in r.headers
                assert r.json() == {"path": "/json?a=1&b=x+y", "body": {"k": [1, 2]},
                                    "ctype": "application/json"}
                r = await c.get("https://api.example.com/")
                assert r.text == "api.example.com"
                r = await c.get("/missing")
                assert r.status_code == 404 and r.text == "no such thing\n"
                with pytest.raises(HTTPStatusError) as e:
                    r.raise_for_status()
                assert e.value.response is r and "404" in str(e.value)
                with pytest.raises(ValueError):
                    await c.get("/", content=b"a body on a GET")
    arun(main)


def test_batching_with_a_delay(loop_kind):
    """Both sides batching (``delay``): every request of a burst is answered,
    with consecutive ids on one connection."""
    async def main():
        async with AsyncServer(echo, delay=0.02, log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, delay=0.02, compress="flate") as c:
                rs = await asyncio.gather(*(c.get("/", host=f"b{i}") for i in range(50)))
                assert [r.text for r in rs] == [f"b{i}" for i in range(50)]
                link = c._pool[0]._link
                assert link.conn.next_id == 51
    arun(main, loop_kind)


def test_timeout_pending_limit_and_closed():
    async def main():
        gate = asyncio.Event()
        async with AsyncServer(gated(gate), log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, max_pending=2, timeout=0.2) as c:
                with pytest.raises(GatewayTimeout):
                    await c.get("/hold")
                slow = [asyncio.ensure_future(c.get("/hold", timeout=10)) for _ in range(2)]
                await asyncio.sleep(0)               # both submitted
                with pytest.raises(UpstreamError, match="too many pending"):
                    await c.get("/", timeout=5)
                gate.set()
                assert [r.text for r in await asyncio.gather(*slow)] == ["held", "held"]
                # the late answer to the timed-out request was dropped; the link lives on
                assert (await c.get("/", host="after")).text == "after"
            with pytest.raises(UpstreamError, match="closed"):
                await c.get("/")
    arun(main)


def test_dial_failure_is_sticky_for_a_while():
    async def main():
        logs = Sink()
        async with AsyncClient(dead_address(), log=logs) as c:
            with pytest.raises(UpstreamError, match="cannot connect: Connection refused") as e1:
                await c.get("/")
            assert e1.value.sent_nothing_back
            t0 = time.monotonic()
            with pytest.raises(UpstreamError) as e2:
                await c.get("/")
            assert str(e2.value) == str(e1.value) and time.monotonic() - t0 < 1
        assert logs
    arun(main)


def test_limits_413_429_and_too_large_response():
    async def main():
        gate = asyncio.Event()

        async def handler(req):
            if req.path == "/hold":
                await gate.wait()
            if req.path == "/huge":
                return 200, {}, b"x" * 5000
            return 200, {}, b"ok"
        logs = Sink()
        async with AsyncServer(handler, concurrency=1, max_body_size=1000, log=logs) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, timeout=5) as c:
                r = await c.post("/", content=b"y" * 2000)
                assert r.status == 413 and r.text == "request body too large\n"
                held = asyncio.ensure_future(c.get("/hold"))
                await asyncio.sleep(0.05)
                r = await c.get("/")
                assert r.status == 429 and "concurrency limit of 1" in r.text
                gate.set()
                assert (await held).content == b"ok"
            async with AsyncClient(addr, max_body_size=1000) as c:
                with pytest.raises(ResponseTooLarge):
                    await c.get("/huge")
                assert (await c.get("/")).content == b"ok"     # a new connection
        assert any("413" in line for line in logs)
    arun(main)


def test_handler_errors_are_500_and_sync_handlers_work():
    def handler(req):
        if req.path == "/boom":
            raise RuntimeError("kaput")
        return 201, {"X-Sync": "yes"}, "made"
    logs = Sink()

    async def main():
        async with AsyncServer(handler, log=logs) as srv:
            addr = await srv.start()
            async with AsyncClient(addr) as c:
                r = await c.get("/boom")
                assert (r.status, r.content) == (500, b"internal error\n")
                r = await c.put("/", content="x")
                assert (r.status, r.reason, r.header("x-sync"), r.text) == (
                    201, "Created", "yes", "made")
    arun(main)
    assert any("kaput" in line for line in logs)


def test_unix_socket(tmp_path):
    path = str(tmp_path / "t.sock")

    async def main():
        async with AsyncServer(echo, log=Sink()) as srv:
            addr = await srv.start(f"unix:{path}")
            assert addr == f"unix:{path}"
            async with AsyncClient(addr) as c:
                assert (await c.get("/")).text == "localhost"
    arun(main)


# --------------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def test_tls(loop_kind, tls):
    server_ctx, client_ctx = tls

    async def main():
        logs = Sink()
        async with AsyncServer(echo, ssl=server_ctx, compress="auto", log=logs) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, ssl=client_ctx, compress="zstd") as c:
                rs = await asyncio.gather(*(c.post("/", content=b"s%d" % i) for i in range(20)))
                assert [r.content for r in rs] == [b"s%d" % i for i in range(20)]
            async with AsyncClient(addr) as plain:       # no TLS asked: refused
                with pytest.raises(UpstreamError, match="requires TLS"):
                    await plain.get("/")
            async with AsyncClient(addr, ssl=ssl.create_default_context()) as stranger:
                with pytest.raises(UpstreamError, match="TLS handshake failed"):
                    await stranger.get("/")             # the CA is not trusted
        async with AsyncServer(echo, log=logs) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, ssl=client_ctx) as c:
                with pytest.raises(UpstreamError, match="refused TLS"):
                    await c.get("/")
    arun(main, loop_kind)


# --------------------------------------------------------------------------- with gevent

class AsyncioThread:
    """An event loop in a thread of its own, for the asyncio side of an
    interop test while gevent runs in this one."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout=30.0):
        """Run ``coro`` there; wait here (yielding to gevent) for its result."""
        import gevent
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = time.monotonic() + timeout
        while not fut.done():
            if time.monotonic() > deadline:
                fut.cancel()
                raise AssertionError("the asyncio side did not finish in time")
            gevent.sleep(0.005)
        return fut.result()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def aio_thread():
    t = AsyncioThread()
    yield t
    t.close()


@pytest.mark.parametrize("codec", CODECS)
def test_asyncio_client_to_gevent_server(aio_thread, codec):
    from httptp.teleport import Server

    def handler(req):
        return 200, {"X-Peer": "gevent"}, req.body if req.method == "POST" else req.path

    srv = Server(handler, compress="auto", log=Sink())
    addr = srv.start("127.0.0.1:0")
    try:
        async def client():
            async with AsyncClient(addr, compress=codec) as c:
                rs = await asyncio.gather(*(c.post("/", content=b"q%d" % i * 500)
                                            for i in range(30)))
                r = await c.get("/path?x=1")
                return [x.content for x in rs], r.text, r.headers["x-peer"]
        bodies, text, peer = aio_thread.call(client())
        assert bodies == [b"q%d" % i * 500 for i in range(30)]
        assert (text, peer) == ("/path?x=1", "gevent")
    finally:
        srv.stop(timeout=1)


@pytest.mark.parametrize("codec", CODECS)
def test_gevent_client_to_asyncio_server(aio_thread, codec):
    import gevent
    from httptp.teleport import Client

    srv = AsyncServer(echo, compress="auto", log=Sink())
    addr = aio_thread.call(srv.start())
    try:
        with Client(addr, compress=codec) as c:
            jobs = [gevent.spawn(c.post, "/", b"g%d" % i * 500) for i in range(30)]
            gevent.joinall(jobs, timeout=20)
            assert [j.get().content for j in jobs] == [b"g%d" % i * 500 for i in range(30)]
            r = c.request("POST", "/json", json={"from": "gevent"})
            assert r.json()["body"] == {"from": "gevent"}
    finally:
        aio_thread.call(srv.stop(timeout=1))


# --------------------------------------------------------------------------- Go captures

def _go_cases():
    from tests.unit.test_teleport_vectors import CASES
    return CASES


@pytest.mark.parametrize("case", _go_cases(), ids=lambda c: c["case"])
def test_asyncio_server_answers_a_go_client_stream(case):
    """The bytes a Go httptp client wrote (shared/vectors) go to an
    AsyncServer as they are; its answers, decoded independently of it, are
    what the Go server answered."""
    from httptp.teleport import handshake
    from httptp.teleport.codecs import decompressor
    from httptp.teleport.framing import FrameReader
    from tests.helpers import decompress_all
    from tests.unit.test_teleport_vectors import load

    def handler(req):
        path = req.path
        if path == "/big":
            return 200, {}, f"len={len(req.body)}"
        if path == "/nobid":
            return 204, {}, b""
        return 200, {}, f"echo:{path}"

    exchanges = case["exchanges"]

    async def main():
        async with AsyncServer(handler, compress="auto", log=Sink()) as srv:
            addr = await srv.start()
            host, port = addr.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(load(case, "c2s"))
            hello = await reader.readexactly(15)
            codec, tls = handshake.decode(hello)
            assert codec == handshake.BY_NAME[case["client_compress"]] and not tls
            dec, frames = decompressor(codec), FrameReader("response", 65536)
            got = []
            while len(got) < len(exchanges):
                data = await reader.read(65536)
                assert data, "server closed early"
                got += frames.feed(decompress_all(dec, data))
            writer.close()
            return got

    got = sorted(arun(main), key=lambda f: f[0])
    assert [(i, h.status, b.decode()) for i, h, b in got] == [
        (n, x["response"]["status"], x["response"]["body"])
        for n, x in enumerate(exchanges, 1)]


@pytest.mark.parametrize("case", _go_cases(), ids=lambda c: c["case"])
def test_asyncio_client_reads_a_go_server_stream(case):
    """A peer that replays what a Go httptp server wrote (handshake and
    compressed answers): an AsyncClient with the same requests in flight
    reads every answer."""
    from tests.unit.test_teleport_vectors import load

    s2c = load(case, "s2c")
    exchanges = case["exchanges"]

    async def replay(reader, writer):
        await reader.readexactly(15)
        writer.write(s2c)
        await writer.drain()
        await reader.read(1 << 20)          # until the client goes
        writer.close()

    async def main():
        srv = await asyncio.start_server(replay, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            async with AsyncClient(f"127.0.0.1:{port}", compress=case["client_compress"],
                                   timeout=10) as c:
                calls = []
                for x in exchanges:
                    rq = x["request"]
                    body = (rq["body_utf8"].encode() if rq["body_utf8"] is not None
                            else b"\0" * rq["body_len"])
                    calls.append(c.request(rq["method"], rq["path"], headers=rq["headers"],
                                           content=body or None))
                rs = await asyncio.gather(*calls)
                return [(r.status_code, r.text) for r in rs]
        finally:
            srv.close()

    assert arun(main) == [(x["response"]["status"], x["response"]["body"]) for x in exchanges]


# --------------------------------------------------------------------------- edges

def test_stop_lets_running_handlers_answer():
    async def main():
        started = asyncio.Event()

        async def handler(req):
            started.set()
            await asyncio.sleep(0.2)
            return 200, {}, b"finished"
        srv = AsyncServer(handler, log=Sink())
        addr = await srv.start()
        async with AsyncClient(addr, timeout=5) as c:
            pending = asyncio.ensure_future(c.get("/"))
            await started.wait()
            await srv.stop(timeout=5)
            assert (await pending).content == b"finished"
            with pytest.raises(UpstreamError):          # nothing listens any more
                await c.get("/")
    arun(main)


def test_head_has_no_body_and_id_0_gets_no_answer():
    from httptp.teleport import handshake
    from httptp.teleport.codecs import compressor, decompressor
    from httptp.teleport.framing import FrameReader, encode_request
    from tests.helpers import decompress_all

    ran = []

    async def handler(req):
        ran.append(req.path)
        return 200, {"X-Len": "5"}, b"hello"

    async def main():
        async with AsyncServer(handler, log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr) as c:
                r = await c.head("/h")
                assert (r.status_code, r.content, r.headers["x-len"]) == (200, b"", "5")
            host, port = addr.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            comp = compressor(handshake.Compress.NONE)
            writer.write(handshake.encode(handshake.Compress.NONE, False) + comp.compress(
                encode_request(0, b"GET", b"/nowait", [(b"Host", b"a")], b"")
                + encode_request(7, b"GET", b"/seven", [(b"Host", b"a")], b"")) + comp.flush())
            hello = await reader.readexactly(15)
            dec, frames = decompressor(handshake.decode(hello)[0]), FrameReader("response", 4096)
            got = []
            while not got:
                data = await reader.read(65536)
                assert data
                got += frames.feed(decompress_all(dec, data))
            writer.close()
            return [f[0] for f in got]

    assert arun(main) == [7]
    assert sorted(ran) == ["/h", "/nowait", "/seven"]


def test_a_cancelled_request_is_forgotten():
    async def main():
        gate = asyncio.Event()
        async with AsyncServer(gated(gate), log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, timeout=5) as c:
                task = asyncio.ensure_future(c.get("/hold"))
                await asyncio.sleep(0.05)
                assert c.pending == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert c.pending == 0
                assert (await c.get("/", host="next")).text == "next"
                gate.set()
    arun(main)


def test_asgi_errors_and_scope():
    from httptp.teleport.aio import asgi_server

    seen = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")      # allowed: lifespan unsupported
        if not seen:
            seen.update(scope)
        msg = await receive()
        if scope["path"] == "/boom":
            raise ValueError("app bug")
        await send({"type": "http.response.start", "status": 202,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"99")]})
        await send({"type": "http.response.body", "body": b"got ", "more_body": True})
        await send({"type": "http.response.body", "body": msg["body"]})

    logs = Sink()

    async def main():
        srv, lifespan = asgi_server(app, log=logs)
        await lifespan.startup()
        assert not lifespan.supported
        addr = await srv.start()
        try:
            async with AsyncClient(addr) as c:
                r = await c.post("/a%20b?x=1", content=b"data", headers={"X-Y": "z"})
                assert (r.status_code, r.text) == (202, "got data")
                r = await c.get("/boom")
                assert r.status_code == 500
        finally:
            await srv.stop()
            await lifespan.shutdown()
        return addr

    addr = arun(main)
    assert seen["path"] == "/a b" and seen["raw_path"] == b"/a%20b"
    assert seen["query_string"] == b"x=1" and seen["method"] == "POST"
    assert (b"x-y", b"z") in seen["headers"]
    assert seen["client"][0] == "127.0.0.1"
    assert seen["server"] == ("127.0.0.1", int(addr.rsplit(":", 1)[1]))
    assert any("app bug" in line for line in logs)


def test_several_connections_and_a_server_that_hangs_up():
    async def main():
        async with AsyncServer(echo, log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, conns=3, compress="snappy") as c:
                rs = await asyncio.gather(*(c.get("/", host=f"c{i}") for i in range(60)))
                assert [r.text for r in rs] == [f"c{i}" for i in range(60)]
                assert sum(one._link is not None for one in c._pool) == 3

        async def hang_up(reader, writer):
            from httptp.teleport import handshake
            await reader.readexactly(15)
            writer.write(handshake.encode(handshake.Compress.NONE, False))
            await reader.read(1)                     # the first request's first byte
            writer.transport.abort()

        raw = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = raw.sockets[0].getsockname()[1]
        logs = Sink()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", log=logs, timeout=5) as c:
                with pytest.raises(UpstreamError) as e:
                    await c.post("/", content=b"x")
                assert e.value.sent_nothing_back is False
        finally:
            raw.close()
        assert logs and "failed" in logs[0]
    arun(main)


def test_a_compression_bomb_over_the_body_limit_is_413_and_skipped():
    """20 MiB of zeros (20 KiB of flate on the wire) announced to a server
    whose limit is 1000 bytes: answered 413 at once, the body skipped as it
    is decompressed, and the connection serves the next request."""
    import zlib

    from httptp.teleport import handshake
    from httptp.teleport.codecs import decompressor
    from httptp.teleport.framing import FrameReader, encode_request
    from tests.helpers import decompress_all

    size = 20 << 20

    async def main():
        async with AsyncServer(echo, max_body_size=1000, log=Sink()) as srv:
            addr = await srv.start()
            host, port = addr.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            z = zlib.compressobj(6, zlib.DEFLATED, -15)
            head = encode_request(1, b"POST", b"/bomb", [(b"Host", b"a")], b"")
            head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % size)
            writer.write(handshake.encode(handshake.Compress.FLATE, False))
            writer.write(z.compress(head))
            zeros = bytes(1 << 20)
            for _ in range(20):
                writer.write(z.compress(zeros))
            writer.write(z.compress(encode_request(2, b"GET", b"/", [(b"Host", b"after")],
                                                   b"")) + z.flush(zlib.Z_SYNC_FLUSH))
            hello = await reader.readexactly(15)
            dec, frames = decompressor(handshake.decode(hello)[0]), FrameReader("response", 4096)
            got = []
            while len(got) < 2:
                data = await reader.read(65536)
                assert data
                got += frames.feed(decompress_all(dec, data))
            writer.close()
            return {i: (h.status, b) for i, h, b in got}

    assert arun(main) == {1: (413, b"request body too large\n"), 2: (200, b"after")}


def test_starlette_streaming_and_json_in_process():
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from httptp.teleport.aio import serve_asgi

    async def stream(request):
        async def parts():
            for i in range(5):
                yield f"part{i};"
        return StreamingResponse(parts(), media_type="text/plain")

    async def doc(request):
        return JSONResponse({"got": await request.json()})

    app = Starlette(routes=[Route("/stream", stream), Route("/doc", doc, methods=["POST"])])

    async def main():
        where = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(serve_asgi(app, "127.0.0.1:0", log=Sink(),
                                                started=where.set_result))
        addr = await asyncio.wait_for(where, 5)
        try:
            async with AsyncClient(addr) as c:
                r = await c.get("/stream")
                assert (r.status_code, r.text) == (200, "part0;part1;part2;part3;part4;")
                r = await c.post("/doc", json={"a": [1]})
                assert r.json() == {"got": {"a": [1]}}
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=5)
    arun(main)


def test_a_client_moves_to_a_new_loop_only_once_the_old_one_is_closed():
    """One asyncio.run after another may share a client; two loops open at
    once may not (a clear RuntimeError, not a hang)."""
    server_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()
    srv = AsyncServer(echo, log=Sink())
    try:
        addr = asyncio.run_coroutine_threadsafe(srv.start(), server_loop).result(10)
        c = AsyncClient(addr)

        async def ask(name):
            assert (await c.get("/", host=name)).text == name
        arun(lambda: ask("first"))
        arun(lambda: ask("second"))              # the first loop is closed: it moves

        other = asyncio.new_event_loop()
        try:
            other.run_until_complete(ask("third"))     # bound to `other`, still open

            async def from_here():
                with pytest.raises(RuntimeError, match="another event loop"):
                    await c.get("/")
            arun(from_here)
            other.run_until_complete(c.aclose())
        finally:
            other.close()
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(timeout=1), server_loop).result(10)
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join(5)
        server_loop.close()


def test_a_client_that_stops_reading_is_cut_after_write_timeout():
    """Big answers to a peer that never reads: the server stops reading its
    requests (bounded buffers), and once nothing leaves for write_timeout it
    closes the connection."""
    from httptp.teleport import handshake
    from httptp.teleport.codecs import compressor
    from httptp.teleport.framing import encode_request

    async def big(req):
        return 200, {}, bytes(512 * 1024)

    async def main():
        async with AsyncServer(big, write_timeout=0.5, compress="none", log=Sink()) as srv:
            addr = await srv.start()
            host, port = addr.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            # a small receive buffer: the kernel holds little of what we never read
            import socket
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                       4096)
            comp = compressor(handshake.Compress.NONE)
            writer.write(handshake.encode(handshake.Compress.NONE, False) + comp.compress(
                b"".join(encode_request(i, b"GET", b"/", [(b"Host", b"a")], b"")
                         for i in range(1, 65))) + comp.flush())
            await writer.drain()
            for _ in range(200):                     # bounded: 10 s
                if not srv._conns:
                    break
                await asyncio.sleep(0.05)
            assert not srv._conns, "the stuck peer was not cut"
            writer.close()
    arun(main)


def test_serve_until_cancelled():
    async def main():
        srv = AsyncServer(echo, log=Sink())
        task = asyncio.ensure_future(srv.serve("127.0.0.1:0"))
        for _ in range(200):                         # bounded: 2 s
            if srv.address:
                break
            await asyncio.sleep(0.01)
        async with AsyncClient(srv.address) as c:
            assert (await c.get("/", host="s")).text == "s"
            task.cancel()
            await asyncio.wait([task], timeout=5)
            assert task.done()
            with pytest.raises(UpstreamError):
                await c.get("/")
    arun(main)


def test_threads_run_blocking_plain_handlers_side_by_side(loop_kind):
    """As the gevent Server's: N handlers blocked on a threading.Barrier of
    N all return, and the loop stays free meanwhile."""
    n = 5
    barrier = threading.Barrier(n, timeout=10)
    lock = threading.Lock()
    running = [0, 0]

    def handler(req):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        try:
            if req.path != "/free":
                barrier.wait()
            time.sleep(0.01)
        finally:
            with lock:
                running[0] -= 1
        return 200, {}, f"ok {threading.current_thread().name.split('_')[0]}"

    async def main():
        async with AsyncServer(handler, threads=n, log=Sink()) as srv:
            addr = await srv.start()
            async with AsyncClient(addr, timeout=20) as c:
                rs = await asyncio.gather(*(c.get(f"/{i}") for i in range(n)))
                assert {r.text for r in rs} == {"ok teleport-handler"}
                assert running[1] == n
                assert (await c.get("/free")).status_code == 200
    arun(main, loop_kind)
