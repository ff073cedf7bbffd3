"""A stand-in worker for the arbiter's process tests: blocking stdlib sockets, no gevent.

Run as ``python stub_worker.py <httptp flags>``; the real Config and Stats are
used, only ``worker_main`` is replaced.  Each answer's body is
``"<worker pid> <generation>\\n"``.  Paths: ``/slow`` takes 1.5 s, ``/hang``
never answers (and stops the heartbeat).  An upstream on port 9 (discard: ``127.0.0.1:9``) makes
the worker raise at boot.

Environment: ``STUB_RELOAD_FILE`` holds the extra flags a HUP adds (or
``fail: <message>`` to make the reload raise); ``STUB_BOOT_DELAY`` seconds to
sleep before serving; ``STUB_HEARTBEAT_TIMEOUT`` and ``STUB_UPGRADE_TIMEOUT``
override the master's.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from httptp.config import load_config
from httptp.stats import STATE_DRAINING, STATE_READY
from httptp.supervisor.arbiter import Arbiter


def serve(config, listener, stats, block, slot, generation, upstream_ids) -> int:
    parent = os.getppid()
    draining = []
    signal.signal(signal.SIGTERM, lambda signum, frame: draining.append(signum))
    signal.signal(signal.SIGQUIT, lambda signum, frame: os._exit(0))
    signal.signal(signal.SIGUSR1, lambda signum, frame: print(f"stub {os.getpid()} USR1",
                                                              file=sys.stderr, flush=True))
    if any(getattr(u, "port", 0) == 9 for u in config.upstreams):
        raise RuntimeError("stub told to crash")
    time.sleep(float(os.environ.get("STUB_BOOT_DELAY", "0")))
    listener.settimeout(0.1)
    stats.set_state(block, STATE_READY)
    while not draining and os.getppid() == parent:
        stats.beat(block, time.monotonic())
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            answer(conn, generation)
    stats.set_state(block, STATE_DRAINING)
    return 0


def answer(conn: socket.socket, generation: int) -> None:
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    path = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b"/"
    if path == b"/slow":
        time.sleep(1.5)
    elif path == b"/hang":
        time.sleep(3600)
    body = f"{os.getpid()} {generation}\n".encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (len(body), body))


def main() -> int:
    args = sys.argv[1:]
    if not any(a.startswith("-expvarAddr") for a in args):
        args.append("-expvarAddr=")     # no stats helper unless a test asks for one

    def reload_config():
        with open(os.environ["STUB_RELOAD_FILE"]) as f:
            text = f.read().strip()
        if text.startswith("fail:"):
            raise ValueError(text[len("fail:"):].strip())
        return load_config(args + text.split(), {})

    arbiter = Arbiter(load_config(args, {}), reload_config, worker_main=serve)
    if "STUB_HEARTBEAT_TIMEOUT" in os.environ:
        arbiter.heartbeat_timeout = float(os.environ["STUB_HEARTBEAT_TIMEOUT"])
    if "STUB_UPGRADE_TIMEOUT" in os.environ:
        arbiter.upgrade_timeout = float(os.environ["STUB_UPGRADE_TIMEOUT"])
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
