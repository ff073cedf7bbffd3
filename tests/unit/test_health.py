"""Active health checks, sans-IO: rise/fall, the checker's books in the shared
memory, and the balancer's rule (a down upstream gets nothing; no client
request is ever a probe; only a good check ends an ejection)."""

from __future__ import annotations

from collections import Counter

import pytest

from httptp import stats as st
from httptp.balancer import Balancer
from httptp.health import Checker, Hysteresis, Verdict, dial_address, verdict_for_status
from httptp.stats import HEALTH_DOWN, HEALTH_UNKNOWN, HEALTH_UP

MS = 0.001
GOOD, BAD = Verdict(True, 200, "answered 200"), Verdict(False, 0, "connection refused")
STALE = 20.0


# -- rise / fall -----------------------------------------------------------------

def run(machine: Hysteresis, results: str) -> list[int]:
    """Feed 'g'/'b' results; the state after each."""
    states = []
    for r in results:
        machine.record(r == "g")
        states.append(machine.state)
    return states


def test_the_first_check_decides_an_unknown_upstream():
    assert run(Hysteresis(2, 3), "g") == [HEALTH_UP]
    assert run(Hysteresis(2, 3), "b") == [HEALTH_DOWN]


def test_fall_bad_checks_in_a_row_take_it_down():
    m = Hysteresis(2, 3, HEALTH_UP)
    assert run(m, "bb") == [HEALTH_UP] * 2
    assert m.record(False) is True and m.state == HEALTH_DOWN


def test_a_good_check_resets_the_bad_run():
    m = Hysteresis(2, 3, HEALTH_UP)
    assert run(m, "bbgbbg") == [HEALTH_UP] * 6
    assert run(m, "bbb")[-1] == HEALTH_DOWN


def test_rise_good_checks_in_a_row_bring_it_back():
    m = Hysteresis(2, 3, HEALTH_DOWN)
    assert run(m, "gbgbg") == [HEALTH_DOWN] * 5
    assert m.record(True) is True and m.state == HEALTH_UP


def test_rise_and_fall_of_one_flip_at_once():
    m = Hysteresis(1, 1, HEALTH_UP)
    assert run(m, "bgbg") == [HEALTH_DOWN, HEALTH_UP, HEALTH_DOWN, HEALTH_UP]


def test_rise_and_fall_must_be_positive():
    with pytest.raises(ValueError):
        Hysteresis(0, 3)


def test_2xx_and_3xx_are_good_anything_else_bad():
    assert [verdict_for_status(c).ok for c in (200, 204, 301, 399, 400, 404, 500, 503, 101)] == \
        [True, True, True, True, False, False, False, False, False]


def test_dial_address_parses_the_table_entry():
    assert str(dial_address("127.0.0.1:80", "http")) == "127.0.0.1:80"
    assert str(dial_address("[::1]:80", "teleport")) == "[::1]:80"
    assert dial_address("/run/app.sock", "unix").kind == "unix"
    with pytest.raises(ValueError):
        dial_address("no-port", "http")


# -- the checker's books -------------------------------------------------------------

class Wall:
    t = 1_700_000_000.0

    def __call__(self):
        return self.t


def checker(stats, clock, logs, rise=2, fall=3):
    return Checker(stats, path="/health", rise=rise, fall=fall, out_type="http",
                   log=logs.append, stale_after=STALE, clock=clock, wall=Wall())


def by_name(targets):
    return {t.name: t for t in targets}


def test_checker_publishes_states_codes_and_counts(stats, clock):
    stats.assign_upstreams(["127.0.0.1:1", "127.0.0.1:2"])
    logs = []
    c = checker(stats, clock, logs)
    t = by_name(c.targets())
    a, b = t["127.0.0.1:1"], t["127.0.0.1:2"]
    c.record(a, GOOD, clock(), clock())
    c.record(b, Verdict(False, 503, "answered 503"), clock(), clock())
    assert stats.health(a.index) == (HEALTH_UP, Wall.t, 200)
    assert stats.health(b.index) == (HEALTH_DOWN, Wall.t, 503)
    assert logs == ["upstream 127.0.0.1:2 is down: GET /health answered 503; "
                    "it gets no client requests until it passes the health checks again"]
    totals = stats.totals()
    assert totals["outHealthChecks"] == 2 and totals["outHealthCheckFailures"] == 1
    assert stats.health_details(b.index)["failures"] == 1


