"""``auto`` compression level: the level follows the link.

Theory of operation
-------------------
One `AutoLevel` per connection and direction watches the batches its
compressor writes and, at most once per ``interval``, moves the level one
step within the codec's ``auto_levels`` (codecs.REGISTRY):

* **down** when the writer falls behind (in more than half of the
  interval's batches the socket still held unsent bytes from earlier ones),
  when the worker's CPU saturates (``saturated`` of one core or more over
  the interval), or when compressing took more than ``target`` of the
  worker's CPU;
* **up** when none of that holds, with room: the writer kept up and
  compressing took less than ``UP_MARGIN * target`` of the worker's CPU;
* otherwise, or with no batch in the interval, it stays.

The margin between up and down keeps the level from see-sawing on a link
whose cost sits right at the target.  The change takes effect at the next
flush boundary (``codecs.Compressor.set_level``), so the stream stays
valid.

Nothing here reads a clock: ``clock()`` (monotonic seconds) and ``cpu()``
(the process's CPU seconds) are given, so tests drive it with fakes, and
the time spent compressing is measured with ``clock`` by the caller
(``connection._Connection.flush``) and reported with each batch.

"The compressor's share of the worker's CPU" counts every connection's
compressor when the connections of a process share one `Spent` (the
drivers pass ``httptp.io.common.COMPRESS_SPENT``): ten links at 6% each
are compressors at 60% of the worker, and all of them step down.  Without one, each
connection counts only its own.
"""

from __future__ import annotations

from collections.abc import Callable

INTERVAL = 1.0          # seconds between two decisions, at least
TARGET = 0.5            # the compressor's share of the worker's CPU
SATURATED = 0.9         # the worker's CPU (of one core) that counts as saturated
UP_MARGIN = 0.7         # move up only below UP_MARGIN * TARGET
BEHIND = 0.5            # more than this share of batches found the socket busy


class Spent:
    """Seconds spent compressing, summed over the connections that share it."""

    __slots__ = ("seconds",)

    def __init__(self):
        self.seconds = 0.0


class AutoLevel:
    """The level of one compressor, moved by what its batches cost.

    ``low``, ``high``: the bounds; ``start``: the first level (clamped to
    them).  ``batch(compress_seconds, behind)`` after every flush returns
    the level to use from the next batch on (the same one most of the
    time)."""

    __slots__ = ("level", "low", "high", "clock", "cpu", "interval", "target", "saturated",
                 "changes", "reason", "spent", "_spent0", "_t0", "_cpu0", "_spent", "_batches", "_behind")

    def __init__(self, low: int, high: int, start: int, *, clock: Callable[[], float],
                 cpu: Callable[[], float], interval: float = INTERVAL, target: float = TARGET,
                 saturated: float = SATURATED, spent: Spent | None = None):
        if low > high:
            raise ValueError(f"auto level bounds {low} > {high}")
        self.level = min(max(start, low), high)
        self.low, self.high = low, high
        self.clock, self.cpu = clock, cpu
        self.interval, self.target, self.saturated = interval, target, saturated
        self.changes = 0                # how many times the level moved
        self.reason = ""                # why the last decision went as it did
        self.spent = spent              # shared with the process's other connections
        self._start_interval(clock())

    def _start_interval(self, now: float) -> None:
        self._t0 = now
        self._cpu0 = self.cpu()
        self._spent = 0.0               # seconds compressing in this interval
        self._spent0 = self.spent.seconds if self.spent is not None else 0.0
        self._batches = 0
        self._behind = 0                # batches that found the socket busy

    def batch(self, compress_seconds: float, behind: bool) -> int:
        """Count one flushed batch (``compress_seconds`` spent on it;
        ``behind``: the socket still held earlier bytes) and return the level
        for the next one."""
        self._spent += compress_seconds
        if self.spent is not None:
            self.spent.seconds += compress_seconds
        self._batches += 1
        if behind:
            self._behind += 1
        now = self.clock()
        elapsed = now - self._t0
        if elapsed < self.interval:
            return self.level
        self._decide(elapsed)
        self._start_interval(now)
        return self.level

    def _decide(self, elapsed: float) -> None:
        used = self.cpu() - self._cpu0
        load = used / elapsed if elapsed > 0 else 0.0
        spent = self._spent if self.spent is None else self.spent.seconds - self._spent0
        share = spent / used if used > 0 else 0.0
        behind = self._behind > BEHIND * self._batches
        self.reason = (f"worker CPU {load:.0%} of a core, compressing {share:.0%} of it, "
                       f"{self._behind}/{self._batches} batches behind")
        if behind or load >= self.saturated or share > self.target:
            step = -1
        elif share < UP_MARGIN * self.target:
            step = 1
        else:
            return
        level = min(max(self.level + step, self.low), self.high)
        if level != self.level:
            self.level = level
            self.changes += 1
