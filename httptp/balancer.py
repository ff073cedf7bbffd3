"""Least-loaded balancing across all workers, as an nginx-style get/free pair.

``Balancer.pick()`` returns a ``Lease``; ``Lease.release(ok, latency)`` is the
only writer of health state (STYLE.md §7.8).  All state lives in this worker's
block of the shared ``httptp.stats.Stats`` map, so every worker, and the stats
helper, sees it.  Pure Python: no sockets, no gevent; time comes from ``clock``
(CLOCK_MONOTONIC is system-wide, so times written by other processes compare).

Rules
-----
* **Load.**  load(u) = sum over in-use blocks of inflight[u].  This block's own
  value is read live; the other blocks come from a snapshot refreshed at most
  every ``refresh`` seconds (reading every block on every pick is too slow in
  Python).  ``pick`` increments this block's inflight and requests for the
  chosen upstream; ``release`` decrements inflight.
* **Score.**  score(u) = (load(u) + 1 + penalty(u)) × latency(u); lowest wins.
  latency(u) is this block's EWMA (alpha 0.2) of successful requests, else the
  mean of the other blocks' known EWMAs, else — unknown — the smallest latency
  known for any candidate (so a new upstream gets tried; if none is known all
  score with latency 1).  An estimate that no block refreshed for
  ``RELAX_AFTER`` seconds relaxes linearly toward that smallest latency,
  reaching it ``RELAX_SPAN`` seconds later: at low load the fastest upstream wins every pick, and
  without this one unlucky slow sample would starve an equal upstream forever,
  since a starved upstream is never measured again.  penalty(u) is the decayed failure penalty summed over
  blocks (own live, others from the snapshot).  Ties go round-robin: the scan
  starts one position later on every pick and the first lowest score wins, so
  equal upstreams share evenly.
* **tried.**  Positions in ``tried`` are skipped unless every position is in it
  (then it is ignored).  Retries thus go elsewhere even if elsewhere is ejected
  (fail-open below), as nginx's tried bitmap does.
* **Failures.**  ``release(ok=False)`` adds 1 to the decaying penalty (halves
  every ``penalty_halflife`` seconds, capped at ``PENALTY_MAX``) and to the
  consecutive-failure count.  Success resets the count and feeds the latency to
  the EWMA.  Failure latency never reaches the EWMA: a dead upstream that fails
  fast must not look fast.
* **Ejection.**  When the failures in a row of ALL blocks reach ``max_fails``
  (0 disables ejection) this block sets its eject_until = now + ``fail_timeout``
  (not extended while already running).  A block's run counts only while its
  last failure is younger than ``fail_timeout`` (nginx's max_fails within
  fail_timeout), and a success resets it.  Counting over all blocks matters:
  the summed penalty steers every worker away after a failure or two, so one
  block alone would seldom reach ``max_fails``.  An upstream is out for everyone while ANY
  in-use block has a valid eject_until > now, or any block has probing = 1.
* **Probe.**  Once every valid eject_until has passed, exactly one process
  probes: the block holding the largest eject_until (ties: lowest block
  number).  Its next pick sends one trial request there (probing = 1).  Other
  blocks keep skipping the upstream until the probe succeeds.  On success the
  prober clears its eject_until, consecutive failures and probing, and stamps
  revived = now.  An eject_until <= the largest revived of any block is stale
  and is ignored; each block also clears its own stale value when it refreshes.
  So one success brings the upstream back for every worker within one refresh
  interval.  On failure the prober sets eject_until = now + fail_timeout again.
  The holder may get no request at all (keep-alive clients hashed to other
  workers), so after ``PROBE_GRACE`` more seconds any block may probe; that,
  or two blocks ejecting within one refresh interval of each other, is the
  only way a second probe can happen.  A successful probe also forgives every
  penalty recorded before it, so the upstream takes its share again at once.  A draining worker gets no new
  requests, so it cannot probe: once its cool-down is over its ejection is
  ignored (the worker must ``Stats.set_state(block, STATE_DRAINING)``).
* **SRV priority and weight** (optional, from ``httptp.discovery``).  Only
  the available positions (not ejected, not tried) of the lowest priority
  compete; a higher priority gets requests only while every position of the
  lower ones is out.  A weight w divides the score by w, so at equal latency
  an upstream takes in-flight requests in proportion to its weight (nginx's
  least_conn with weights); an SRV weight of 0 counts as 0.01.
* **Fail open.**  If every candidate is ejected, pick the one whose ejection
  ends soonest (like nginx); without active health checks ``pick`` never
  refuses while an upstream exists.
* **Active health checks** (``health_stale_after`` given: -outHealthCheck is
  on).  The checker helper publishes each upstream's state in the health
  table (``httptp.health``); the balancer reads it with the snapshot.  An
  upstream whose entry is fresh (its last check ended less than
  ``health_stale_after`` seconds ago) is *checked*, and for it:

  - DOWN: it gets no request at all; never a probe.
  - UP or UNKNOWN: it takes its share as usual.
  - A passive ejection (``max_fails``) does not end after ``fail_timeout``
    with a client request as the probe: it lasts until a good check *sent
    after the ejection began* (HAProxy's ``observe`` with ``on-error
    mark-down``: only the checks bring a server back).  Nothing probes, so
    no client request is ever the trial request.
  - If every candidate is DOWN, ``pick`` returns None and the caller answers
    503 at once, as HAProxy does (503 "no server is available") and nginx
    ("no live upstreams", 502): clients get a fast, clear error instead of
    a wait on a dead upstream.  If some are only passively ejected, the one
    whose ejection ends soonest is used (fail open, as above), without
    making it a probe.

  An upstream whose entry is not fresh (never checked yet, or the checker
  stopped publishing) is handled as without checks, so a dead checker can
  never keep traffic away for good.
* **Events** (``on_event``, optional: the worker logs them).  The balancer
  does no I/O; it calls ``on_event(position, event, failures)`` when this
  block ejects an upstream no other block holds ejected (``EJECTED``, with
  the failures in a row over all blocks: so N workers do not report one
  ejection N times), when its trial request fails (``STILL_DOWN``), when its
  trial request succeeds (``REVIVED``), and when a good health check ends
  its ejection (``CHECKED_UP``).  The callback must not raise.
* **Reuse.**  ``Stats.claim_block`` zeroes inflight, consecutive failures,
  EWMA, penalty, eject_until and probing, so a new process starts clean.  It
  keeps the requests/failures counters and revived.

Known limits: consecutive failures are counted per block, so with N workers an
upstream is ejected after max_fails failures seen by one worker.  An upstream
with a high EWMA only gets traffic again when the others are loaded enough; its
EWMA then moves toward its current latency.
"""