def test_transitions_are_logged_once_each(stats, clock):
    stats.assign_upstreams(["127.0.0.1:1"])
    logs = []
    c = checker(stats, clock, logs)
    (a,) = c.targets()
    for verdict in [GOOD] * 3 + [BAD] * 5 + [GOOD] * 4:
        c.record(a, verdict, clock(), clock())
        clock.advance(1.0)
    assert len(logs) == 2, logs
    assert logs[0].startswith("upstream 127.0.0.1:1 is down: GET /health connection refused "
                              "(3 failed checks in a row)")
    assert logs[1].startswith("upstream 127.0.0.1:1 is up again: 2 good checks in a row")
    assert stats.health(a.index)[0] == HEALTH_UP


def test_targets_follow_the_table_every_round(stats, clock):
    stats.assign_upstreams(["127.0.0.1:1", "127.0.0.1:2"])
    c = checker(stats, clock, [])
    assert set(by_name(c.targets())) == {"127.0.0.1:1", "127.0.0.1:2"}
    stats.assign_upstreams(["127.0.0.1:2", "127.0.0.1:3"])      # a HUP, or discovery
    assert set(by_name(c.targets())) == {"127.0.0.1:2", "127.0.0.1:3"}


def test_an_index_given_to_a_new_name_starts_unknown(stats, clock):
    stats.assign_upstreams(["127.0.0.1:1"])
    c = checker(stats, clock, [])
    (old,) = c.targets()
    c.record(old, BAD, clock(), clock())
    assert stats.health(old.index)[0] == HEALTH_DOWN
    # fill the table so that the retired index is reused by a new name
    names = ["127.0.0.1:%d" % p for p in range(2, 2 + stats.max_upstreams)]
    ids = stats.assign_upstreams(names)
    assert old.index in ids
    assert stats.health(old.index)[0] == HEALTH_UNKNOWN      # the master zeroed it
    c.record(old, BAD, clock(), clock())                       # a late result for the old name
    assert stats.health(old.index)[0] == HEALTH_UNKNOWN      # dropped
    new = by_name(c.targets())[names[ids.index(old.index)]]
    c.record(new, GOOD, clock(), clock())
    assert stats.health(new.index)[0] == HEALTH_UP


def test_a_new_checker_inherits_fresh_states_only(stats, clock):
    stats.assign_upstreams(["127.0.0.1:1"])
    first = checker(stats, clock, [])
    (a,) = first.targets()
    first.record(a, BAD, clock(), clock())
    second = checker(stats, clock, [])          # a HUP restarted the helper
    second.targets()
    assert second.machines[a.index][1].state == HEALTH_DOWN
    clock.advance(STALE + 1)
    third = checker(stats, clock, [])           # the old verdict is too old to trust
    third.targets()
    assert third.machines[a.index][1].state == HEALTH_UNKNOWN


def test_an_entry_that_cannot_be_dialled_is_logged_once(stats, clock):
    stats.assign_upstreams(["127.0.0.1:1", "nonsense"])
    logs = []
    c = checker(stats, clock, logs)
    assert [t.name for t in c.targets()] == ["127.0.0.1:1"]
    c.targets()
    assert len(logs) == 1 and logs[0].startswith("upstream nonsense: not checked:")


# -- the balancer's rule ------------------------------------------------------------------

def setup(stats, clock, names=("127.0.0.1:1", "127.0.0.1:2"), count=1, **kw):
    ids = stats.assign_upstreams(list(names))
    kw.setdefault("health_stale_after", STALE)
    bals = [Balancer(stats, stats.claim_block(0, slot, 1), ids, clock=clock, **kw)
            for slot in range(count)]
    c = checker(stats, clock, [])
    targets = sorted(c.targets(), key=lambda t: ids.index(t.index))
    return bals, c, targets


def check(c, clock, target, verdict, times=1):
    for _ in range(times):
        c.record(target, verdict, clock(), clock())


def picks(balancer, n=40, ok=True):
    counts = Counter()
    for _ in range(n):
        lease = balancer.pick()
        if lease is None:
            counts[None] += 1
            continue
        assert not lease.probe
        counts[lease.index] += 1
        lease.release(ok, 1 * MS)
    return counts


