"""Shared-memory counters, worker blocks and per-upstream balancer state.

Theory of operation
-------------------
The master creates one anonymous ``mmap.mmap(-1, size, MAP_SHARED)`` before it
forks anything; every child inherits the same pages.  Every field is one 8-byte
word, and the whole map is exposed through two views of the same bytes::

    stats.q = memoryview(mm).cast("Q")    # unsigned 64-bit integers
    stats.d = memoryview(mm).cast("d")    # IEEE doubles

A field is a *word index*, so the hot path is ``q[base + IN_REQUEST_START] += 1``
with no method call.  A word is written through ``q`` or through ``d``, never
both (float fields are listed as such below); an all-zero word reads as ``0``
and as ``0.0``, so zeroing through ``q`` is fine for both kinds.

A *block* belongs to one worker process, its only writer, so there are no locks
(a ``multiprocessing.Lock`` held by a SIGKILLed process deadlocks everyone).
Blocks are not worker slots: during a rolling reload an old and a new worker
for the same slot run at once, each with its own block.  The master claims a
free block before each fork (``claim_block``), learns the pid after it
(``set_block_pid``) and releases the block when it reaps the process.

Counters are never zeroed: a block reused by a new process keeps adding to
the old totals, so sums never go backwards.  Gauges (``inConns``, ``outConns``
and the per-upstream balancer state) are zeroed on claim and on release; the
claim happens before the new writer exists and the release after the old one
died, so neither races a writer.  Readers tolerate values a few milliseconds
old; an aligned 8-byte store is atomic on the platforms we run on, so a reader
never sees a torn word.  The admin fields the master writes together at claim
time are bracketed by a seqlock (``SEQ`` odd while writing).

Layout (word indexes; 1 word = 8 bytes; everything 64-byte aligned)
-------------------------------------------------------------------

=========================  ==========================  =======================================
words                      field                       notes
=========================  ==========================  =======================================
0                          MAGIC                       ``b"httptpSM"`` as little-endian u64
1                          LAYOUT_VERSION              ``LAYOUT_VERSION`` (bump on any change)
2                          max_blocks
3                          max_upstreams
4                          WORKER_RESTARTS             counter, master writes
5                          UPSTREAM_GENERATION         a seqlock: odd while the name table is
                                                       written; generation = word >> 1, one
                                                       more after every ``assign_upstreams``
6                          BLOCK_WORDS                 words per block (sanity check)
7                          RESOLVE_ERRORS              counter, the resolver helper writes
8 .. 8+16*U                upstream name table         U entries of 16 words (128 bytes):
                                                       word 0 = state | name_length << 8
                                                       | priority << 16 | weight << 32
                                                       (state 0 empty, 1 listed, 2 retired;
                                                       priority, weight: SRV, see below),
                                                       words 1..15 = utf-8 name, <= 120 bytes
8+16*U .. 8+24*U           upstream health table       U entries of 8 words (64 bytes), one per
                                                       name-table index; written only by the
                                                       health checker (see below)
BLOCKS_START + b*BW        block b (BW = BLOCK_WORDS)  ``max_blocks`` blocks
=========================  ==========================  =======================================

Block (offsets relative to ``block_base(b)``):

=========  ======================  ========  ==========================================
offset     field                   kind      writer
=========  ======================  ========  ==========================================
0          IN_USE                  int       master (claim/release)
1          SEQ                     int       master: seqlock around the claim fields
2          PID                     int       master
3          SLOT                    int       master
4          GENERATION              int       master
5          STATE                   int       worker (0 free, 1 booting, 2 ready, 3 draining;
                                               the balancer reads "draining")
6          HEARTBEAT               float     worker: ``time.monotonic()`` of the last beat
7          STARTED                 float     master: monotonic time of the claim
8 .. 31    COUNTERS (24)           counter   worker, in ``COUNTERS`` order
32, 33     inConns, outConns       gauge     worker
34, 35     in/outTeleportErrors    counter   worker
36         inTLSHandshakeErrors    counter   worker
37 .. 40   teleport{Sent,Received}{Plain,Compressed}Bytes   counter   worker: teleport
                                               payload before and after the codec
41, 42     inRequestTooLarge,      counter   worker: messages refused for a size limit
           outResponseTooLarge
43 .. 47   RESP_1XX .. RESP_5XX    counter   worker: proxied responses by status class
48         RESP_OTHER              counter   worker: proxied responses outside 100..599
49 .. 61   DURATION_HIST           counter   worker: whole-request duration as the client
                                               sees it, one word per bucket of
                                               ``LATENCY_BUCKETS`` then +Inf (not cumulative)
62         DURATION_SUM            float     worker: sum of those durations, seconds
63, 64     teleport in-side level  gauge     worker: sum of the compression levels of
           sum, links                        its teleport listener connections, and
                                             how many they are (codecs with levels)
65, 66     teleport out-side level gauge     worker: the same for its teleport
           sum, links                        upstream connections
67 .. 71   reserved
72 + 32*u  upstream u (32 words)   see below worker (its balancer), u < max_upstreams
=========  ======================  ========  ==========================================

The status classes and the duration histogram are not in ``COUNTERS`` (they
are no expvar of the original): ``response_classes()`` and
``request_durations()`` sum them; ``httptp.exposition`` shows them as
``httptp_requests_proxied_total{code=...}`` and
``httptp_request_duration_seconds``.

Per upstream (offsets relative to ``upstream_base(b, u)``; 256 bytes each):

======  ============  =======  =====================================================
offset  field         kind     meaning
======  ============  =======  =====================================================
0       UP_INFLIGHT   gauge    requests picked and not yet released
1       UP_REQUESTS   counter  requests picked
2       UP_FAILURES   counter  requests released with ok=False
3       UP_CONSEC     gauge    consecutive failures
4       UP_EWMA       float    latency EWMA in seconds, 0.0 = unknown
5       UP_PENALTY    float    failure penalty as of UP_PENALTY_T (decays)
6       UP_PENALTY_T  float    monotonic time UP_PENALTY was last written
7       UP_EJECT      float    monotonic end of the ejection, 0.0 = not ejected
8       UP_PROBING    gauge    1 while this block's trial request is in flight
9       UP_REVIVED    float    monotonic time of this block's last successful probe
10      UP_EWMA_T     float    monotonic time of the last latency sample in UP_EWMA
11..15  reserved
16..28  UP_HIST       counter  latency histogram of successful requests: one word per
                               bucket of ``LATENCY_BUCKETS``, then +Inf (not cumulative)
29      UP_HIST_SUM   float    sum of those latencies, seconds (a counter)
30..31  reserved
======  ============  =======  =====================================================

Health entry (offsets relative to ``health_base(u)``; one writer: the health
checker helper, ``httptp.health``; all zero = unknown, never checked):

======  ============  =======  ==============================================
offset  field         kind     meaning
======  ============  =======  =====================================================
0       HL_STATE      int      ``HEALTH_UNKNOWN`` 0, ``HEALTH_UP`` 1, ``HEALTH_DOWN`` 2
1       HL_CHECKED    float    wall time (``time.time()``) the last check ended
2       HL_CODE       int      HTTP status of the last check, 0 for no answer
3       HL_CHECKS     counter  checks done
4       HL_FAILS      counter  checks that failed (no answer, or not 2xx/3xx)
5       HL_GOOD_MONO  float    monotonic time the last *good* check was sent
6       HL_MONO       float    monotonic time the last check ended (staleness)
7       HL_SINCE      float    wall time of the last state change
======  ============  =======  =====================================================

The master zeroes an entry when ``assign_upstreams`` gives its index to a new
name (before the checker knows the name), so a new upstream starts unknown.
=======
Name-table entries: a plain ``-out`` entry is listed under its own text
(``127.0.0.1:8080``, a unix path).  An address found by resolving an ``-out``
name (``httptp.discovery``) is listed as ``address NUL origin``
(``127.0.0.2:8080\0app.example:8080``, ``10.0.0.5:80\0_http._tcp.app``):
``upstream_entries`` splits them, ``upstream_names`` shows ``address (origin)``.
Priority (16 bits) and weight (17 bits: SRV weight + 1, 0 for no weight)
come from SRV answers.  The master writes the table at start and on HUP; when
``-out`` has names, the resolver helper writes it in between (the master
stops that helper before its own writes, so there is one writer at a time).

``UP_REVIVED`` is a fact ("upstream u answered a probe at t"), not a gauge: it
survives claim and release (see ``httptp.balancer``).  Sizes: with 256 blocks
and 64 upstreams the map is about 2.2 MB, and untouched pages are never faulted
in.  CLOCK_MONOTONIC is system-wide on Linux, so the float times compare across
processes.
"""

