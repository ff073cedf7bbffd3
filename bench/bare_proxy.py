"""The "bare gevent proxy": a ceiling for any Python, gevent-based proxy design.

One process and one greenlet per client connection, each paired with its own
keep-alive upstream connection.  Messages are framed by a naive scan for the
blank line and a Content-Length header: no chunked bodies, no validation, no
timeouts, no balancing, no stats.  Issue 6 cites it at ~0.48x nginx's req/s;
the part of httptp's gap to nginx that it does not show is what httptp's
features cost, not what Python costs.

    python bench/bare_proxy.py UPSTREAM_PORT    (listens on 127.0.0.1, a free port)
"""

import re
import sys

from gevent import socket
from gevent.server import StreamServer

LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


def read_message(sock, buf):
    """(one message: head + Content-Length body, the bytes after it); (None, b"") at EOF."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = LENGTH.search(buf, 0, end)
            size = end + 4 + (int(m.group(1)) if m else 0)
            if len(buf) >= size:
                return buf[:size], buf[size:]
        data = sock.recv(65536)
        if not data:
            return None, b""
        buf += data


def serve(upstream_port):
    def handle(client, _addr):
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cbuf = ubuf = b""
        try:
            while True:
                request, cbuf = read_message(client, cbuf)
                if request is None:
                    return
                upstream.sendall(request)
                response, ubuf = read_message(upstream, ubuf)
                if response is None:
                    return
                client.sendall(response)
        except OSError:
            pass
        finally:
            upstream.close()
            client.close()
    return handle


if __name__ == "__main__":
    server = StreamServer(("127.0.0.1", 0), serve(int(sys.argv[1])), backlog=4096)
    server.start()
    print(f"listening on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
