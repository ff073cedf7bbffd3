"""httptp.upstream: the Upstream protocol is a type only (no I/O), and an
in-memory upstream with its members satisfies it."""

from __future__ import annotations

import subprocess
import sys

from httptp.http.events import ResponseHead
from httptp.netaddr import Address
from httptp.upstream import Upstream


class _Answer:
    def __init__(self, head, body):
        self.head, self.body = head, body
        self.upstream, self.upstream_time = "", 0.0


class MemoryUpstream:
    """The smallest upstream: answers every request with 204."""

    def __init__(self):
        self.address = Address("tcp", "127.0.0.1", 1)
        self.name = str(self.address)
        self.host = self.name.encode()
        self.closed = False

    def exchange(self, method, target, headers, body, deadline, retry_stale):
        return _Answer(ResponseHead(204, b"No Content", b"1.1", [], True, None, False), b"")

    def close(self):
        self.closed = True

    @property
    def pending(self):
        return 0

    @property
    def idle_count(self):
        return 0


class NoClose:
    address, name, host, pending, idle_count = None, "x", b"x", 0, 0

    def exchange(self, *args):
        raise NotImplementedError


def test_a_class_with_the_members_is_an_upstream():
    up = MemoryUpstream()
    assert isinstance(up, Upstream)
    assert up.exchange(b"GET", b"/", [], b"", 0.0, True).head.status == 204
    assert not isinstance(NoClose(), Upstream)


def test_protocol_members():
    members = {"address", "name", "host", "exchange", "close", "pending", "idle_count"}
    assert members == set(Upstream.__annotations__) | {
        m for m in vars(Upstream) if not m.startswith("_")}


def test_module_does_no_io():
    code = ("import sys, httptp.upstream; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gevent' "
            "or m.startswith('httptp.io')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