from __future__ import annotations

import time
from bisect import bisect_left

from .stats import (HEALTH_DOWN, HL_GOOD_MONO, HL_MONO, HL_STATE, IN_USE, LATENCY_BUCKETS, STATE,
                    STATE_DRAINING, UP_CONSEC, UP_EJECT, UP_EWMA, UP_EWMA_T, UP_HIST, UP_HIST_SUM,
                    UP_FAILURES, UP_INFLIGHT, UP_PENALTY, UP_PENALTY_T, UP_PROBING,
                    UP_REQUESTS, UP_REVIVED, Stats)

ALPHA = 0.2                 # EWMA weight of the newest latency
PENALTY_MAX = 300.0         # the fasthttp LBClient cap
PENALTY_FLOOR = 0.01        # a decayed penalty below this scores as 0
MIN_LATENCY = 1e-6          # a measured 0 would read as "unknown"
RELAX_AFTER = 1.0           # seconds without a latency sample before the estimate relaxes
RELAX_SPAN = 2.0            # ... linearly, reaching the fastest known latency after this
PROBE_GRACE = 0.25          # seconds the probe waits for its holder before anyone may send it
_INF = float("inf")

# on_event's events (module doc, "Events")
EJECTED, STILL_DOWN, REVIVED, CHECKED_UP = "ejected", "still down", "revived", "checked up"


class Lease:
    """One picked upstream; ``release`` it exactly once."""

    __slots__ = ("index", "_balancer", "_base", "_probe")

    def __init__(self, balancer: Balancer, index: int, base: int, probe: bool):
        self.index = index          # position in the balancer's upstream list
        self._balancer = balancer
        self._base = base
        self._probe = probe

    @property
    def probe(self) -> bool:
        """True if this request is the trial request to an ejected upstream."""
        return self._probe

    def release(self, ok: bool, latency: float) -> None:
        """Report the outcome; ``latency`` in seconds (ignored when not ok)."""
        balancer = self._balancer
        if balancer is None:
            raise RuntimeError("lease released twice")
        self._balancer = None
        balancer._release(self.index, self._base, self._probe, ok, latency)