from __future__ import annotations

import mmap
import time

MAGIC = int.from_bytes(b"httptpSM", "little")
LAYOUT_VERSION = 7

# Header words.
H_MAGIC, H_VERSION, H_MAX_BLOCKS, H_MAX_UPSTREAMS = 0, 1, 2, 3
H_WORKER_RESTARTS, H_UPSTREAM_GENERATION, H_BLOCK_WORDS = 4, 5, 6
H_RESOLVE_ERRORS = 7                # DNS failures of -out names (the resolver helper)
HEADER_WORDS = 8
NAME_WORDS = 16                     # per name-table entry
NAME_BYTES = (NAME_WORDS - 1) * 8   # 120
NAME_EMPTY, NAME_LISTED, NAME_RETIRED = 0, 1, 2
# Health table (after the name table): per upstream index, written by the checker.
HEALTH_WORDS = 8
HEALTH_UNKNOWN, HEALTH_UP, HEALTH_DOWN = 0, 1, 2
HL_STATE, HL_CHECKED, HL_CODE, HL_CHECKS, HL_FAILS, HL_GOOD_MONO, HL_MONO, HL_SINCE = range(8)
HEALTH_CHECKS_NAME = "outHealthChecks"                  # summed in totals()
HEALTH_CHECK_FAILURES_NAME = "outHealthCheckFailures"
ORIGIN_SEP = "\0"                   # "address NUL origin": an address found by resolving

