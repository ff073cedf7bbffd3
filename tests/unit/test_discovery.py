"""httptp.discovery's pieces: names in the shared table, the resolver against a
DNS server in the test, the set, publishing, the helper's loop, the start."""

from __future__ import annotations

import pytest

from httptp import discovery as D
from httptp import stats as S
from httptp.balancer import Balancer
from httptp.config import load_config
from httptp.errors import ConfigError
from httptp.netaddr import Address, parse_address
from httptp.settings import parse_resolvers
from tests.dnsserver import DNSServer


def config(*argv):
    return load_config(["-outType=http", *argv], {})


@pytest.fixture
def dns():
    server = DNSServer(ttl=30)
    yield server
    server.close()


# -- addresses and the table ------------------------------------------------------------

@pytest.mark.parametrize("text, kind, dynamic", [
    ("127.0.0.1:80", "tcp", False), ("[::1]:80", "tcp", False), ("app.test:80", "tcp", True),
    ("localhost:80", "tcp", True), ("_http._tcp.app.test", "srv", True),
])
def test_which_entries_are_resolved(text, kind, dynamic):
    address = parse_address(text, "http", allow_srv=True)
    assert address.kind == kind and D.is_dynamic(address) is dynamic
    assert str(address) == text


@pytest.mark.parametrize("text", ["_http.app.test", "_http._tcp", "_http._tcp.1.2.3.4"])
def test_bad_srv_names(text):
    with pytest.raises(ValueError):
        parse_address(text, "http", allow_srv=True)


def test_srv_only_for_out():
    with pytest.raises(ValueError, match="missing port"):
        parse_address("_http._tcp.app.test", "http")


def test_resolvers_flag():
    assert parse_resolvers("") == ()
    assert parse_resolvers("10.0.0.2, 10.0.0.3:5353,[::1]:53") == (
        ("10.0.0.2", 53), ("10.0.0.3", 5353), ("::1", 53))
    with pytest.raises(ValueError, match="not an IP address"):
        parse_resolvers("dns.example:53")


def test_too_long_name_is_a_config_error():
    name = "a" * 40 + "." + "b" * 40 + ".test:80"
    with pytest.raises(ConfigError, match="at most"):
        config(f"-out={name}")


def test_table_names_split_and_show():
    t = D.Target("127.0.0.2:80", "app.test:80")
    assert t.table_name == "127.0.0.2:80\0app.test:80"
    assert S.split_upstream_name(t.table_name) == ("127.0.0.2:80", "app.test:80")
    assert S.split_upstream_name("127.0.0.1:80") == ("127.0.0.1:80", "127.0.0.1:80")
    assert S.display_upstream_name(t.table_name) == "127.0.0.2:80 (app.test:80)"
    assert D.Target("10.0.0.1:80", "10.0.0.1:80").table_name == "10.0.0.1:80"


def test_upstream_entries_and_meta():
    stats = S.Stats.create(max_blocks=2, max_upstreams=8)
    names = ["127.0.0.1:1", "127.0.0.2:80\0app.test:80", "[::2]:81\0_h._tcp.app.test"]
    ids = stats.assign_upstreams(names, {names[2]: S.pack_meta(10, 0)})
    assert S.upstream_entries(stats) == [
        (ids[0], "127.0.0.1:1", "127.0.0.1:1"), (ids[1], "127.0.0.2:80", "app.test:80"),
        (ids[2], "[::2]:81", "_h._tcp.app.test")]
    listed = {i: (p, w) for i, _, p, w in stats.listed_upstreams()}
    assert listed[ids[2]] == (10, 1) and listed[ids[0]] == (0, 0)
    assert stats.upstream_names()[ids[1]] == "127.0.0.2:80 (app.test:80)"
    totals = stats.upstream_totals()[ids[1]]
    assert (totals["address"], totals["origin"]) == ("127.0.0.2:80", "app.test:80")
    stats.assign_upstreams(names[:2])                   # meta and state change in place
    assert [i for i, *_ in S.upstream_entries(stats)] == ids[:2]
    stats.assign_upstreams(names, {names[2]: S.pack_meta(3, 7)})
    assert {i: (p, w) for i, _, p, w in stats.listed_upstreams()}[ids[2]] == (3, 8)


