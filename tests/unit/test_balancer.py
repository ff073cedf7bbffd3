"""httptp.balancer: two Balancer objects on two blocks of one Stats are two workers."""

from __future__ import annotations

import heapq
from collections import Counter

import pytest

from httptp import stats as st
from httptp.balancer import Balancer

MS = 0.001


def workers(stats, clock, names=("a", "b"), count=2, **kw):
    """``count`` balancers (one block each) over the same upstream names."""
    ups = stats.assign_upstreams(list(names))
    return [Balancer(stats, stats.claim_block(0, slot, 1), ups, clock=clock, **kw)
            for slot in range(count)]


def ok(balancer, latency=1 * MS, tried=frozenset()):
    """One request that succeeds; returns the position it went to."""
    lease = balancer.pick(tried)
    lease.release(True, latency)
    return lease.index


def fail(balancer, index, times=1):
    """``times`` failed requests to position ``index``."""
    for _ in range(times):
        lease = balancer.pick(frozenset(i for i in range(balancer._n) if i != index))
        assert lease.index == index
        lease.release(False, 0.0)


def eject(balancer, index):
    fail(balancer, index, 3)


def test_equal_upstreams_share_evenly(stats, clock):
    (a,) = workers(stats, clock, ("x", "y", "z"), count=1)
    counts = Counter(ok(a) for _ in range(300))
    assert counts == {0: 100, 1: 100, 2: 100}


def test_pick_counts_inflight_and_requests(stats, clock):
    (a,) = workers(stats, clock, count=1)
    lease = a.pick()
    up = a._bases[lease.index]
    assert stats.q[up + st.UP_INFLIGHT] == 1 and stats.q[up + st.UP_REQUESTS] == 1
    lease.release(True, 2 * MS)
    assert stats.q[up + st.UP_INFLIGHT] == 0 and stats.d[up + st.UP_EWMA] == 2 * MS
    with pytest.raises(RuntimeError):
        lease.release(True, 2 * MS)


def test_load_in_other_block_steers_after_refresh(stats, clock):
    a, b = workers(stats, clock)
    held = [b.pick(tried={1}) for _ in range(5)]               # worker B: 5 in flight on 0
    assert {lease.index for lease in held} == {0}
    before = Counter(a.pick().index for _ in range(4))
    assert before == {0: 2, 1: 2}                               # stale snapshot: round robin
    clock.advance(0.01)
    after = [a.pick().index for _ in range(3)]
    assert after == [1, 1, 1]                                   # 5 elsewhere vs 2+k here


def test_latency_weighting_in_a_simulation(stats, clock):
    """30 closed-loop clients over 1 ms / 5 ms / 20 ms upstreams, two workers."""
    latencies = (1 * MS, 5 * MS, 20 * MS)
    pair = workers(stats, clock, ("fast", "mid", "slow"))
    events, counts = [], Counter()
    for client in range(30):
        heapq.heappush(events, (clock.t, client, None))
    end = clock.t + 5.0
    while events[0][0] < end:
        clock.t, client, lease = heapq.heappop(events)
        if lease is not None:
            lease.release(True, latencies[lease.index])
        lease = pair[client % 2].pick()
        counts[lease.index] += 1
        heapq.heappush(events, (clock.t + latencies[lease.index], client, lease))
    assert counts[0] > 3 * counts[1] > 0
    assert counts[1] > 3 * counts[2] > 0


def test_unknown_latency_is_tried(stats, clock):
    (a,) = workers(stats, clock, ("old", "new"), count=1)
    up = a._bases[0]
    stats.d[up + st.UP_EWMA] = 10 * MS                          # old is known, new is not
    assert {ok(a, 10 * MS) for _ in range(2)} == {0, 1}


def test_failure_penalty_then_decay(stats, clock):
    (a,) = workers(stats, clock, count=1, max_fails=100)
    for _ in range(4):
        ok(a)
    fail(a, 0)
    assert [ok(a) for _ in range(6)] == [1] * 6
    clock.advance(60.0)                                         # 20 half-lives
    assert Counter(ok(a) for _ in range(6)) == {0: 3, 1: 3}


def test_failure_latency_is_not_recorded(stats, clock):
    (a,) = workers(stats, clock, count=1)
    ok(a, 5 * MS, tried={1})
    fail(a, 0)
    assert stats.d[a._bases[0] + st.UP_EWMA] == 5 * MS


