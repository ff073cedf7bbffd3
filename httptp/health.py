"""Active health checks: the rise/fall state machine and the checker's books.

Theory of operation
-------------------
With ``-outHealthCheck=/path`` one helper process of the master (never one
per worker; ``httptp.supervisor.helpers.health_main``) sends ``GET /path`` to
every listed upstream every ``-outHealthCheckInterval``.  A 2xx or 3xx answer
head within ``-outHealthCheckTimeout`` is a good check; anything else (another
status, a refused or reset connection, a TLS failure, garbage, silence) is a
bad one.  The I/O lives in ``httptp.io.health_probe``; this module is sans-IO:
time comes in as arguments, and the results go to the shared memory through
``Stats.set_health`` and ``Stats.count_check`` (the checker is the only writer
of the health table).

States (``httptp.stats``): ``HEALTH_UNKNOWN`` (never checked: gets traffic, as
without checks), ``HEALTH_UP``, ``HEALTH_DOWN``.  ``Hysteresis`` is one
upstream's machine, as HAProxy's rise/fall counted in a row (nginx Plus's
passes/fails):

==========  ==================  ==========================================
state       check               next
==========  ==================  ==========================================
unknown     good                up
unknown     bad                 down (HAProxy starts a server at the very
                                edge of up: one failed check takes it down)
up          good                up, bad run reset
up          bad                 up, or down at the ``fall``-th bad in a row
down        bad                 down, good run reset
down        good                down, or up at the ``rise``-th good in a row
==========  ==================  ==========================================

Every round re-reads the set of upstreams from the shared name table
(``Stats.listed_upstreams``), so upstreams added or retired at run time (a HUP,
DNS discovery) are followed.  How a table entry becomes something to dial is
``dial_address`` (an ``-out`` address, or a resolved ``address NUL origin``).
A machine is keyed by (index, name): an index given to
another name starts over, unknown.  A checker that starts (a HUP, a crash)
takes each upstream's state from the table when it is fresh (checked within
``stale_after`` seconds), so a dead upstream does not get traffic again only
because the checker was replaced.

Transitions are logged once each: up → down with the reason, down → up, and
unknown → down (an upstream that is dead from the start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from httptp.logs import INFO, WARNING, say
from httptp.netaddr import Address, parse_address
from httptp.stats import (HEALTH_DOWN, HEALTH_UNKNOWN, HEALTH_UP, HL_MONO, HL_SINCE, HL_STATE,
                          Stats, display_upstream_name, split_upstream_name)

STATE_NAMES = {HEALTH_UNKNOWN: "unknown", HEALTH_UP: "up", HEALTH_DOWN: "down"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one check: ``code`` is the HTTP status, 0 for no answer."""

    ok: bool
    code: int
    reason: str                     # for the log: "answered 500", "connection refused"


def verdict_for_status(code: int) -> Verdict:
    """2xx and 3xx are good, any other status bad."""
    return Verdict(200 <= code < 400, code, f"answered {code}")


def stale_after(config) -> float:
    """Seconds after which a health entry is ignored, by the balancer and by a
    new checker: the checker has stopped publishing (three missed rounds)."""
    return 3 * config.out_health_check_interval + config.out_health_check_timeout + 5.0


def dial_address(name: str, out_type: str) -> Address:
    """The address to check for the upstream-table entry ``name``: an ``-out``
    address as written, or a resolved ``address NUL origin`` (discovery).
    Raises ValueError for an entry it cannot dial."""
    return parse_address(split_upstream_name(name)[0], "unix" if out_type == "unix" else "tcp")