# Block admin words.
IN_USE, SEQ, PID, SLOT, GENERATION, STATE, HEARTBEAT, STARTED = range(8)
STATE_FREE, STATE_BOOTING, STATE_READY, STATE_DRAINING = 0, 1, 2, 3

# Block counters: the original's expvar names (PROTOCOL.md §3.6), then ours.
IN_REQUEST_START = 8
IN_REQUEST_SUCCESS = 9
IN_REQUEST_NON200 = 10
IN_REQUEST_TIMEOUT_ERROR = 11
IN_REQUEST_OTHER_ERROR = 12
IN_ACCEPT_SUCCESS = 13
IN_ACCEPT_ERROR = 14
IN_BYTES_READ = 15
IN_BYTES_WRITTEN = 16
IN_READ_CALLS = 17
IN_WRITE_CALLS = 18
IN_READ_ERROR = 19
IN_WRITE_ERROR = 20
OUT_DIAL_SUCCESS = 21
OUT_DIAL_ERROR = 22
OUT_BYTES_READ = 23
OUT_BYTES_WRITTEN = 24
OUT_READ_CALLS = 25
OUT_WRITE_CALLS = 26
OUT_READ_ERROR = 27
OUT_WRITE_ERROR = 28
IN_REQUEST_BAD_REQUEST = 29         # 4xx answered by the proxy itself
IN_REQUEST_OVERLOAD = 30            # 503/429 answered over -concurrency
IN_CONNS_REJECTED_BY_ALLOW_LIST = 31
# Block gauges (zeroed on claim and release).
IN_CONNS = 32
OUT_CONNS = 33
# More counters, after the gauges (the original's block above stays put).
IN_TELEPORT_ERRORS = 34             # teleport clients: bad handshake, corrupt stream, bad frame
OUT_TELEPORT_ERRORS = 35            # teleport upstreams: the same, seen from our client
IN_TLS_HANDSHAKE_ERRORS = 36        # https/teleports listeners: failed or timed-out TLS handshakes
# Teleport payload bytes of this process, both roles: what went into our
# compressors and came out of them (sent), what went into our decompressors
# and came out (received).  The ratio plain/compressed is the saving.
TELEPORT_SENT_PLAIN = 37
TELEPORT_SENT_COMPRESSED = 38
TELEPORT_RECEIVED_COMPRESSED = 39
TELEPORT_RECEIVED_PLAIN = 40
# Messages refused for a size limit: requests over -inMaxHeaderSize or
# -inMaxBodySize (413/431 on http, 413 or a closed connection on teleport),
# responses over -outMaxHeaderSize or -outMaxBodySize (502).
IN_REQUEST_TOO_LARGE = 41
OUT_RESPONSE_TOO_LARGE = 42
# Proxied responses by status class: RESP_1XX - 1 + status // 100 for 100..599,
# RESP_OTHER for anything else an upstream may send (600..999).
RESP_1XX = 43
RESP_OTHER = 48
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")     # words RESP_1XX .. RESP_OTHER
# Whole-request duration as the client sees it (from its request head read to
# the last byte of the answer handed to its socket), every request proxied or
# answered 502/503/504 in the upstream's place: one word per bucket of LATENCY_BUCKETS, +Inf, then the sum (float).
DURATION_HIST = 49
DURATION_SUM = 62
# Compression levels of this process's teleport connections, as sum and
# count per side (the mean is what /prometheus shows): -inCompressLevel for
# listener connections, -outCompressLevel for upstream links.
IN_LEVEL_SUM = 63
IN_LEVEL_LINKS = 64
OUT_LEVEL_SUM = 65
OUT_LEVEL_LINKS = 66
BLOCK_HEADER_WORDS = 72             # admin + counters + gauges + spare, 64-byte aligned

# Per-upstream words.
UP_INFLIGHT, UP_REQUESTS, UP_FAILURES, UP_CONSEC, UP_EWMA = 0, 1, 2, 3, 4
UP_PENALTY, UP_PENALTY_T, UP_EJECT, UP_PROBING, UP_REVIVED = 5, 6, 7, 8, 9
UP_EWMA_T = 10
# Latency histogram of successful requests (counters: kept across claims):
# one word per bucket (not cumulative; the exposition accumulates) and the sum.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UP_HIST = 16                        # 12 bounded buckets, then +Inf at UP_HIST + 12
UP_HIST_SUM = UP_HIST + len(LATENCY_BUCKETS) + 1    # float, seconds
UP_WORDS = 32
assert DURATION_SUM == DURATION_HIST + len(LATENCY_BUCKETS) + 1 <= BLOCK_HEADER_WORDS
# Zeroed on claim/release: everything except the counters and UP_REVIVED.
UP_GAUGES = (UP_INFLIGHT, UP_CONSEC, UP_EWMA, UP_EWMA_T, UP_PENALTY, UP_PENALTY_T, UP_EJECT,
             UP_PROBING)

