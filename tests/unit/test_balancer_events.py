"""httptp.balancer's on_event: the passive health events a worker logs, once
per event, from the block that ejected or probed (not once per worker)."""

from __future__ import annotations

from httptp.balancer import EJECTED, REVIVED, STILL_DOWN, Balancer
from tests.unit.test_balancer import MS, fail

CLOCK_STEP = 0.01       # past the snapshot refresh (5 ms)


def recording(stats, clock, count=2, **kw):
    """``count`` balancers over upstreams a, b, each with its own event list."""
    ups = stats.assign_upstreams(["a", "b"])
    pairs = []
    for slot in range(count):
        events = []
        pairs.append((Balancer(stats, stats.claim_block(0, slot, 1), ups, clock=clock,
                               on_event=lambda i, e, n, events=events: events.append((i, e, n)),
                               **kw), events))
    return pairs


def test_one_event_per_ejection(stats, clock):
    [(a, events)] = recording(stats, clock, count=1)
    fail(a, 0, 2)
    assert events == []
    fail(a, 0)
    assert events == [(0, EJECTED, 3)]
    fail(a, 0, 2)                       # requests already in flight fail too: no new event
    assert events == [(0, EJECTED, 3)]


def test_the_other_worker_does_not_report_the_same_ejection(stats, clock):
    (a, ea), (b, eb) = recording(stats, clock)
    fail(a, 0, 3)
    clock.advance(CLOCK_STEP)
    fail(b, 0, 3)                       # fail-open traffic: b sets its own ejection, quietly
    assert ea == [(0, EJECTED, 3)] and eb == []


def test_failures_summed_over_workers_eject_once(stats, clock):
    (a, ea), (b, eb) = recording(stats, clock)
    fail(a, 0, 2)
    clock.advance(CLOCK_STEP)
    fail(b, 0)                          # the third failure in a row, all workers counted
    assert ea == [] and eb == [(0, EJECTED, 3)]


def test_trial_request_success_and_failure(stats, clock):
    [(a, events)] = recording(stats, clock, count=1)
    fail(a, 0, 3)
    clock.advance(5.1)
    probe = a.pick()
    assert probe.index == 0 and probe.probe
    probe.release(False, 0.0)
    assert events[-1] == (0, STILL_DOWN, 1)
    clock.advance(5.1)
    probe = a.pick()
    assert probe.probe
    probe.release(True, 1 * MS)
    assert events == [(0, EJECTED, 3), (0, STILL_DOWN, 1), (0, REVIVED, 0)]


def test_no_callback_no_change(stats, clock):
    ups = stats.assign_upstreams(["a", "b"])
    a = Balancer(stats, stats.claim_block(0, 0, 1), ups, clock=clock)
    fail(a, 0, 3)
    assert stats.upstream_totals()[0]["ejected"] is True
