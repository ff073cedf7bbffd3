"""Levels on real loopback sockets, in this process: a link whose level
changes under traffic loses nothing and stays byte-exact, both ways, and the
level gauges count the live connections.

The level changes are scripted (a controller that flips between the codec's
``auto`` bounds every few batches, put in place of ``AutoLevel``), so the
test needs no timing: the switches themselves are the real ones
(``codecs.*.set_level`` at a flush boundary, our reader on the other side).
"""

from __future__ import annotations

import random
import time

import gevent
import pytest

from httptp import stats as S
from httptp.io.teleport_client import TeleportClient
from httptp.io.teleport_server import Answer, TeleportServer
from httptp.stats import Stats
from httptp.teleport import connection
from httptp.teleport.autolevel import AutoLevel
from httptp.teleport.handshake import BY_NAME
from tests.integration.test_teleport_library import _serve_ts
from tests.unit.test_teleport_levels import rtb

pytestmark = pytest.mark.timeout(60)


class Flipping(AutoLevel):
    """Every ``EVERY`` batches: to the other bound."""

    EVERY = 2
    made: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.count = 0
        Flipping.made.append(self)

    def batch(self, compress_seconds: float, behind: bool) -> int:
        self.count += 1
        if self.count % self.EVERY == 0:
            self.level = self.low if self.level != self.low else self.high
            self.changes += 1
            self.reason = "scripted"
        return self.level


@pytest.fixture
def flipping(monkeypatch):
    Flipping.made = []
    monkeypatch.setattr(connection, "AutoLevel", Flipping)
    return Flipping


def _echo(head, body, peer):
    return Answer(200, b"OK", [(b"X-Len", b"%d" % len(body))], b"echo:" + body)


@pytest.mark.parametrize("codec", ["flate", "zstd"])
def test_level_changes_under_traffic_keep_both_ways_byte_exact(flipping, codec):
    stats = Stats.create(2)
    ts = TeleportServer(_echo, compress=codec, level="auto", stats=stats, block=1)
    lsock, accept = _serve_ts(ts)
    addr = "127.0.0.1:%d" % lsock.getsockname()[1]
    tc = TeleportClient(addr, compress=BY_NAME[codec], level="auto", stats=stats, block=0)
    rng = random.Random(3)
    bodies = [rtb(i, rng) for i in range(400)]

    def one(i):
        r = tc.request(b"POST", b"/bid/%d" % i, [(b"Host", b"dsp")], bodies[i],
                       time.monotonic() + 20)
        return r.head.status, r.body

    try:
        for start in range(0, len(bodies), 20):       # bursts: batches of several frames
            gs = [gevent.spawn(one, i) for i in range(start, start + 20)]
            gevent.joinall(gs, timeout=20, raise_error=True)
            assert [g.get() for g in gs] == [(200, b"echo:" + bodies[i])
                                             for i in range(start, start + 20)]
        assert len(flipping.made) == 2              # one per direction
        assert all(auto.changes >= 5 for auto in flipping.made)
        levels = stats.compress_levels()
        assert set(levels) == {"in", "out"}
        low, high = flipping.made[0].low, flipping.made[0].high
        assert low <= levels["in"] <= high and low <= levels["out"] <= high
    finally:
        tc.close()
        lsock.close()
        accept.kill()
        ts.abort()
    gevent.sleep(0.05)
    for block in (0, 1):
        base = stats.block_base(block)
        assert [stats.q[base + w] for w in (S.IN_LEVEL_SUM, S.IN_LEVEL_LINKS, S.OUT_LEVEL_SUM,
                                            S.OUT_LEVEL_LINKS)] == [0, 0, 0, 0]


def test_fixed_levels_on_both_ends_show_in_the_gauge():
    stats = Stats.create(2)
    ts = TeleportServer(_echo, compress="zstd", level=19, stats=stats, block=1)
    lsock, accept = _serve_ts(ts)
    addr = "127.0.0.1:%d" % lsock.getsockname()[1]
    tc = TeleportClient(addr, compress=BY_NAME["flate"], level=1, stats=stats, block=0)
    try:
        r = tc.request(b"POST", b"/", [(b"Host", b"a")], b"x" * 5000, time.monotonic() + 10)
        assert r.body == b"echo:" + b"x" * 5000
        assert stats.compress_levels() == {"in": 19.0, "out": 1.0}
    finally:
        tc.close()
        lsock.close()
        accept.kill()
        ts.abort()


def test_a_level_the_codec_does_not_take_is_refused_at_once():
    with pytest.raises(ValueError, match="flate levels are 1 to 9"):
        TeleportClient("127.0.0.1:1", compress=BY_NAME["flate"], level=12)
    with pytest.raises(ValueError, match="snappy has no compression levels"):
        TeleportServer(_echo, compress="snappy", level=3)
    with pytest.raises(ValueError, match="fixed codec"):
        TeleportServer(_echo, compress="auto", level=3)