COUNTERS = (
    ("inRequestStart", IN_REQUEST_START, "counter"),
    ("inRequestSuccess", IN_REQUEST_SUCCESS, "counter"),
    ("inRequestNon200", IN_REQUEST_NON200, "counter"),
    ("inRequestTimeoutError", IN_REQUEST_TIMEOUT_ERROR, "counter"),
    ("inRequestOtherError", IN_REQUEST_OTHER_ERROR, "counter"),
    ("inAcceptSuccess", IN_ACCEPT_SUCCESS, "counter"),
    ("inAcceptError", IN_ACCEPT_ERROR, "counter"),
    ("inConns", IN_CONNS, "gauge"),
    ("inBytesRead", IN_BYTES_READ, "counter"),
    ("inBytesWritten", IN_BYTES_WRITTEN, "counter"),
    ("inReadCalls", IN_READ_CALLS, "counter"),
    ("inWriteCalls", IN_WRITE_CALLS, "counter"),
    ("inReadError", IN_READ_ERROR, "counter"),
    ("inWriteError", IN_WRITE_ERROR, "counter"),
    ("outDialSuccess", OUT_DIAL_SUCCESS, "counter"),
    ("outDialError", OUT_DIAL_ERROR, "counter"),
    ("outConns", OUT_CONNS, "gauge"),
    ("outBytesRead", OUT_BYTES_READ, "counter"),
    ("outBytesWritten", OUT_BYTES_WRITTEN, "counter"),
    ("outReadCalls", OUT_READ_CALLS, "counter"),
    ("outWriteCalls", OUT_WRITE_CALLS, "counter"),
    ("outReadError", OUT_READ_ERROR, "counter"),
    ("outWriteError", OUT_WRITE_ERROR, "counter"),
    ("inRequestBadRequest", IN_REQUEST_BAD_REQUEST, "counter"),
    ("inRequestOverload", IN_REQUEST_OVERLOAD, "counter"),
    ("inConnsRejectedByAllowList", IN_CONNS_REJECTED_BY_ALLOW_LIST, "counter"),
    ("inTeleportErrors", IN_TELEPORT_ERRORS, "counter"),
    ("outTeleportErrors", OUT_TELEPORT_ERRORS, "counter"),
    ("inTLSHandshakeErrors", IN_TLS_HANDSHAKE_ERRORS, "counter"),
    ("teleportSentPlainBytes", TELEPORT_SENT_PLAIN, "counter"),
    ("teleportSentCompressedBytes", TELEPORT_SENT_COMPRESSED, "counter"),
    ("teleportReceivedCompressedBytes", TELEPORT_RECEIVED_COMPRESSED, "counter"),
    ("teleportReceivedPlainBytes", TELEPORT_RECEIVED_PLAIN, "counter"),
    ("inRequestTooLarge", IN_REQUEST_TOO_LARGE, "counter"),
    ("outResponseTooLarge", OUT_RESPONSE_TOO_LARGE, "counter"),
)
GAUGES = (IN_CONNS, OUT_CONNS, IN_LEVEL_SUM, IN_LEVEL_LINKS, OUT_LEVEL_SUM, OUT_LEVEL_LINKS)
_FIRST, _LAST = IN_REQUEST_START, OUT_RESPONSE_TOO_LARGE + 1  # the slice holding every COUNTERS word
WORKER_RESTARTS_NAME = "workerRestarts"             # header counter, included in totals()
RESOLVE_ERRORS_NAME = "outResolveErrors"            # header counter, included in totals()


def split_upstream_name(name: str) -> tuple[str, str]:
    """A name-table entry → (dialable address, the -out entry it came from)."""
    address, sep, origin = name.partition(ORIGIN_SEP)
    return address, origin if sep else address


def display_upstream_name(name: str) -> str:
    """``address`` for a plain entry, ``address (origin)`` for a resolved one."""
    address, origin = split_upstream_name(name)
    return address if origin == address else f"{address} ({origin})"


def upstream_entries(stats: Stats) -> list[tuple[int, str, str]]:
    """(index, address, origin) of every listed upstream, by index; ``origin``
    is the ``-out`` entry the address came from (== address for a plain IP
    address or unix path).  For any process: the health checker, the status
    page.  Read again when ``stats.upstream_generation()`` changes."""
    table = stats.upstream_table()
    entries = table[1] if table is not None else stats.listed_upstreams()
    return [(index, *split_upstream_name(name)) for index, name, _, _ in entries]


