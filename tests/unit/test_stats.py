"""httptp.stats: layout, claim/release, exact sums, upstream table, fork sharing."""

from __future__ import annotations

import mmap
import os

import pytest

from httptp import stats as st
from httptp.stats import Stats


def test_layout_is_aligned_and_small():
    s = Stats.create(256, 64)
    try:
        # the extreme case (256 blocks x 64 upstreams, 256 bytes each with the
        # latency histogram); the master usually makes 64 blocks, ~1 MiB, and
        # pages never touched are never faulted in
        assert len(s.q) * 8 < 5 * 1024 * 1024
        for block in (0, 1, 255):
            assert s.block_base(block) % 8 == 0            # 64-byte aligned
            assert s.upstream_base(block, 63) % 8 == 0
        assert s.upstream_base(1, 0) - s.block_base(1) == st.BLOCK_HEADER_WORDS
        assert s.block_base(1) - s.block_base(0) >= st.BLOCK_HEADER_WORDS + 64 * st.UP_WORDS
    finally:
        s.close()


def test_counter_indexes_are_unique_and_inside_the_block_header():
    fields = [field for _, field, _ in st.COUNTERS]
    assert len(set(fields)) == len(fields) == 35
    assert all(st.STARTED < f < st.BLOCK_HEADER_WORDS for f in fields)
    gauges = {name for name, _, kind in st.COUNTERS if kind == "gauge"}
    assert gauges == {"inConns", "outConns"}
    assert st.UP_WORDS * 8 % 64 == 0 and max(st.UP_GAUGES) < st.UP_WORDS


def test_attach_checks_magic():
    mm = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError):
        Stats(mm)
    mm.close()


def test_two_views_share_the_bytes(stats):
    base = stats.block_base(0)
    stats.d[base + st.HEARTBEAT] = 1.5
    assert stats.q[base + st.HEARTBEAT] != 0
    stats.q[base + st.IN_REQUEST_START] += 1
    assert stats.q[base + st.IN_REQUEST_START] == 1


def test_exact_totals_over_blocks(stats):
    blocks = [stats.claim_block(0, slot, 1) for slot in range(3)]
    for n, block in enumerate(blocks, 1):
        base = stats.block_base(block)
        for _ in range(n * 100):
            stats.q[base + st.IN_REQUEST_START] += 1
        stats.q[base + st.OUT_BYTES_WRITTEN] += n * 1000
        stats.q[base + st.IN_CONNS] += n
    stats.incr_restarts()
    totals = stats.totals()
    assert totals["inRequestStart"] == 600
    assert totals["outBytesWritten"] == 6000
    assert totals["inConns"] == 6
    assert totals["workerRestarts"] == stats.restarts() == 1
    assert totals["inRequestSuccess"] == 0
    assert set(totals) == {name for name, _, _ in st.COUNTERS} | {
        "workerRestarts", "outHealthChecks", "outHealthCheckFailures", "outResolveErrors"}
    assert stats.block_counters(blocks[1])["inRequestStart"] == 200


def test_claim_release_keeps_counters_and_zeroes_gauges(stats, clock):
    block = stats.claim_block(0, 0, 1)
    base, up = stats.block_base(block), stats.upstream_base(block, 2)
    stats.q[base + st.IN_REQUEST_SUCCESS] += 7
    stats.q[base + st.IN_CONNS] += 3
    stats.q[up + st.UP_INFLIGHT] += 2
    stats.q[up + st.UP_REQUESTS] += 9
    stats.d[up + st.UP_EJECT] = clock.t + 5
    stats.q[up + st.UP_PROBING] = 1
    stats.d[up + st.UP_PENALTY] = 2.5
    stats.d[up + st.UP_REVIVED] = clock.t
    stats.release_block(block)
    assert stats.block_info(block)["in_use"] is False
    assert stats.totals()["inConns"] == 0 and stats.totals()["inRequestSuccess"] == 7
    again = stats.claim_block(0, 0, 2)
    assert again == block
    stats.q[base + st.IN_REQUEST_SUCCESS] += 1
    assert stats.totals()["inRequestSuccess"] == 8            # never goes backwards
    for field in st.UP_GAUGES:
        assert stats.q[up + field] == 0
    assert stats.q[up + st.UP_REQUESTS] == 9
    assert stats.d[up + st.UP_REVIVED] == clock.t            # a fact, not a gauge


def test_claim_fills_then_raises(stats):
    assert [stats.claim_block(0, s, 1) for s in range(4)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError):
        stats.claim_block(0, 9, 1)
    stats.release_block(2)
    assert stats.claim_block(0, 9, 2) == 2
    assert sorted(stats.blocks_in_use()) == [0, 1, 2, 3]


def test_block_info_admin_fields(stats, clock):
    block = stats.claim_block(0, 5, 3)
    info = stats.block_info(block)
    assert info == {"in_use": True, "pid": 0, "slot": 5, "generation": 3,
                    "state": st.STATE_BOOTING, "heartbeat": clock.t, "started": clock.t}
    stats.set_block_pid(block, 4242)
    stats.set_state(block, st.STATE_READY)
    stats.beat(block, clock.t + 1.25)
    info = stats.block_info(block)
    assert (info["pid"], info["state"]) == (4242, st.STATE_READY)
    assert info["heartbeat"] == clock.t + 1.25