class Balancer:
    """Pick among this worker's ``-out`` upstreams using all workers' state."""

    def __init__(self, stats: Stats, block: int, upstreams: list[int], *, max_fails=3,
                 fail_timeout=5.0, clock=time.monotonic, refresh=0.005, penalty_halflife=3.0,
                 health_stale_after: float | None = None,
                 weights: list[float] | None = None, priorities: list[int] | None = None,
                 on_event=None):
        """``upstreams``: the stats indexes of the ``-out`` list, in order.
        ``health_stale_after``: active health checks are on (module doc);
        ``weights``/``priorities``: per position, from SRV (None: all equal);
        ``on_event(position, event, failures)``: health events (module doc)."""
        if not upstreams:
            raise ValueError("a balancer needs at least one upstream")
        self._q, self._d = stats.q, stats.d
        self._block = block
        self._n = n = len(upstreams)
        self._bases = [stats.upstream_base(block, u) for u in upstreams]
        own = stats.block_base(block)
        self._offsets = [b - own for b in self._bases]
        self._others = [(b, stats.block_base(b)) for b in range(stats.max_blocks) if b != block]
        self._max_fails, self._fail_timeout = max_fails, fail_timeout
        self._clock, self._refresh_every, self._halflife = clock, refresh, penalty_halflife
        self._orders = [tuple(range(s, n)) + tuple(range(s)) for s in range(n)]
        self._rr = int(clock() * 1000) % n if n > 1 else 0   # seeded like fasthttp
        self._lat, self._avail = [0.0] * n, [False] * n
        self._health_on = health_stale_after is not None
        self._stale_after = health_stale_after or 0.0
        self._health = [stats.health_base(u) for u in upstreams]
        self._checked, self._down, self._good = [False] * n, [False] * n, [0.0] * n
        self._inv_w = [1.0 / max(w, 0.01) for w in weights] if weights else [1.0] * n
        self._prio = list(priorities) if priorities and len(set(priorities)) > 1 else None
        self._next_refresh = -_INF
        self._on_event = on_event
        self._refresh(clock())

    # -- the snapshot of the other blocks -----------------------------------

    def _refresh(self, now: float) -> None:
        """Re-read the other in-use blocks (at most every ``refresh`` seconds)."""
        self._next_refresh = now + self._refresh_every
        q, d, n = self._q, self._d, self._n
        if self._health_on:
            self._read_health(now)
        inflight, penalty, probing, consec = [0] * n, [0.0] * n, [0] * n, [0] * n
        window = self._fail_timeout
        ewma_sum, ewma_cnt, sampled = [0.0] * n, [0] * n, [0.0] * n
        revived = [d[b + UP_REVIVED] for b in self._bases]
        ejects = []
        for block, bbase in self._others:
            if not q[bbase + IN_USE]:
                continue
            draining = q[bbase + STATE] == STATE_DRAINING
            for i, off in enumerate(self._offsets):
                b = bbase + off
                inflight[i] += q[b + UP_INFLIGHT]
                p = d[b + UP_PENALTY]
                if p and d[b + UP_PENALTY_T] > revived[i]:  # a good probe forgives older failures
                    p *= 0.5 ** ((now - d[b + UP_PENALTY_T]) / self._halflife)
                    penalty[i] += p if p >= PENALTY_FLOOR else 0.0
                e = d[b + UP_EWMA]
                if e:
                    ewma_sum[i] += e
                    ewma_cnt[i] += 1
                    if d[b + UP_EWMA_T] > sampled[i]:
                        sampled[i] = d[b + UP_EWMA_T]
                probing[i] |= q[b + UP_PROBING]
                c = q[b + UP_CONSEC]
                if c and now - d[b + UP_PENALTY_T] < window:   # recent failures only
                    consec[i] += c
                if d[b + UP_REVIVED] > revived[i]:
                    revived[i] = d[b + UP_REVIVED]
                until = d[b + UP_EJECT]
                if until and (until > now or not draining):
                    ejects.append((i, block, until))
        self._o_inflight, self._o_penalty, self._o_probing = inflight, penalty, probing
        self._o_consec = consec
        self._o_ewma = [s / c if c else 0.0 for s, c in zip(ewma_sum, ewma_cnt)]
        self._o_sampled = sampled
        self._o_eject, self._o_holder = self._valid_ejections(ejects, revived)
        self._clear_stale(revived)

    def _read_health(self, now: float) -> None:
        """The checker's verdicts (module doc, "Active health checks")."""
        q, d, stale = self._q, self._d, self._stale_after
        for i, h in enumerate(self._health):
            checked = d[h + HL_MONO]
            fresh = self._checked[i] = checked > 0.0 and now - checked < stale
            self._down[i] = fresh and q[h + HL_STATE] == HEALTH_DOWN
            self._good[i] = d[h + HL_GOOD_MONO] if fresh else 0.0

    def _valid_ejections(self, ejects, revived):
        """Largest eject_until per position newer than the last successful probe
        (and, for a checked upstream, begun after its last good check)."""
        eject, holder = [0.0] * self._n, [0] * self._n
        checked, good, span = self._checked, self._good, self._fail_timeout
        for i, block, until in ejects:
            if checked[i] and until - span < good[i]:
                continue
            if until > revived[i] and (until > eject[i] or
                                       (until == eject[i] and block < holder[i])):
                eject[i], holder[i] = until, block
        return eject, holder

    def _clear_stale(self, revived) -> None:
        """Drop our own ejections that a later successful probe made stale."""
        d, checked, good, span = self._d, self._checked, self._good, self._fail_timeout
        for i, b in enumerate(self._bases):
            if checked[i] and d[b + UP_EJECT] and d[b + UP_EJECT] - span < good[i]:
                d[b + UP_EJECT] = 0.0           # a good check since it began: back in
                self._q[b + UP_CONSEC] = 0
                if self._on_event is not None:
                    self._on_event(i, CHECKED_UP, 0)
            if d[b + UP_EJECT] and d[b + UP_EJECT] <= revived[i]:
                d[b + UP_EJECT] = 0.0
                self._q[b + UP_CONSEC] = 0
            if self._q[b + UP_CONSEC] and d[b + UP_PENALTY_T] <= revived[i]:
                self._q[b + UP_CONSEC] = 0      # failures before a good probe: forgiven
            if d[b + UP_PENALTY] and d[b + UP_PENALTY_T] <= revived[i]:
                d[b + UP_PENALTY] = 0.0

    # -- get ----------------------------------------------------------------------

    def pick(self, tried=frozenset()) -> Lease | None:
        """Lease the best upstream.  None only with active health checks, when
        every upstream is down; otherwise never fails (see module rules)."""
        now = self._clock()
        if now >= self._next_refresh:
            self._refresh(now)
        n = self._n
        if n == 1:      # nothing to score: only ejection and probing matter
            b = self._bases[0]
            if self._checked[0]:    # the checks alone decide: never a probe
                return None if self._down[0] else self._lease(0, b, False)
            eu, oe = self._d[b + UP_EJECT], self._o_eject[0]
            out = eu or oe or self._o_probing[0] or self._q[b + UP_PROBING]
            return self._lease(0, b, bool(out) and self._ejection_end(0, b, eu, oe, now) is None)
        if tried and len(tried) >= n and all(i in tried for i in range(n)):
            tried = ()
        start = self._rr
        self._rr = start + 1 if start + 1 < n else 0
        order = self._orders[start]
        q, d, bases = self._q, self._d, self._bases
        o_eject, o_probing, o_ewma = self._o_eject, self._o_probing, self._o_ewma
        lat, avail, checked, down = self._lat, self._avail, self._checked, self._down
        min_lat, soonest, soonest_end = 0.0, -1, _INF
        for i in order:
            avail[i] = False
            if i in tried or down[i]:
                continue
            b = bases[i]
            eu, oe = d[b + UP_EJECT], o_eject[i]
            if eu or oe or o_probing[i] or q[b + UP_PROBING]:
                if checked[i]:      # out until a good check: a fail-open choice at most
                    end = eu if eu >= oe else oe
                    if end < soonest_end:
                        soonest, soonest_end = i, end
                    continue
                end = self._ejection_end(i, b, eu, oe, now)
                if end is None:
                    return self._lease(i, b, True)
                if end < soonest_end:
                    soonest, soonest_end = i, end
                continue
            avail[i] = True
            latency = lat[i] = d[b + UP_EWMA] or o_ewma[i]
            if latency and (not min_lat or latency < min_lat):
                min_lat = latency
        if self._prio is not None:
            self._lowest_priority_only()
        best = self._lowest_score(order, now, min_lat or 1.0)
        if best < 0:
            if soonest < 0:         # every candidate is down (health checks)
                return self.pick() if tried else None
            best = soonest
        return self._lease(best, bases[best], False)

    def _ejection_end(self, i: int, b: int, eu: float, oe: float, now: float):
        """When an out-of-service position returns; None if we must probe it now."""
        end = eu if eu >= oe else oe
        if self._o_probing[i] or self._q[b + UP_PROBING]:
            return end if end > now else now
        if end > now:
            return end
        if eu > oe or (eu == oe and self._block < self._o_holder[i]):
            return None             # cool-down over and we hold the largest ejection
        if now >= end + PROBE_GRACE:
            return None             # the holder got no request to probe with: we do it
        return end + PROBE_GRACE

    def _lowest_priority_only(self) -> None:
        """SRV: keep only the available positions of the lowest priority."""
        avail, prio = self._avail, self._prio
        levels = [prio[i] for i in range(self._n) if avail[i]]
        if levels:
            best = min(levels)
            for i in range(self._n):
                if avail[i] and prio[i] != best:
                    avail[i] = False

    def _lowest_score(self, order, now: float, min_lat: float) -> int:
        q, d, bases, lat, avail = self._q, self._d, self._bases, self._lat, self._avail
        o_inflight, o_penalty, halflife = self._o_inflight, self._o_penalty, self._halflife
        o_sampled, inv_w = self._o_sampled, self._inv_w
        best, best_score = -1, _INF
        for i in order:
            if not avail[i]:
                continue
            b = bases[i]
            p = d[b + UP_PENALTY]
            if p:
                p *= 0.5 ** ((now - d[b + UP_PENALTY_T]) / halflife)
                if p < PENALTY_FLOOR:
                    p = 0.0         # an old failure must not lose every tie forever
            latency = lat[i]
            if latency > min_lat:
                # An estimate nobody refreshed lately relaxes toward the fastest
                # known, so an upstream starved by one slow sample is tried again.
                age = now - max(d[b + UP_EWMA_T], o_sampled[i]) - RELAX_AFTER
                if age >= RELAX_SPAN:
                    latency = min_lat   # a tie: round-robin gives it a turn
                elif age > 0:
                    latency -= (latency - min_lat) * age / RELAX_SPAN
            else:
                latency = min_lat
            load = q[b + UP_INFLIGHT] + o_inflight[i]
            score = (load + 1 + p + o_penalty[i]) * latency * inv_w[i]
            if score < best_score:
                best, best_score = i, score
        return best

    def _lease(self, i: int, b: int, probe: bool) -> Lease:
        q = self._q
        q[b + UP_INFLIGHT] += 1
        q[b + UP_REQUESTS] += 1
        if probe:
            q[b + UP_PROBING] = 1
        return Lease(self, i, b, probe)

    # -- free -----------------------------------------------------------------------

    def _release(self, i: int, b: int, probe: bool, ok: bool, latency: float) -> None:
        now = self._clock()
        q, d = self._q, self._d
        q[b + UP_INFLIGHT] -= 1
        if not ok:
            self._failed(i, b, probe, now)
            return
        # succeeded (here, not in a method of its own: this runs per request)
        q[b + UP_CONSEC] = 0
        latency = latency if latency > MIN_LATENCY else MIN_LATENCY
        e = d[b + UP_EWMA]
        d[b + UP_EWMA] = e + ALPHA * (latency - e) if e else latency
        d[b + UP_EWMA_T] = now
        q[b + UP_HIST + bisect_left(LATENCY_BUCKETS, latency)] += 1
        d[b + UP_HIST_SUM] += latency
        if probe:
            d[b + UP_REVIVED] = now         # first: makes every older ejection stale
            d[b + UP_EJECT] = 0.0
            d[b + UP_PENALTY] = 0.0
            q[b + UP_PROBING] = 0
            self._next_refresh = now        # re-filter the others' now-stale ejections
            if self._on_event is not None:
                self._on_event(i, REVIVED, 0)

    def _failed(self, i: int, b: int, probe: bool, now: float) -> None:
        q, d = self._q, self._d
        q[b + UP_FAILURES] += 1
        last = d[b + UP_PENALTY_T]
        p = d[b + UP_PENALTY]
        if p:
            p *= 0.5 ** ((now - last) / self._halflife)
        d[b + UP_PENALTY] = p + 1.0 if p + 1.0 < PENALTY_MAX else PENALTY_MAX
        d[b + UP_PENALTY_T] = now
        # failures in a row, within -outFailTimeout of each other (nginx's
        # max_fails within fail_timeout), counted over ALL workers: the
        # summed penalty steers every worker away after a failure or two, so
        # one worker alone would seldom see max_fails and a dead upstream
        # would be avoided but never ejected, probed or quickly reinstated.
        consec = (q[b + UP_CONSEC] if now - last < self._fail_timeout else 0) + 1
        q[b + UP_CONSEC] = consec
        if probe or (0 < self._max_fails <= consec + self._o_consec[i]
                     and d[b + UP_EJECT] <= now):
            d[b + UP_EJECT] = now + self._fail_timeout
            if self._on_event is not None:
                if probe:
                    self._on_event(i, STILL_DOWN, consec)
                elif self._o_eject[i] <= now:   # another block's ejection: it said so
                    self._on_event(i, EJECTED, consec + self._o_consec[i])
        if probe:
            q[b + UP_PROBING] = 0           # after the new eject_until: never a gap