class Hysteresis:
    """One upstream's health: HAProxy's rise/fall, counted in a row (module doc)."""

    __slots__ = ("state", "run", "rise", "fall")

    def __init__(self, rise: int, fall: int, state: int = HEALTH_UNKNOWN):
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise, self.fall = rise, fall
        self.state = state
        self.run = 0                # checks in a row that disagree with the state

    def record(self, ok: bool) -> bool:
        """Take one check's result; True if the state changed."""
        if self.state == HEALTH_UNKNOWN:
            self.state = HEALTH_UP if ok else HEALTH_DOWN
            return True
        if ok == (self.state == HEALTH_UP):
            self.run = 0
            return False
        self.run += 1
        if self.run < (self.rise if ok else self.fall):
            return False
        self.state = HEALTH_UP if ok else HEALTH_DOWN
        self.run = 0
        return True


@dataclass(frozen=True, slots=True)
class Target:
    index: int                      # the upstream's stats index
    name: str                       # its name-table entry
    address: Address


class Checker:
    """The bookkeeping of the health helper: targets per round, results in.

    ``log(message)`` gets the transitions; ``clock`` is monotonic, ``wall``
    the wall clock (what ``Stats.health`` reports)."""

    def __init__(self, stats: Stats, *, path: str, rise: int, fall: int, out_type: str,
                 log: Callable[[str], None], stale_after: float,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.stats = stats
        self.path = path
        self.rise, self.fall = rise, fall
        self.out_type = out_type
        self.log = log
        self.stale_after = stale_after
        self.clock, self.wall = clock, wall
        self.machines: dict[int, tuple[str, Hysteresis]] = {}
        self._unusable: set[str] = set()        # entries already logged as not dialable

    def targets(self) -> list[Target]:
        """The listed upstreams to check this round (re-read every round)."""
        names = {index: name for index, name, _, _ in self.stats.listed_upstreams()}
        for index in [i for i, (name, _) in self.machines.items() if names.get(i) != name]:
            del self.machines[index]            # retired, or the index has a new name
        result = []
        for index, name in sorted(names.items()):
            try:
                address = dial_address(name, self.out_type)
            except ValueError as err:
                if name not in self._unusable:
                    self._unusable.add(name)
                    self.log(f"upstream {display_upstream_name(name)}: not checked: {err}")
                continue
            if index not in self.machines:
                self.machines[index] = (name, Hysteresis(self.rise, self.fall,
                                                         self._inherited(index)))
            result.append(Target(index, name, address))
        return result

    def _inherited(self, index: int) -> int:
        """The state a previous checker left for ``index``, if it is fresh."""
        base = self.stats.health_base(index)
        checked = self.stats.d[base + HL_MONO]
        if checked and self.clock() - checked < self.stale_after:
            return self.stats.q[base + HL_STATE]
        return HEALTH_UNKNOWN

    def record(self, target: Target, verdict: Verdict, sent: float, ended: float) -> None:
        """Publish one check of ``target`` (``sent``/``ended``: monotonic times)."""
        entry = self.machines.get(target.index)
        if entry is None or entry[0] != target.name or \
                self.stats.upstream_name(target.index) != target.name:
            return                              # retired, or the index changed hands meanwhile
        machine = entry[1]
        before = machine.state
        changed = machine.record(verdict.ok)
        stats = self.stats
        since = stats.d[stats.health_base(target.index) + HL_SINCE]
        stats.count_check(target.index, verdict.ok, sent, ended)
        now = self.wall()
        stats.set_health(target.index, machine.state, now, verdict.code)
        if changed:
            self._log_change(display_upstream_name(target.name), before, machine.state, verdict,
                             now - since)

    def _log_change(self, name: str, before: int, after: int, verdict: Verdict,
                    lasted: float) -> None:
        if after == HEALTH_DOWN:
            runs = "" if before == HEALTH_UNKNOWN else f" ({self.fall} failed checks in a row)"
            say(self.log, f"upstream {name} is down: GET {self.path} {verdict.reason}{runs}; "
                "it gets no client requests until it passes the health checks again", WARNING)
        elif before == HEALTH_DOWN:
            say(self.log, f"upstream {name} is up again: {self.rise} good checks in a row "
                f"(GET {self.path} {verdict.reason}) after {lasted:.1f} s down", INFO)