def held(balancer, n):
    """``n`` requests in flight at once (released at the end): load spreads."""
    leases = [balancer.pick() for _ in range(n)]
    assert not any(lease.probe for lease in leases)
    counts = Counter(lease.index for lease in leases)
    for lease in leases:
        lease.release(True, 1 * MS)
    return counts


def test_a_down_upstream_gets_no_request(stats, clock):
    (a, b), c, (ta, tb) = setup(stats, clock, count=2)
    check(c, clock, ta, BAD)
    check(c, clock, tb, GOOD)
    clock.advance(0.01)                         # the other worker's snapshot refreshes
    for bal in (a, b):
        assert picks(bal) == {1: 40}


def test_unknown_upstreams_take_traffic(stats, clock):
    (a,), _, _ = setup(stats, clock)
    assert set(picks(a)) == {0, 1}


def test_back_after_rise_good_checks_only(stats, clock):
    (a,), c, (ta, tb) = setup(stats, clock)
    check(c, clock, tb, GOOD)
    check(c, clock, ta, GOOD)
    check(c, clock, ta, BAD, 3)
    clock.advance(0.01)
    assert picks(a) == {1: 40}
    check(c, clock, ta, GOOD)
    clock.advance(0.01)
    assert picks(a) == {1: 40}                  # one good check is not enough (rise 2)
    check(c, clock, ta, GOOD)
    clock.advance(0.01)
    assert set(picks(a)) == {0, 1}


def test_no_client_request_probes_an_ejected_upstream(stats, clock):
    """Passive ejection (max_fails) with checks on: the cool-down ends, yet no
    request goes there (no probe) until a good check sent after it began."""
    (a,), c, (ta, tb) = setup(stats, clock, max_fails=2, fail_timeout=1.0)
    check(c, clock, ta, GOOD)
    check(c, clock, tb, GOOD)
    for _ in range(2):
        lease = a.pick(frozenset({1}))
        assert lease.index == 0
        lease.release(False, 0.0)
    assert held(a, 10) == {1: 10}
    clock.advance(5.0)                          # long past -outFailTimeout
    check(c, clock, tb, GOOD)                   # keep the entries fresh
    clock.advance(0.01)
    assert held(a, 20) == {1: 20}               # no probe: still out, even under load
    check(c, clock, ta, GOOD)                   # a good check after the ejection
    clock.advance(0.01)
    assert held(a, 20)[0] > 0                   # back: it takes a share of the load


def test_without_checks_the_probe_is_a_client_request(stats, clock):
    """The contrast: -outHealthCheck off, the cool-down's end sends one probe."""
    (a,), _, _ = setup(stats, clock, max_fails=2, fail_timeout=1.0, health_stale_after=None)
    for _ in range(2):
        lease = a.pick(frozenset({1}))
        lease.release(False, 0.0)
    clock.advance(1.5)
    assert any(a.pick().probe for _ in range(5))


def test_every_upstream_down_means_no_lease(stats, clock):
    (a,), c, (ta, tb) = setup(stats, clock)
    check(c, clock, ta, BAD)
    check(c, clock, tb, BAD)
    clock.advance(0.01)
    assert a.pick() is None
    assert a.pick(frozenset({0})) is None


def test_a_retry_may_go_back_to_the_only_up_upstream(stats, clock):
    (a,), c, (ta, tb) = setup(stats, clock)
    check(c, clock, ta, GOOD)
    check(c, clock, tb, BAD)
    clock.advance(0.01)
    lease = a.pick(frozenset({0}))
    assert lease is not None and lease.index == 0


def test_a_single_upstream_down_means_no_lease(stats, clock):
    (a,), c, (ta,) = setup(stats, clock, names=("127.0.0.1:1",))
    check(c, clock, ta, BAD)
    clock.advance(0.01)
    assert a.pick() is None
    check(c, clock, ta, GOOD, 2)
    clock.advance(0.01)
    lease = a.pick()
    assert lease is not None and not lease.probe


def test_stale_verdicts_are_ignored(stats, clock):
    """A checker that stopped publishing cannot keep traffic away for good."""
    (a,), c, (ta, tb) = setup(stats, clock)
    check(c, clock, ta, BAD)
    check(c, clock, tb, GOOD)
    clock.advance(0.01)
    assert picks(a) == {1: 40}
    clock.advance(STALE + 1)
    assert set(picks(a)) == {0, 1}