def test_upstream_table_is_read_only_between_writes():
    stats = S.Stats.create(max_blocks=2, max_upstreams=4)
    stats.assign_upstreams(["127.0.0.1:1"])
    generation, entries = stats.upstream_table()
    assert generation == stats.upstream_generation() == 1 and len(entries) == 1
    stats.q[S.H_UPSTREAM_GENERATION] |= 1            # a writer at work (or killed in it)
    assert stats.upstream_table(tries=3) is None
    assert stats.upstream_generation() == 1
    stats.assign_upstreams(["127.0.0.1:2"])          # the next write ends it
    assert stats.upstream_table()[0] == 2
    with pytest.raises(RuntimeError):                 # a full table still ends the write
        stats.assign_upstreams([f"127.0.0.1:{p}" for p in range(3, 9)])
    assert stats.upstream_table() is not None


def test_resolve_errors_counter_in_totals():
    stats = S.Stats.create(max_blocks=2, max_upstreams=4)
    stats.incr_resolve_errors()
    assert stats.totals()["outResolveErrors"] == 1


# -- the resolver --------------------------------------------------------------------------

def test_a_and_aaaa_with_ttl(dns):
    dns.set("app.test", "A", ["127.0.0.3", "127.0.0.2"])
    dns.set("app.test", "AAAA", ["::1"])
    r = D.Resolver(((("127.0.0.1", dns.port)),))
    targets, ttl = r.resolve(Address("tcp", host="app.test", port=80))
    assert [t.address for t in targets] == ["127.0.0.2:80", "127.0.0.3:80", "[::1]:80"]
    assert {t.origin for t in targets} == {"app.test:80"} and ttl == 30.0


@pytest.mark.parametrize("setup, reason", [
    (lambda s: None, "NXDOMAIN"),
    (lambda s: s.set("app.test", "TXT", ['"x"']), "no A or AAAA"),
    (lambda s: setattr(s, "servfail", True), "SERVFAIL"),
    (lambda s: setattr(s, "answering", False), "no answer within"),
])
def test_failures_are_resolve_errors(dns, setup, reason):
    setup(dns)
    r = D.Resolver((("127.0.0.1", dns.port),), timeout=0.5)
    with pytest.raises(D.ResolveError, match=reason):
        r.resolve(Address("tcp", host="app.test", port=80))


def test_srv_targets_ports_priority_weight(dns):
    dns.set("_http._tcp.app.test", "SRV", ["0 5 8001 a.app.test.", "1 0 8002 b.app.test.",
                                            "0 0 9 ."])
    dns.set("a.app.test", "A", ["127.0.0.2"])
    dns.set("b.app.test", "AAAA", ["::2"])
    r = D.Resolver((("127.0.0.1", dns.port),))
    targets, ttl = r.resolve(Address("srv", host="_http._tcp.app.test"))
    assert targets == [D.Target("127.0.0.2:8001", "_http._tcp.app.test", 0, 5),
                       D.Target("[::2]:8002", "_http._tcp.app.test", 1, 0)]
    assert ttl == 30.0


def test_system_resolver_reads_hosts():
    targets, ttl = D.Resolver().resolve(Address("tcp", host="localhost", port=80))
    assert "127.0.0.1:80" in [t.address for t in targets] and ttl is None


# -- the set and publishing ------------------------------------------------------------------

def test_current_set_in_out_order_and_capped():
    cfg = config("-out=127.0.0.9:1,app.test:80,127.0.0.9:2")
    resolved = {"app.test:80": [D.Target("127.0.0.2:80", "app.test:80"),
                                D.Target("127.0.0.3:80", "app.test:80")]}
    got = [t.address for t in D.current_set(cfg, resolved, 10)]
    assert got == ["127.0.0.9:1", "127.0.0.2:80", "127.0.0.3:80", "127.0.0.9:2"]
    assert len(D.current_set(cfg, resolved, 2)) == 2


def test_publish_bumps_the_generation_only_on_change():
    stats = S.Stats.create(max_blocks=2, max_upstreams=8)
    a = [D.Target("127.0.0.2:80", "app.test:80"), D.Target("127.0.0.3:80", "app.test:80")]
    assert D.publish(stats, a)
    generation = stats.upstream_generation()
    assert not D.publish(stats, list(a))
    assert stats.upstream_generation() == generation
    assert D.publish(stats, a[1:] + [D.Target("127.0.0.4:80", "app.test:80")])
    assert stats.upstream_generation() == generation + 1
    assert [t.address for t in D.known_targets(stats)["app.test:80"]] == \
        ["127.0.0.3:80", "127.0.0.4:80"]