def pack_meta(priority: int, weight: int | None) -> int:
    """SRV priority and weight as one table field (weight None: not given)."""
    stored = 0 if weight is None else min(weight, 0xFFFF) + 1
    return min(priority, 0xFFFF) | stored << 16


def unpack_meta(meta: int) -> tuple[int, int]:
    """(priority, weight + 1 or 0) from ``pack_meta``'s field."""
    return meta & 0xFFFF, meta >> 16 & 0x1FFFF


def layout_words(max_blocks: int, max_upstreams: int) -> tuple[int, int, int]:
    """Return (blocks_start, block_words, total_words) for the given sizes."""
    blocks_start = HEADER_WORDS + (NAME_WORDS + HEALTH_WORDS) * max_upstreams
    block_words = BLOCK_HEADER_WORDS + UP_WORDS * max_upstreams
    return blocks_start, block_words, blocks_start + block_words * max_blocks


class Stats:
    """One shared map: header, upstream name table, ``max_blocks`` blocks."""

    def __init__(self, mm: mmap.mmap, *, clock=time.monotonic):
        """Attach to an initialised map (``create`` makes one); checks magic and version."""
        self._mm = mm
        self.q = memoryview(mm).cast("Q")
        self.d = memoryview(mm).cast("d")
        self._bytes = memoryview(mm)
        self.clock = clock
        if self.q[H_MAGIC] != MAGIC or self.q[H_VERSION] != LAYOUT_VERSION:
            raise ValueError("not an httptp stats map of layout version %d" % LAYOUT_VERSION)
        self.max_blocks = self.q[H_MAX_BLOCKS]
        self.max_upstreams = self.q[H_MAX_UPSTREAMS]
        self._blocks_start, self._block_words, total = layout_words(
            self.max_blocks, self.max_upstreams)
        if self.q[H_BLOCK_WORDS] != self._block_words or len(self.q) < total:
            raise ValueError("stats map size does not match its header")

    @classmethod
    def create(cls, max_blocks: int, max_upstreams: int = 64, *, clock=time.monotonic) -> Stats:
        """Map fresh zeroed shared memory (call in the master, before any fork)."""
        if max_blocks < 1 or max_upstreams < 1:
            raise ValueError("max_blocks and max_upstreams must be positive")
        _, block_words, total = layout_words(max_blocks, max_upstreams)
        mm = mmap.mmap(-1, total * 8, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
        q = memoryview(mm).cast("Q")
        q[H_VERSION] = LAYOUT_VERSION
        q[H_MAX_BLOCKS], q[H_MAX_UPSTREAMS] = max_blocks, max_upstreams
        q[H_BLOCK_WORDS] = block_words
        q[H_MAGIC] = MAGIC
        q.release()
        return cls(mm, clock=clock)

    def close(self) -> None:
        """Drop the views and unmap (in this process only)."""
        for view in (self.q, self.d, self._bytes):
            view.release()
        self._mm.close()

    # -- addressing ---------------------------------------------------------

    def block_base(self, block: int) -> int:
        """Word index of ``block``; add a field constant (``IN_CONNS`` …) to it."""
        if not 0 <= block < self.max_blocks:
            raise IndexError("block %d out of range" % block)
        return self._blocks_start + block * self._block_words

    def upstream_base(self, block: int, upstream: int) -> int:
        """Word index of ``upstream``'s entry in ``block``; add an ``UP_*`` constant."""
        if not 0 <= upstream < self.max_upstreams:
            raise IndexError("upstream %d out of range" % upstream)
        return self.block_base(block) + BLOCK_HEADER_WORDS + upstream * UP_WORDS

    # -- upstream name table (master writes) -----------------------------------

    def _name_word(self, index: int) -> int:
        return HEADER_WORDS + index * NAME_WORDS

    def _read_name(self, index: int) -> tuple[int, str]:
        w = self._name_word(index)
        flags = self.q[w]
        start = (w + 1) * 8
        raw = bytes(self._bytes[start:start + (flags >> 8 & 0xFF)])
        return flags & 0xFF, raw.decode("utf-8", "replace")

    def _write_name(self, index: int, state: int, raw: bytes, meta: int = 0) -> None:
        w = self._name_word(index)
        self.q[w] = NAME_EMPTY            # readers see an empty entry while the name changes
        start = (w + 1) * 8
        self._bytes[start:start + NAME_BYTES] = raw.ljust(NAME_BYTES, b"\0")
        self.q[w] = state | len(raw) << 8 | meta << 16

    def _set_meta(self, index: int, meta: int) -> None:
        w = self._name_word(index)
        if self.q[w] >> 16 != meta:
            self.q[w] = (self.q[w] & 0xFFFF) | meta << 16

    def _set_name_state(self, index: int, state: int) -> None:
        w = self._name_word(index)
        self.q[w] = (self.q[w] & ~0xFF) | state

    def assign_upstreams(self, names: list[str], meta: dict[str, int] | None = None) -> list[int]:
        """Give every name a stable index; return them in ``names`` order.

        A name already in the table keeps its index.  A new name takes an empty
        entry; only when none is left does it take a retired one (an index last
        used by a name no longer listed; the old name's per-block counters then
        carry over).  Names no longer listed are kept, marked retired, so a HUP
        never remaps an index an old worker still uses.  A repeated name maps to
        one index.  ``meta``: name → ``priority | weight << 16`` (SRV; see
        ``pack_meta``), 0 for names not in it.  Raises ValueError for a name
        over 120 utf-8 bytes and RuntimeError when the table is full.
        """
        meta = meta or {}
        raws = [n.encode("utf-8") for n in names]
        for raw in raws:
            if len(raw) > NAME_BYTES or not raw:
                raise ValueError("upstream name must be 1..%d utf-8 bytes: %r" % (NAME_BYTES, raw))
        table = {self._read_name(i)[1]: i for i in range(self.max_upstreams)
                 if self._read_name(i)[0] != NAME_EMPTY}
        wanted = set(names)
        q = self.q
        q[H_UPSTREAM_GENERATION] |= 1          # odd: readers of upstream_table() wait
        try:
            for name, i in table.items():
                self._set_name_state(i, NAME_LISTED if name in wanted else NAME_RETIRED)
            result = []
            for name, raw in zip(names, raws):
                if name not in table:
                    table[name] = self._free_name_index()
                    self._write_name(table[name], NAME_LISTED, raw, meta.get(name, 0))
                    self._zero_health(table[name])
                else:
                    self._set_meta(table[name], meta.get(name, 0))
                result.append(table[name])
        finally:
            # even again, one generation on (also after a writer killed mid-write)
            q[H_UPSTREAM_GENERATION] = (q[H_UPSTREAM_GENERATION] | 1) + 1
        return result

    def _free_name_index(self) -> int:
        states = [self.q[self._name_word(i)] & 0xFF for i in range(self.max_upstreams)]
        for wanted in (NAME_EMPTY, NAME_RETIRED):
            if wanted in states:
                return states.index(wanted)
        raise RuntimeError("upstream table full (%d entries)" % self.max_upstreams)

    def upstream_names(self) -> dict[int, str]:
        """Index → name for every listed upstream (retired ones are left out);
        a resolved address shows as ``address (origin)``."""
        names = {}
        for i in range(self.max_upstreams):
            state, name = self._read_name(i)
            if state == NAME_LISTED:
                names[i] = display_upstream_name(name)
        return names

    def upstream_name(self, index: int) -> str | None:
        """The name listed at ``index``; None when the entry is empty or retired."""
        state, name = self._read_name(index)
        return name if state == NAME_LISTED else None

    def listed_upstreams(self) -> list[tuple[int, str, int, int]]:
        """(index, table name, priority, weight) of every listed upstream;
        weight 0 means none given (see ``unpack_meta``)."""
        entries = []
        for i in range(self.max_upstreams):
            state, name = self._read_name(i)
            if state == NAME_LISTED:
                priority, weight = unpack_meta(self.q[self._name_word(i)] >> 16)
                entries.append((i, name, priority, weight))
        return entries

    def upstream_generation(self) -> int:
        """One more after every ``assign_upstreams`` (compare it to notice a change)."""
        return self.q[H_UPSTREAM_GENERATION] >> 1

    def upstream_table(self, tries: int = 100) -> tuple[int, list] | None:
        """(generation, ``listed_upstreams()``) read while no writer was at work,
        or None if one was during every try (ask again later)."""
        q = self.q
        for _ in range(tries):
            seq = q[H_UPSTREAM_GENERATION]
            if seq & 1:
                continue
            entries = self.listed_upstreams()
            if q[H_UPSTREAM_GENERATION] == seq:
                return seq >> 1, entries
        return None

    def incr_resolve_errors(self) -> None:
        self.q[H_RESOLVE_ERRORS] += 1

    # -- upstream health table (the health checker writes) -----------------------

    def health_base(self, index: int) -> int:
        """Word index of upstream ``index``'s health entry; add an ``HL_*`` constant."""
        if not 0 <= index < self.max_upstreams:
            raise IndexError("upstream %d out of range" % index)
        return HEADER_WORDS + NAME_WORDS * self.max_upstreams + index * HEALTH_WORDS

    def _zero_health(self, index: int) -> None:
        base = self.health_base(index)
        for field in range(HEALTH_WORDS):
            self.q[base + field] = 0

    def set_health(self, index: int, state: int, checked_at: float, code: int) -> None:
        """Publish the checker's verdict on upstream ``index``: ``state`` (HEALTH_*),
        ``checked_at`` (wall time of the check), ``code`` (HTTP status, 0 for no
        answer).  The state word is written last, and a change stamps HL_SINCE."""
        q, d, base = self.q, self.d, self.health_base(index)
        d[base + HL_CHECKED] = checked_at
        q[base + HL_CODE] = code
        if q[base + HL_STATE] != state:
            d[base + HL_SINCE] = checked_at
        q[base + HL_STATE] = state

    def count_check(self, index: int, ok: bool, sent: float, ended: float) -> None:
        """Count one check of ``index``; ``sent``/``ended`` are monotonic times.
        A good check stamps HL_GOOD_MONO with ``sent`` (the balancer lets a
        passively ejected upstream back only after a good check sent later)."""
        q, d, base = self.q, self.d, self.health_base(index)
        q[base + HL_CHECKS] += 1
        if ok:
            d[base + HL_GOOD_MONO] = sent
        else:
            q[base + HL_FAILS] += 1
        d[base + HL_MONO] = ended

    def health(self, index: int) -> tuple[int, float, int]:
        """``(state, checked_at, code)`` of upstream ``index``: HEALTH_*, the wall
        time of the last check (0.0: never checked) and its HTTP status (0: no answer)."""
        q, base = self.q, self.health_base(index)
        return q[base + HL_STATE], self.d[base + HL_CHECKED], q[base + HL_CODE]

    def health_details(self, index: int) -> dict:
        """Everything in the health entry of ``index`` (for the stats pages)."""
        q, d, base = self.q, self.d, self.health_base(index)
        return {"state": q[base + HL_STATE], "checked_at": d[base + HL_CHECKED],
                "code": q[base + HL_CODE], "checks": q[base + HL_CHECKS],
                "failures": q[base + HL_FAILS], "since": d[base + HL_SINCE]}

    # -- blocks (master side) -------------------------------------------------

    def claim_block(self, pid: int, slot: int, generation: int) -> int:
        """Take a free block for a process about to be forked; zero its gauges.

        Counters keep their history.  Raises RuntimeError if no block is free.
        """
        q = self.q
        for block in range(self.max_blocks):
            base = self.block_base(block)
            if not q[base + IN_USE]:
                self._zero_gauges(base)
                now = self.clock()
                q[base + SEQ] += 1
                q[base + PID], q[base + SLOT], q[base + GENERATION] = pid, slot, generation
                q[base + STATE] = STATE_BOOTING
                self.d[base + HEARTBEAT] = self.d[base + STARTED] = now
                q[base + IN_USE] = 1
                q[base + SEQ] += 1
                return block
        raise RuntimeError("no free stats block (max_blocks=%d)" % self.max_blocks)

    def set_block_pid(self, block: int, pid: int) -> None:
        """Record the pid once the fork returned it (claim happens before fork)."""
        base = self.block_base(block)
        self.q[base + SEQ] += 1
        self.q[base + PID] = pid
        self.q[base + SEQ] += 1

    def release_block(self, block: int) -> None:
        """Free the block of a reaped process: zero gauges, keep counters."""
        q = self.q
        base = self.block_base(block)
        q[base + SEQ] += 1
        q[base + IN_USE] = 0
        self._zero_gauges(base)
        q[base + PID] = q[base + STATE] = 0
        q[base + HEARTBEAT] = q[base + STARTED] = 0
        q[base + SEQ] += 1

    def _zero_gauges(self, base: int) -> None:
        q = self.q
        for field in GAUGES:
            q[base + field] = 0
        up = base + BLOCK_HEADER_WORDS
        for _ in range(self.max_upstreams):
            for field in UP_GAUGES:
                q[up + field] = 0
            up += UP_WORDS

    def incr_restarts(self) -> None:
        self.q[H_WORKER_RESTARTS] += 1

    def restarts(self) -> int:
        return self.q[H_WORKER_RESTARTS]

    # -- worker side -------------------------------------------------------------

    def set_state(self, block: int, state: int) -> None:
        self.q[self.block_base(block) + STATE] = state

    def beat(self, block: int, now: float) -> None:
        self.d[self.block_base(block) + HEARTBEAT] = now

    # -- readers -------------------------------------------------------------------

    def block_info(self, block: int) -> dict:
        """Admin fields of one block, read consistently with the master's claim."""
        q, d, base = self.q, self.d, self.block_base(block)
        for _ in range(1000):       # bounded: a master killed mid-claim leaves SEQ odd
            seq = q[base + SEQ]
            info = {"in_use": bool(q[base + IN_USE]), "pid": q[base + PID],
                    "slot": q[base + SLOT], "generation": q[base + GENERATION],
                    "state": q[base + STATE], "heartbeat": d[base + HEARTBEAT],
                    "started": d[base + STARTED]}
            if not seq & 1 and q[base + SEQ] == seq:
                break
        return info

    def blocks_in_use(self) -> list[int]:
        return [b for b in range(self.max_blocks) if self.q[self.block_base(b) + IN_USE]]

    def block_counters(self, block: int) -> dict[str, int]:
        base = self.block_base(block)
        words = self.q[base + _FIRST:base + _LAST].tolist()
        return {name: words[field - _FIRST] for name, field, _ in COUNTERS}

    def totals(self) -> dict[str, int]:
        """Every counter and gauge of ``COUNTERS`` summed over all blocks, plus
        workerRestarts and the health checker's outHealthChecks and
        outHealthCheckFailures (over every upstream index)."""
        sums = [0] * (_LAST - _FIRST)
        for block in range(self.max_blocks):
            base = self.block_base(block)
            for k, v in enumerate(self.q[base + _FIRST:base + _LAST].tolist()):
                sums[k] += v
        result = {name: sums[field - _FIRST] for name, field, _ in COUNTERS}
        result[WORKER_RESTARTS_NAME] = self.restarts()
        checks = fails = 0
        for index in range(self.max_upstreams):
            base = self.health_base(index)
            checks += self.q[base + HL_CHECKS]
            fails += self.q[base + HL_FAILS]
        result[HEALTH_CHECKS_NAME] = checks
        result[HEALTH_CHECK_FAILURES_NAME] = fails
        result[RESOLVE_ERRORS_NAME] = self.q[H_RESOLVE_ERRORS]
        return result

    def response_classes(self) -> dict[str, int]:
        """Proxied responses by status class (``CODE_CLASSES``), over all blocks."""
        sums = [0] * len(CODE_CLASSES)
        for block in range(self.max_blocks):
            base = self.block_base(block) + RESP_1XX
            for k, v in enumerate(self.q[base:base + len(CODE_CLASSES)].tolist()):
                sums[k] += v
        return dict(zip(CODE_CLASSES, sums))

    def request_durations(self) -> tuple[list[int], float]:
        """(per-bucket counts, not cumulative, +Inf last; sum in seconds) of the
        whole-request durations, over all blocks."""
        n = len(LATENCY_BUCKETS) + 1
        hist, total = [0] * n, 0.0
        for block in range(self.max_blocks):
            base = self.block_base(block)
            for k, v in enumerate(self.q[base + DURATION_HIST:base + DURATION_HIST + n].tolist()):
                hist[k] += v
            total += self.d[base + DURATION_SUM]
        return hist, total

    def compress_levels(self) -> dict[str, float]:
        """The mean compression level of the live teleport connections of
        every worker, per side ("in": listener connections, "out": upstream
        links); a side with no such connection is left out."""
        result = {}
        for side, total, links in (("in", IN_LEVEL_SUM, IN_LEVEL_LINKS),
                                   ("out", OUT_LEVEL_SUM, OUT_LEVEL_LINKS)):
            s = n = 0
            for block in range(self.max_blocks):
                base = self.block_base(block)
                s += self.q[base + total]
                n += self.q[base + links]
            if n:
                result[side] = s / n
        return result

    def upstream_totals(self) -> dict[int, dict]:
        """Per assigned upstream index (listed or retired): the cluster-wide view.

        ``inflight`` sums in-use blocks, ``requests``/``failures`` all blocks;
        ``ejected`` is true while the balancer keeps regular traffic away (an
        ejection not yet cleared by a successful probe, or a probe in flight);
        ``ewma`` is the mean of the known per-block latency EWMAs (0.0 unknown).
        """
        q, d = self.q, self.d
        result = {}
        for u in range(self.max_upstreams):
            state, name = self._read_name(u)
            if state == NAME_EMPTY:
                continue
            inflight = requests = failures = probing = 0
            ejects, ewmas, revived = [], [], 0.0
            hist, hist_sum = [0] * (len(LATENCY_BUCKETS) + 1), 0.0
            for block in range(self.max_blocks):
                b = self.upstream_base(block, u)
                requests += q[b + UP_REQUESTS]
                failures += q[b + UP_FAILURES]
                for i, n in enumerate(q[b + UP_HIST:b + UP_HIST + len(hist)]):
                    hist[i] += n
                hist_sum += d[b + UP_HIST_SUM]
                revived = max(revived, d[b + UP_REVIVED])
                if not q[self.block_base(block) + IN_USE]:
                    continue
                inflight += q[b + UP_INFLIGHT]
                probing |= q[b + UP_PROBING]
                ejects.append(d[b + UP_EJECT])
                if d[b + UP_EWMA] > 0.0:
                    ewmas.append(d[b + UP_EWMA])
            ejected = bool(probing) or any(e > revived for e in ejects if e)
            address, origin = split_upstream_name(name)
            result[u] = {"name": display_upstream_name(name), "address": address,
                         "origin": origin, "listed": state == NAME_LISTED, "inflight": inflight,
                         "requests": requests, "failures": failures, "ejected": ejected,
                         "ewma": sum(ewmas) / len(ewmas) if ewmas else 0.0,
                         "eject_until": max(ejects, default=0.0) if ejected else 0.0,
                         "latency_buckets": hist, "latency_sum": hist_sum}
        return result