def test_ejection_after_max_fails(stats, clock):
    (a,) = workers(stats, clock, count=1)
    fail(a, 0, 2)
    assert stats.upstream_totals()[0]["ejected"] is False
    fail(a, 0)
    assert stats.upstream_totals()[0]["ejected"] is True
    clock.advance(4.0)                                          # still cooling down
    assert {a.pick().index for _ in range(20)} == {1}           # even under load


def test_success_resets_consecutive_failures(stats, clock):
    (a,) = workers(stats, clock, count=1)
    fail(a, 0, 2)
    ok(a, tried={1})
    fail(a, 0, 2)
    assert stats.upstream_totals()[0]["ejected"] is False


def test_ejection_is_visible_to_the_other_block(stats, clock):
    a, b = workers(stats, clock)
    eject(a, 0)
    clock.advance(0.01)
    assert {ok(b) for _ in range(20)} == {1}


def probe_setup(stats, clock):
    """A ejects 0 at t, B at t+1; at t+6.1 both cool-downs are over (within the
    probe grace). B holds the largest."""
    a, b = workers(stats, clock)
    eject(a, 0)
    clock.advance(1.0)
    eject(b, 0)
    clock.advance(5.1)
    return a, b


def test_single_probe_after_cool_down(stats, clock):
    a, b = probe_setup(stats, clock)
    assert [a.pick().index for _ in range(10)] == [1] * 10      # A does not hold it
    probe = b.pick()
    assert probe.index == 0 and probe.probe
    clock.advance(0.01)
    assert [b.pick().index for _ in range(10)] == [1] * 10      # one trial only
    assert [a.pick().index for _ in range(10)] == [1] * 10
    assert stats.upstream_totals()[0]["ejected"] is True


def test_probe_tie_goes_to_lowest_block(stats, clock):
    a, b = workers(stats, clock)
    eject(a, 0)
    eject(b, 0)
    clock.advance(5.1)
    assert b.pick().index == 1
    lease = a.pick()
    assert lease.index == 0 and lease.probe


def test_probe_passes_to_another_block_when_holder_gets_no_traffic(stats, clock):
    """The holder may see no request (keep-alive clients on other workers):
    after PROBE_GRACE the probe goes to whoever picks next, still only once."""
    from httptp.balancer import PROBE_GRACE
    a, b = probe_setup(stats, clock)
    assert a.pick().index == 1                                  # B still has the grace
    clock.advance(PROBE_GRACE)
    lease = a.pick()
    assert lease.index == 0 and lease.probe
    clock.advance(0.01)
    assert [b.pick().index for _ in range(10)] == [1] * 10      # one trial only
    lease.release(True, 1 * MS)
    clock.advance(0.01)
    assert 0 in {b.pick().index for _ in range(10)}              # back for everyone


def test_probe_success_reinstates_for_both(stats, clock):
    a, b = probe_setup(stats, clock)
    probe = b.pick()
    assert probe.probe
    probe.release(True, 1 * MS)
    assert stats.upstream_totals()[0]["ejected"] is False
    clock.advance(0.01)
    # Under load both workers use it again; the decaying penalty left from the
    # failures keeps it slightly less attractive for a while (a slow start).
    assert {a.pick().index for _ in range(6)} == {0, 1}
    assert {b.pick().index for _ in range(6)} == {0, 1}
    assert stats.d[a._bases[0] + st.UP_EJECT] == 0.0            # A's stale ejection cleared
    fail(a, 0, 2)                                               # ... with its failure count
    assert stats.upstream_totals()[0]["ejected"] is False


def test_probe_failure_re_ejects(stats, clock):
    a, b = probe_setup(stats, clock)
    probe = b.pick()
    probe.release(False, 0.0)
    clock.advance(0.01)
    assert {ok(a) for _ in range(10)} == {1}
    assert {ok(b) for _ in range(10)} == {1}
    clock.advance(5.0)                                          # the next cool-down is over
    assert a.pick().index == 1
    assert b.pick().probe


def test_all_ejected_fails_open_to_soonest(stats, clock):
    (a,) = workers(stats, clock, count=1)
    eject(a, 1)
    clock.advance(1.0)
    eject(a, 0)
    clock.advance(1.0)
    leases = [a.pick() for _ in range(5)]
    assert [lease.index for lease in leases] == [1] * 5          # 1 comes back first
    assert not any(lease.probe for lease in leases)