# -- the helper's loop and the start -----------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_helper_keeps_the_last_set_and_logs_once_a_minute(dns):
    dns.set("app.test", "A", ["127.0.0.2", "127.0.0.3"])
    cfg = config("-out=app.test:80", f"-resolver=127.0.0.1:{dns.port}",
                 "-outResolveInterval=1s")
    stats = S.Stats.create(max_blocks=2, max_upstreams=8)
    clock, lines = FakeClock(), []
    D.run_helper(stats, cfg, lines.append, sleep=clock.sleep, clock=clock, rounds=1)
    assert [a for _, a, _ in S.upstream_entries(stats)] == ["127.0.0.2:80", "127.0.0.3:80"]
    dns.servfail = True
    D.run_helper(stats, cfg, lines.append, sleep=clock.sleep, clock=clock, rounds=10)
    assert [a for _, a, _ in S.upstream_entries(stats)] == ["127.0.0.2:80", "127.0.0.3:80"]
    assert stats.totals()["outResolveErrors"] >= 1
    assert sum("cannot resolve" in line for line in lines) == 1, lines
    dns.servfail = False
    dns.set("app.test", "A", ["127.0.0.4"])
    # a new helper (as after a HUP) asks again one interval after its start
    D.run_helper(stats, cfg, lines.append, sleep=clock.sleep, clock=clock, rounds=3)
    assert [a for _, a, _ in S.upstream_entries(stats)] == ["127.0.0.4:80"]


def test_ttl_caps_the_interval():
    cfg = config("-out=app.test:80", "-outResolveInterval=10s")
    assert D._next_wait(cfg, None) == 10.0
    assert D._next_wait(cfg, 3.0) == 3.0
    assert D._next_wait(cfg, 0.0) == D.MIN_REFRESH


def test_start_waits_then_gives_up_with_one_line(dns):
    cfg = config("-out=late.test:80", f"-resolver=127.0.0.1:{dns.port}", "-outResolveWait=3s")
    clock, lines = FakeClock(), []
    with pytest.raises(ConfigError) as info:
        D.resolve_start(cfg, log=lines.append, sleep=clock.sleep, clock=clock)
    assert str(info.value) == ("-out: late.test:80 does not resolve after waiting 3 s: "
                               "no such name (NXDOMAIN)")
    assert len(lines) == 1 and "waiting up to 3 s" in lines[0]
    dns.set("late.test", "A", ["127.0.0.2"])
    got = D.resolve_start(cfg, sleep=clock.sleep, clock=clock)
    assert [t.address for t in got["late.test:80"]] == ["127.0.0.2:80"]


def test_start_keeps_known_names():
    cfg = config("-out=app.test:80")
    known = {"app.test:80": [D.Target("127.0.0.7:80", "app.test:80")]}
    assert D.resolve_start(cfg, known=known) == known      # not asked again


# -- SRV priority and weight in the balancer ------------------------------------------------------

def _balancer(priorities=None, weights=None, n=3):
    stats = S.Stats.create(max_blocks=2, max_upstreams=8)
    ids = stats.assign_upstreams([f"127.0.0.{i}:80" for i in range(2, 2 + n)])
    clock = FakeClock()
    return Balancer(stats, 0, ids, clock=clock, priorities=priorities, weights=weights,
                    max_fails=1, fail_timeout=5.0), clock


def test_lowest_priority_while_it_is_up():
    b, clock = _balancer(priorities=[1, 0, 0])
    picks = [b.pick() for _ in range(20)]
    assert {lease.index for lease in picks} == {1, 2}
    for lease in picks:
        lease.release(True, 0.01)
    for i in (1, 2):                       # both of priority 0 fail: ejected
        lease = b.pick()
        while lease.index != i:
            lease.release(True, 0.01)
            lease = b.pick()
        lease.release(False, 0.0)
    assert b.pick().index == 0


def test_weight_scales_the_share():
    b, clock = _balancer(weights=[3.0, 1.0], n=2)
    held = [b.pick() for _ in range(40)]           # in flight at once
    share = sum(1 for lease in held if lease.index == 0)
    assert 27 <= share <= 33, share


def test_srv_weight_zero_is_rarely_picked():
    b, clock = _balancer(weights=[0.0, 5.0], n=2)
    held = [b.pick() for _ in range(50)]
    assert sum(1 for lease in held if lease.index == 0) <= 1
