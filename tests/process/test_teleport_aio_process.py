"""The asyncio teleport library against the real ``httptp`` command, both
ways, every codec: ``AsyncClient`` → ``httptp -inType=teleport`` → an HTTP
upstream, and HTTP → ``httptp -outType=teleport`` → ``AsyncServer``; then a
real Starlette application served by ``serve_asgi`` behind
``httptp -outType=teleport``.  The asyncio side runs in a thread of its own
with its own loop; every wait is bounded."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading

import pytest

from httptp.teleport.aio import AsyncClient, AsyncServer, serve_asgi
from tests.helpers import HttpTp, Reply, Upstream

pytestmark = pytest.mark.timeout(120)

CODECS = ["none", "flate", "snappy", "zstd", "brotli"]


class Loop:
    """An asyncio loop in a thread (the test's thread drives HTTP clients)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout=30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def aio():
    lp = Loop()
    yield lp
    lp.close()


def http_request(host, port, method, path, body=None, headers=None, timeout=10.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _echo_upstream(method, path, headers, body):
    return Reply(body=b"%s %s %s|" % (method, path, headers.get(b"host", b"")) + body,
                 headers=[(b"Content-Type", b"text/plain")])


def test_asyncio_client_through_httptp_inType_teleport(aio):
    up = Upstream(handler=_echo_upstream)
    try:
        with HttpTp("-inType=teleport", "-inCompress=auto", "-outType=http",
                    f"-out={up.addr}", workers=1) as p:
            async def each_codec():
                out = {}
                for codec in CODECS:
                    async with AsyncClient(f"127.0.0.1:{p.port}", compress=codec,
                                           timeout=10) as c:
                        rs = await asyncio.gather(
                            *(c.post(f"/{codec}/{i}", content=b"x" * (i * 1000),
                                     host="app.example") for i in range(20)))
                        r = await c.get("/q", params={"codec": codec})
                        out[codec] = ([(x.status_code, x.content) for x in rs],
                                      r.status_code, r.text)
                return out
            got = aio.call(each_codec(), timeout=60)
        for codec in CODECS:
            posts, status, text = got[codec]
            assert posts == [(200, b"POST /%s/%d app.example|" % (codec.encode(), i)
                              + b"x" * (i * 1000)) for i in range(20)], codec
            assert status == 200 and text.startswith(f"GET /q?codec={codec} "), codec
    finally:
        up.close()


@pytest.mark.parametrize("codec", CODECS)
def test_httptp_outType_teleport_to_asyncio_server(aio, codec):
    seen = []

    async def handler(req):
        seen.append(req.header("x-forwarded-for") or req.header("x-real-ip"))
        return 200, {"Content-Type": "text/plain", "X-Served-By": "asyncio"}, \
            f"{req.method} {req.path} ".encode() + req.body

    srv = AsyncServer(handler, compress="auto", log=lambda m: None)
    addr = aio.call(srv.start("127.0.0.1:0"))
    try:
        with HttpTp("-outType=teleport", f"-out={addr}", f"-outCompress={codec}",
                    workers=1) as p:
            status, headers, body = http_request(p.host, p.port, "GET", "/hello?a=1")
            assert (status, body) == (200, b"GET /hello?a=1 ")
            assert headers.get("X-Served-By") == "asyncio"
            status, _, body = http_request(p.host, p.port, "POST", "/up", body=b"z" * 70000,
                                           headers={"Content-Type": "application/octet-stream"})
            assert (status, body) == (200, b"POST /up " + b"z" * 70000)
    finally:
        aio.call(srv.stop(timeout=1))


def _starlette_app(events):
    starlette = pytest.importorskip("starlette")
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    @asynccontextmanager
    async def lifespan(app):
        events.append("startup")
        yield {"greeting": "hello"}
        events.append("shutdown")

    async def user(request):
        return JSONResponse({"id": int(request.path_params["id"]),
                             "q": request.query_params.get("q"),
                             "host": request.headers.get("host"),
                             "greeting": request.state.greeting,
                             "client": request.client.host if request.client else None})

    async def echo(request):
        body = await request.body()
        return PlainTextResponse(f"{request.method} {len(body)} "
                                 f"{request.headers.get('content-type')}",
                                 status_code=201)

    assert starlette
    return Starlette(routes=[Route("/users/{id:int}", user),
                             Route("/echo", echo, methods=["POST", "PUT"])],
                     lifespan=lifespan)


def test_serve_asgi_starlette_behind_httptp(aio):
    events = []
    app = _starlette_app(events)
    bound = asyncio.Event()
    box = {}

    def started(addr):
        box["addr"] = addr
        bound.set()

    async def start():
        task = asyncio.get_running_loop().create_task(
            serve_asgi(app, "127.0.0.1:0", started=started, compress="auto",
                       log=lambda m: None))
        await asyncio.wait([task, asyncio.ensure_future(bound.wait())], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        assert bound.is_set(), "serve_asgi did not start"
        return task

    async def stop(task):
        task.cancel()
        await asyncio.wait([task], timeout=10)

    task = aio.call(start())
    try:
        with HttpTp("-outType=teleport", f"-out={box['addr']}", "-outCompress=zstd",
                    workers=1) as p:
            status, headers, body = http_request(p.host, p.port, "GET", "/users/42?q=x%20y",
                                                 headers={"Host": "api.example"})
            assert status == 200 and headers["content-type"] == "application/json"
            doc = json.loads(body)
            assert doc == {"id": 42, "q": "x y", "host": "api.example", "greeting": "hello",
                           "client": "127.0.0.1"}
            status, _, body = http_request(p.host, p.port, "POST", "/echo", body=b"b" * 5000,
                                           headers={"Content-Type": "text/csv"})
            assert (status, body) == (201, b"POST 5000 text/csv")
            status, _, _ = http_request(p.host, p.port, "GET", "/nowhere")
            assert status == 404
    finally:
        aio.call(stop(task))
    assert events == ["startup", "shutdown"]


@pytest.fixture
def certs(tmp_path):
    trustme = pytest.importorskip("trustme")
    import ssl
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    crt, key, ca_file = tmp_path / "srv.pem", tmp_path / "srv.key", tmp_path / "ca.pem"
    for pem in cert.cert_chain_pems:
        pem.write_to_path(str(crt), append=True)
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return {"crt": crt, "key": key, "ca": ca_file, "server": server, "client": client}


def test_tls_both_ways_with_httptp_teleports(aio, certs):
    """AsyncClient(ssl=) → httptp -inType=teleports, and httptp
    -outType=teleports → AsyncServer(ssl=)."""
    up = Upstream(handler=_echo_upstream)
    srv = AsyncServer(lambda req: (200, {}, b"tls " + req.body), ssl=certs["server"],
                      compress="auto", log=lambda m: None)
    addr = aio.call(srv.start("127.0.0.1:0"))
    try:
        with HttpTp("-inType=teleports", f"-inTLSCert={certs['crt']}",
                    f"-inTLSKey={certs['key']}", "-outType=http", f"-out={up.addr}",
                    workers=1) as back:
            async def client():
                async with AsyncClient(f"127.0.0.1:{back.port}", ssl=certs["client"],
                                       compress="zstd", timeout=10) as c:
                    return (await c.post("/s", content=b"secret", host="h")).content
            assert aio.call(client()) == b"POST /s h|secret"
        with HttpTp("-outType=teleports", f"-out={addr}", f"-outTLSCA={certs['ca']}",
                    "-outCompress=brotli", workers=1) as front:
            status, _, body = http_request(front.host, front.port, "POST", "/x", body=b"abc")
            assert (status, body) == (200, b"tls abc")
    finally:
        aio.call(srv.stop(timeout=1))
        up.close()
