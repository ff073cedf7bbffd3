"""The "callback bare proxy": the ceiling of an event-driven design on gevent's loop.

One process, no greenlet per connection or request: gevent's own loop (the
hub's libev/libuv loop) calls back ``loop.io`` read watchers on non-blocking
sockets, and a write watcher only while the kernel will not take all the
bytes.  httptools parses the requests and the responses, which are
re-serialised (method, target and headers; status and headers) as a real proxy
does.  Keep-alive to the client, pipelined requests answered in order, and a
keep-alive pool of connections to the one upstream, watched for close while
idle.  Content-Length bodies only: no chunked, no validation, no timeouts, no
balancing, no stats.  Issue 11 measured this design at about half the CPU per
request of the greenlet bare proxy (bench/bare_proxy.py).

    python bench/bare_callback_proxy.py UPSTREAM_PORT    (listens on 127.0.0.1, a free port)
"""

import socket
import sys
from collections import deque

import gevent
import httptools

READ, WRITE = 1, 2
HOP = frozenset((b"connection", b"keep-alive"))        # hop-by-hop: not forwarded
loop = gevent.get_hub().loop


class Conn:
    """A non-blocking socket, its read watcher and, while bytes wait, its write watcher."""

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = loop.io(sock.fileno(), READ)
        self.writer = loop.io(sock.fileno(), WRITE)
        self.unsent = b""
        self.closed = False
        self.reader.start(self.on_readable)

    def on_readable(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self.close()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def write(self, data):
        if self.unsent:                                 # the write watcher sends it in order
            self.unsent += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            return self.close()
        if n < len(data):
            self.unsent = data[n:]
            self.writer.start(self.on_writable)

    def on_writable(self):
        try:
            n = self.sock.send(self.unsent)
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        self.unsent = self.unsent[n:]
        if not self.unsent:
            self.writer.stop()

    def close(self):
        if not self.closed:
            self.closed = True
            self.reader.close()
            self.writer.close()
            self.sock.close()
            self.on_close()

    def on_message_begin(self):
        self.headers = []
        self.body = []

    def on_header(self, name, value):
        if name.lower() not in HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body):
        self.body.append(body)


class Client(Conn):
    """A client connection: requests in, one at a time to an upstream connection, answers out in order."""

    def __init__(self, sock, pool):
        self.parser = httptools.HttpRequestParser(self)
        self.pool = pool
        self.queue = deque()                            # pipelined requests not yet sent upstream
        self.upstream = None                            # the connection serving our oldest request
        super().__init__(sock)

    def on_url(self, url):
        self.url = url

    def on_message_complete(self):
        p = self.parser
        self.queue.append(b"%s %s HTTP/1.1\r\n%s\r\n%s" % (p.get_method(), self.url, b"".join(self.headers),
                                                            b"".join(self.body)))
        if self.upstream is None:
            self.forward()

    def forward(self):
        self.upstream = self.pool.get()
        self.upstream.send(self.queue.popleft(), self)

    def on_response(self, data):
        self.write(data)
        self.upstream = None
        if self.queue and not self.closed:
            self.forward()

    def on_close(self):
        self.queue.clear()                              # an answer in flight is dropped when it comes


class Upstream(Conn):
    """A pooled connection to the upstream: one request at a time."""

    def __init__(self, sock, pool):
        self.parser = httptools.HttpResponseParser(self)
        self.pool = pool
        self.client = None
        super().__init__(sock)

    def send(self, request, client):
        self.client = client
        self.write(request)

    def on_status(self, reason):
        self.reason = reason

    def on_message_complete(self):
        data = b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (self.parser.get_status_code(), self.reason,
                                                 b"".join(self.headers), b"".join(self.body))
        client, self.client = self.client, None
        if self.parser.should_keep_alive():
            self.pool.idle.append(self)
        else:
            self.close()
        if not client.closed:
            client.on_response(data)

    def on_close(self):
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.client is not None:                     # it closed with our request in flight
            self.client.close()


class Pool:
    def __init__(self, port):
        self.addr = ("127.0.0.1", port)
        self.idle = []

    def get(self):
        if self.idle:
            return self.idle.pop()
        # a blocking connect on loopback: quick, and only while the pool grows
        return Upstream(socket.create_connection(self.addr), self)


def accept(listener, pool):
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        Client(sock, pool)


if __name__ == "__main__":
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    acceptor = loop.io(listener.fileno(), READ)
    acceptor.start(accept, listener, Pool(int(sys.argv[1])))
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    gevent.get_hub().join()
