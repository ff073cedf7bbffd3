"""The stats server: /expvar, /prometheus (also as /metrics, Prometheus'
default path), /healthz, and the status page (/ and /status.json,
httptp.statuspage) on -expvarAddr; GET or HEAD on each.

Runs in a helper child of the master (never in the master, which runs no
threads; never in a worker, so a busy worker cannot slow the numbers down), on
a listening socket the master bound before forking.  Plain blocking
http.server with a thread per request: its load is a scraper every few seconds
and a status page polling every second or two.  One more thread samples the
totals every second for the page's chart (``statuspage.History``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from httptp import __version__
from httptp import statuspage
from httptp.exposition import Exposition
from httptp.logs import error_logger
from httptp.stats import STATE_READY

HEARTBEAT_STALE = 10.0      # a worker silent this long does not count as healthy
_log = error_logger("stats server")


def healthy_workers(stats, now: float | None = None) -> int:
    now = time.monotonic() if now is None else now
    ready = 0
    for block in stats.blocks_in_use():
        info = stats.block_info(block)
        if info["state"] == STATE_READY and now - info["heartbeat"] < HEARTBEAT_STALE:
            ready += 1
    return ready


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"httptp/{__version__}"
    exposition: Exposition        # set on the class made by make_server
    history: statuspage.History   # idem
    info: dict                    # idem: -in, -out, types, the master's start (statuspage.status)
    head_only = False             # answering HEAD: headers, no body

    def version_string(self) -> str:
        """``Server: httptp/0.1.0``: the base class appends Python's version
        after a space, which is none of a scraper's business."""
        return self.server_version

    def do_HEAD(self):
        self.head_only = True
        try:
            self.do_GET()
        finally:
            self.head_only = False

    def do_GET(self):
        url = urlsplit(self.path)
        exp = self.exposition
        if url.path in ("/", "/status.json"):
            return self._status(url.path)
        if url.path == "/expvar":
            regexp = parse_qs(url.query).get("r", [None])[0]
            try:
                body = exp.expvar(regexp)
            except ValueError as e:
                return self._send(400, f"{e}\n".encode(), "text/plain; charset=utf-8")
            return self._send(200, body, "application/json; charset=utf-8")
        if url.path in ("/prometheus", "/metrics"):
            return self._send(200, exp.prometheus(), "text/plain; version=0.0.4; charset=utf-8")
        if url.path == "/healthz":
            ready = healthy_workers(exp.stats)
            if ready:
                return self._send(200, f"ok: {ready} workers ready\n".encode(), "text/plain; charset=utf-8")
            return self._send(503, b"no worker is ready\n", "text/plain; charset=utf-8")
        self._send(400, b"unsupported path\n", "text/plain; charset=utf-8")

    def _status(self, path: str) -> None:
        """The status page (HTML) or its document (JSON), never cached."""
        try:
            doc = statuspage.status(self.exposition.stats, self.info, self.history)
        except Exception as err:     # a bug must not take the numbers' server down
            return self._send(500, f"status unavailable: {type(err).__name__}: {err}\n".encode(),
                              "text/plain; charset=utf-8")
        extra = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
        if path == "/":
            extra.append(("Content-Security-Policy", statuspage.CSP))
            return self._send(200, statuspage.render_html(doc), "text/html; charset=utf-8", extra)
        self._send(200, statuspage.to_json(doc), "application/json", extra)

    def _send(self, status: int, body: bytes, ctype: str, extra=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if not self.head_only:
            self.wfile.write(body)

    def log_message(self, *args):     # scrapes are not news
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections: set = set()       # accepted, not yet closed (keep-alive included)
        self.connections_lock = threading.Lock()

    def process_request_thread(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def end_idle_reads(self) -> None:
        """After shutdown(): a handler waiting for a keep-alive client's next
        request reads EOF and ends; one writing its answer finishes it."""
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        """A browser closing its tab mid-answer is not news; anything else is
        one line, not socketserver's traceback on the operator's terminal."""
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError):
            return
        _log(f"{type(err).__name__}: {err}")


def make_server(sock, stats, cmdline: list[str] | None = None, info: dict | None = None,
                history: statuspage.History | None = None,
                master: int | None = None) -> ThreadingHTTPServer:
    """An HTTP server on the already listening ``sock``.  ``info`` is what the
    status page says of the configuration (``statuspage.status``); ``master``
    the pid whose process tree ``process_*`` sums (default: this process)."""
    handler = type("StatsHandler", (_Handler,), {
        "exposition": Exposition(stats, cmdline, master), "info": dict(info or {}),
        "history": history or statuspage.History(stats)})
    server = _Server(sock.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    return server


def serve(sock, stats, cmdline: list[str] | None = None, info: dict | None = None) -> None:
    """Serve until TERM (the helper's main), sampling the chart's history in a
    thread meanwhile.  TERM finishes the requests already accepted (a page
    polling across a reload sees no reset); connections still queued stay on
    the listening socket, which the master keeps, for the next stats helper."""
    history = statuspage.History(stats)
    stop = threading.Event()
    sampler = threading.Thread(target=history.run, args=(stop,), name="status-history", daemon=True)
    sampler.start()
    server = make_server(sock, stats, cmdline, info, history, master=os.getppid())
    server.daemon_threads = False           # server_close() joins the request threads
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(
        target=server.shutdown, name="stats-shutdown", daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.end_idle_reads()
        server.server_close()
