"""A counting TCP relay: what really crosses a link, byte for byte.

Used by the demo and the tests to measure the teleport leg without trusting
httptp's own counters.  Plain threads and blocking sockets: it runs beside
httptp, never inside a worker.
"""

from __future__ import annotations

import socket
import threading

_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"   # struct linger {on, 0 s}: close with RST


class Relay:
    """Listen on 127.0.0.1:<free port> and relay each connection to ``target``
    (``host:port``), counting connections and bytes in each direction.  With
    ``capture_limit`` it also keeps up to that many bytes of each direction's
    reads in ``capture["up"]`` / ``capture["down"]`` (one item per read)."""

    def __init__(self, target: str, capture_limit: int = 0):
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.connections = 0
        self.up_bytes = 0        # client → target
        self.down_bytes = 0      # target → client
        self.capture_limit = capture_limit
        self.capture = {"up": [], "down": []} if capture_limit else None
        self.lock = threading.Lock()
        self._pairs: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def total_bytes(self) -> int:
        return self.up_bytes + self.down_bytes

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                t = socket.create_connection(self.target, timeout=5)
                t.settimeout(None)
            except OSError:
                c.close()
                continue
            for s in (c, t):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self._pairs.append((c, t))
            threading.Thread(target=self._pipe, args=(c, t, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(t, c, "down"), daemon=True).start()

    def _pipe(self, src, dst, way: str) -> None:
        counter = way + "_bytes"
        kept = self.capture[way] if self.capture is not None else None
        room = self.capture_limit
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
                if kept is not None and room > 0:
                    kept.append(data)
                    room -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Reset every relayed connection (a network failure mid-stream)."""
        with self.lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        self.cut()
