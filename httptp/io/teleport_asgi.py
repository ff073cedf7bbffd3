"""ASGI over teleport: ``serve_asgi(app, addr)`` serves any ASGI HTTP application.

Theory of operation
-------------------
An `AsyncServer` (``httptp.io.teleport_aio``) whose handler turns each
teleport request into an ASGI ``http`` scope (method, path and ``raw_path``,
``query_string``, lower-cased ``headers``, ``client`` the teleport peer,
``server`` the bound address, ``state`` from the lifespan), delivers the
body (whole: a frame is a whole message) in one ``http.request`` message,
and collects the ``http.response.*`` messages into one answer frame.  The
app's lifespan protocol runs beside it: startup before the first request,
shutdown on the way out; an app without lifespan support is served anyway.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from httptp.io.teleport_aio import AsyncServer
from httptp.io.teleport_messages import Request

__all__ = ["serve_asgi", "asgi_server"]


async def serve_asgi(app, addr: str, *, started=None, root_path: str = "", **kw) -> None:
    """Serve the ASGI HTTP application ``app`` over teleport on ``addr``
    until cancelled.  ``kw`` are `AsyncServer`'s arguments; ``started``, a
    callable, gets the bound address once listening.  The app's lifespan
    events are sent first (when it supports them: startup before the first
    request, shutdown on the way out)."""
    server, lifespan = asgi_server(app, root_path=root_path, **kw)
    await lifespan.startup()
    try:
        bound = await server.start(addr)
        if started is not None:
            started(bound)
        await server._server.serve_forever()
    except asyncio.CancelledError:
        pass
    finally:
        await server.stop()
        await lifespan.shutdown()


def asgi_server(app, *, root_path: str = "", **kw) -> tuple[AsyncServer, "_Lifespan"]:
    """An `AsyncServer` whose handler runs ``app`` (not started), and the
    app's lifespan (``await lifespan.startup()`` / ``shutdown()``)."""
    state: dict = {}

    async def handler(req: Request):
        return await _asgi_call(app, req, root_path, state, server)

    server = AsyncServer(handler, **kw)
    return server, _Lifespan(app, state)


async def _asgi_call(app, req: Request, root_path: str, state: dict, server) -> tuple:
    path, _, query = req.path.partition("?")
    if path.startswith(("http://", "https://")):          # absolute form: keep the path
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    host = server.address or ""
    if host.startswith("unix:"):
        srv_host, srv_port = host[len("unix:"):], ""
    else:
        srv_host, _, srv_port = host.rpartition(":")
    peer_host, _, peer_port = req.peer.rpartition(":")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": req.method, "scheme": "http",
        "path": unquote(path), "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"), "root_path": root_path,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
        "client": (peer_host.strip("[]"), int(peer_port)) if peer_port.isdigit() else None,
        "server": ((srv_host.strip("[]"), int(srv_port)) if srv_port.isdigit()
                   else (srv_host, None)),
        "state": dict(state),
    }
    body_sent = False
    out = {"status": 500, "headers": [], "body": []}
    done = asyncio.Event()

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await done.wait()                       # nothing more: only a disconnect, once answered
        return {"type": "http.disconnect"}

    async def send(message):
        kind = message["type"]
        if kind == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
        elif kind == "http.response.body":
            out["body"].append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return out["status"], out["headers"], b"".join(out["body"])


class _Lifespan:
    """The ASGI lifespan protocol, run in a task next to the server."""

    def __init__(self, app, state: dict):
        self.app = app
        self.state = state
        self.task = None
        self.queue: asyncio.Queue | None = None
        self.supported = True
        self._started = None
        self._stopped = None

    async def startup(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._started, self._stopped = loop.create_future(), loop.create_future()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        self.task = loop.create_task(self._main(scope))
        await self.queue.put({"type": "lifespan.startup"})
        await asyncio.wait([self._started, self.task], return_when=asyncio.FIRST_COMPLETED)
        if self._started.done() and self._started.result() is not None:
            raise RuntimeError(f"ASGI lifespan startup failed: {self._started.result()}")

    async def _main(self, scope) -> None:
        try:
            await self.app(scope, self.queue.get, self._send)
        except BaseException:
            self.supported = False              # an app without lifespan raises here
        for f in (self._started, self._stopped):
            if not f.done():
                f.set_result(None)

    async def _send(self, message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self._started.set_result(message.get("message", "") or "failed")
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            self._stopped.set_result(None)

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self.queue.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), 5)
        except TimeoutError:
            self.task.cancel()