def test_assign_upstreams_is_stable_across_reloads(stats):
    assert stats.assign_upstreams(["a:1", "b:2", "c:3"]) == [0, 1, 2]
    gen = stats.upstream_generation()
    # HUP: b is gone, d is new, order changed: live names keep their index.
    assert stats.assign_upstreams(["c:3", "d:4", "a:1"]) == [2, 3, 0]
    assert stats.upstream_generation() == gen + 1
    assert stats.upstream_names() == {0: "a:1", 2: "c:3", 3: "d:4"}
    assert stats.upstream_totals()[1]["listed"] is False       # kept, marked retired
    # a retired name that comes back gets its old index back
    assert stats.assign_upstreams(["b:2", "a:1"]) == [1, 0]
    assert stats.assign_upstreams(["a:1", "a:1"]) == [0, 0]


def test_assign_upstreams_reuses_retired_entries_only_when_full(stats):
    stats.assign_upstreams([f"h{i}" for i in range(8)])
    stats.assign_upstreams([f"h{i}" for i in range(1, 8)])       # h0 retired
    assert stats.assign_upstreams([f"h{i}" for i in range(1, 8)] + ["new"])[-1] == 0
    with pytest.raises(RuntimeError):
        stats.assign_upstreams([f"x{i}" for i in range(9)])


def test_assign_upstreams_name_limits(stats):
    name = "/run/" + "é" * 57                                   # 119 utf-8 bytes
    (index,) = stats.assign_upstreams([name])
    assert stats.upstream_names()[index] == name
    with pytest.raises(ValueError):
        stats.assign_upstreams(["x" * 121])


def test_upstream_totals(stats, clock):
    (u,) = stats.assign_upstreams(["a"])
    b0, b1 = stats.claim_block(0, 0, 1), stats.claim_block(0, 1, 1)
    for block, n in ((b0, 2), (b1, 3)):
        up = stats.upstream_base(block, u)
        stats.q[up + st.UP_INFLIGHT] += n
        stats.q[up + st.UP_REQUESTS] += 10 * n
        stats.d[up + st.UP_EWMA] = n / 1000
    stats.q[stats.upstream_base(b1, u) + st.UP_FAILURES] += 4
    stats.d[stats.upstream_base(b1, u) + st.UP_EJECT] = clock.t + 5
    tot = stats.upstream_totals()[u]
    assert (tot["inflight"], tot["requests"], tot["failures"]) == (5, 50, 4)
    assert tot["ejected"] is True and tot["ewma"] == pytest.approx(0.0025)
    stats.release_block(b1)
    tot = stats.upstream_totals()[u]
    assert (tot["inflight"], tot["requests"], tot["ejected"]) == (2, 50, False)


def test_forked_child_counts_are_seen_by_parent(stats):
    block = stats.claim_block(0, 0, 1)
    base = stats.block_base(block)
    pid = os.fork()
    if pid == 0:                                                 # child: the worker
        code = 1
        try:
            for _ in range(1000):
                stats.q[base + st.IN_REQUEST_START] += 1
            stats.q[base + st.IN_BYTES_READ] += 12345
            stats.beat(block, 77.5)
            code = 0
        finally:
            os._exit(code)
    stats.set_block_pid(block, pid)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stats.totals()["inRequestStart"] == 1000
    assert stats.totals()["inBytesRead"] == 12345
    assert stats.block_info(block)["heartbeat"] == 77.5
    assert stats.block_info(block)["pid"] == pid


def test_status_classes_and_durations_sum_over_blocks_and_survive_reuse(stats):
    counters = {field for _, field, _ in st.COUNTERS}
    words = set(range(st.RESP_1XX, st.RESP_OTHER + 1)) | set(
        range(st.DURATION_HIST, st.DURATION_SUM + 1))
    assert not words & counters and not words & set(range(st.STARTED + 1))
    assert max(words) < st.BLOCK_HEADER_WORDS and st.BLOCK_HEADER_WORDS % 8 == 0
    a, b = stats.claim_block(0, 0, 1), stats.claim_block(0, 1, 1)
    for block, status in ((a, 200), (a, 204), (b, 503), (b, 404)):
        stats.q[stats.block_base(block) + st.RESP_1XX - 1 + status // 100] += 1
    stats.q[stats.block_base(b) + st.RESP_OTHER] += 1
    stats.q[stats.block_base(a) + st.DURATION_HIST] += 2          # <= 1 ms
    stats.q[stats.block_base(b) + st.DURATION_HIST + len(st.LATENCY_BUCKETS)] += 1   # +Inf
    stats.d[stats.block_base(a) + st.DURATION_SUM] += 0.001
    stats.d[stats.block_base(b) + st.DURATION_SUM] += 9.0
    stats.release_block(b)                  # a dead worker's counts stay
    stats.claim_block(0, 1, 2)
    assert stats.response_classes() == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 1,
                                        "other": 1}
    hist, total = stats.request_durations()
    assert hist == [2] + [0] * (len(st.LATENCY_BUCKETS) - 1) + [1] and total == 9.001
    assert "2xx" not in stats.totals()      # not an expvar of the original