def test_tried_set_goes_elsewhere(stats, clock):
    (a,) = workers(stats, clock, ("x", "y", "z"), count=1)
    for _ in range(10):
        first = a.pick()
        second = a.pick({first.index})
        third = a.pick({first.index, second.index})
        assert len({first.index, second.index, third.index}) == 3
        assert a.pick({0, 1, 2}).index in (0, 1, 2)             # all tried: still answers


def test_tried_skips_even_to_an_ejected_upstream(stats, clock):
    (a,) = workers(stats, clock, count=1)
    eject(a, 1)
    assert a.pick({0}).index == 1


def test_reused_block_starts_clean(stats, clock):
    (a,) = workers(stats, clock, count=1)
    held = a.pick()
    eject(a, 1)
    stats.release_block(0)
    block = stats.claim_block(0, 0, 2)
    fresh = Balancer(stats, block, [0, 1], clock=clock)
    for up in fresh._bases:
        assert stats.q[up + st.UP_INFLIGHT] == 0 and stats.d[up + st.UP_EJECT] == 0.0
    assert {ok(fresh) for _ in range(4)} == {0, 1}
    assert stats.upstream_totals()[1]["requests"] >= 3         # counters kept
    del held


def test_released_worker_load_no_longer_counts(stats, clock):
    a, b = workers(stats, clock)
    held = [b.pick(tried={1}) for _ in range(5)]
    stats.release_block(1)                                      # B was reaped
    clock.advance(0.01)
    assert Counter(ok(a) for _ in range(4)) == {0: 2, 1: 2}
    del held


def test_needs_an_upstream(stats, clock):
    with pytest.raises(ValueError):
        Balancer(stats, 0, [], clock=clock)


def test_draining_worker_does_not_hold_the_probe(stats, clock):
    a, b = workers(stats, clock)
    eject(a, 0)
    stats.set_state(0, st.STATE_DRAINING)                       # A gets no new requests
    clock.advance(1.0)
    assert {b.pick().index for _ in range(5)} == {1}            # cool-down is still honoured
    clock.advance(5.0)
    assert {b.pick().index for _ in range(6)} == {0, 1}


def test_one_slow_sample_does_not_starve_an_equal_upstream(stats, clock):
    """At low load the fastest wins every pick; an upstream whose only sample was
    slow is still tried again once its estimate is stale, and then shares."""
    (a,) = workers(stats, clock, ("x", "y"), count=1)
    lease = a.pick()
    first = lease.index
    lease.release(True, 5 * MS)          # an unlucky first sample (dial, cold cache)
    other = a.pick()
    other.release(True, 1 * MS)
    seen = Counter()
    for _ in range(400):                 # serial traffic for 4 simulated seconds
        lease = a.pick()
        seen[lease.index] += 1
        clock.advance(0.01)
        lease.release(True, 1 * MS)
    assert seen[first] > 0, seen


def test_failures_split_over_workers_eject_at_max_fails_in_total(stats, clock):
    """The penalty steers both workers away after a failure or two; the run of
    failures is counted over all of them, so a dead upstream is still ejected."""
    a, b = workers(stats, clock)
    fail(a, 0, 2)
    clock.advance(0.01)              # b's snapshot of a refreshes
    fail(b, 0, 1)                    # 2 + 1 = max_fails
    assert stats.upstream_totals()[0]["ejected"] is True


def test_old_failures_do_not_count_toward_ejection(stats, clock):
    a, b = workers(stats, clock)
    fail(a, 0, 2)
    clock.advance(6.0)               # longer than fail_timeout (5 s)
    fail(b, 0, 1)
    fail(a, 0, 1)                    # its own run restarted too
    assert stats.upstream_totals()[0]["ejected"] is False


def test_single_upstream_fails_open_and_probes_once(stats, clock):
    """One upstream (pick's shortcut): every pick goes there, ejected or not,
    but after the cool-down exactly one pick over all workers is the probe."""
    a, b = workers(stats, clock, names=("only",))
    eject(a, 0)
    assert stats.upstream_totals()[0]["ejected"] is True
    assert [a.pick().probe for _ in range(3)] == [False] * 3   # fail open, no probe yet
    clock.advance(5.1)
    assert b.pick().probe is False                             # A holds the ejection
    probe = a.pick()
    assert probe.index == 0 and probe.probe is True
    assert [x.pick().probe for x in (a, b, a, b)] == [False] * 4  # one trial only
    probe.release(True, 1 * MS)
    assert stats.upstream_totals()[0]["ejected"] is False
