"""httptp.upstream: the protocols are types only (no I/O), and the real
upstream classes satisfy them (a member renamed in one place breaks here)."""

from __future__ import annotations

import subprocess
import sys

from httptp.upstream import MultiplexedUpstream, PooledUpstream


def _members(proto) -> set[str]:
    return set(proto.__annotations__) | {m for m in vars(proto) if not m.startswith("_")}


def test_protocol_members():
    assert _members(PooledUpstream) == {"address", "name", "host", "acquire", "cancel", "done",
                                        "retire", "busy", "idle_count", "close"}
    assert _members(MultiplexedUpstream) == {"address", "name", "request_async", "cancel",
                                             "retire", "busy", "pending", "close"}


def test_http_upstream_is_a_pooled_upstream():
    from httptp.http import httptools_backend
    from httptp.io.http_client import HTTPUpstream
    from httptp.netaddr import Address
    from httptp.stats import Stats
    up = HTTPUpstream(Address("tcp", "127.0.0.1", 9), parser_module=httptools_backend,
                      max_header_size=8192, max_conns=4, idle_timeout=1.0,
                      stats=Stats.create(2, 8), block=0)
    assert isinstance(up, PooledUpstream)
    assert not isinstance(up, MultiplexedUpstream)
    up.close()


def test_teleport_upstream_is_a_multiplexed_upstream():
    from httptp.io.teleport_upstream import TeleportUpstream
    missing = {m for m in _members(MultiplexedUpstream) - {"address", "name"}
               if not hasattr(TeleportUpstream, m)}
    assert not missing
    assert not hasattr(TeleportUpstream, "acquire")


def test_module_does_no_io():
    code = ("import sys, httptp.upstream; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gevent' "
            "or m.startswith('httptp.io')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
