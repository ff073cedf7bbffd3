"""/expvar and /prometheus bodies, read from the shared-memory stats.

Sans-IO: functions of a ``Stats`` map, no sockets.  The stats server (a helper
process of the master) serves them.

* ``/expvar``: JSON with the original's counter names (PROTOCOL.md §3.6), summed
  over every worker block, plus ``cmdline``; ``?r=REGEXP`` keeps matching names.
* ``/prometheus`` (and ``/metrics``): first the original's block: for every
  integer expvar, sorted by name, ``# HELP <name> ...``, ``# TYPE <name>
  counter`` (``gauge`` for ``inConns`` and ``outConns``, which the original
  labelled "counter" too) then ``<name> <value>``: the names and values
  dashboards built on the original read.  prometheus-client cannot write that
  block (its counters always end in ``_total``), so it is formatted here.
  Then the ``httptp_*`` metrics from a custom collector in a private registry
  (not prometheus-client's multiprocess mode): Prometheus names with units and
  HELP, and per-upstream labels; then ``process_*``, summed over the master
  and its children (``httptp.procstats``).
"""

from __future__ import annotations

import json
import os
import re
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   InfoMetricFamily)

import httptp
from httptp import procstats
from httptp.stats import COUNTERS, LATENCY_BUCKETS

# expvar name -> (metric name, kind, help, labels).  Metrics that share a name
# differ by label values; one family per metric name.
_METRICS = {
    "inRequestStart": ("httptp_requests_started", "counter", "Requests received from clients", {}),
    "inRequestNon200": ("httptp_requests_proxied_non200", "counter",
                        "Proxied responses whose status was not 200", {}),
    "inRequestTimeoutError": ("httptp_request_errors", "counter",
                              "Requests answered by httptp itself, by reason",
                              {"reason": "upstream_timeout"}),
    "inRequestOtherError": ("httptp_request_errors", "counter", "", {"reason": "upstream_failed"}),
    "inRequestBadRequest": ("httptp_request_errors", "counter", "", {"reason": "bad_request"}),
    "inRequestOverload": ("httptp_request_errors", "counter", "", {"reason": "overload"}),
    "inAcceptSuccess": ("httptp_accepts", "counter", "Accepted client connections by result",
                        {"result": "ok"}),
    "inAcceptError": ("httptp_accepts", "counter", "", {"result": "error"}),
    "inConnsRejectedByAllowList": ("httptp_accepts", "counter", "", {"result": "refused_by_allowlist"}),
    "inConns": ("httptp_client_connections", "gauge", "Open client connections", {}),
    "inBytesRead": ("httptp_socket_bytes", "counter",
                    "Bytes on sockets (after compression and TLS), by side and direction",
                    {"side": "in", "direction": "read"}),
    "inBytesWritten": ("httptp_socket_bytes", "counter", "", {"side": "in", "direction": "written"}),
    "outBytesRead": ("httptp_socket_bytes", "counter", "", {"side": "out", "direction": "read"}),
    "outBytesWritten": ("httptp_socket_bytes", "counter", "", {"side": "out", "direction": "written"}),
    "inReadCalls": ("httptp_socket_calls", "counter", "Socket read and write calls",
                    {"side": "in", "direction": "read"}),
    "inWriteCalls": ("httptp_socket_calls", "counter", "", {"side": "in", "direction": "written"}),
    "outReadCalls": ("httptp_socket_calls", "counter", "", {"side": "out", "direction": "read"}),
    "outWriteCalls": ("httptp_socket_calls", "counter", "", {"side": "out", "direction": "written"}),
    "inReadError": ("httptp_socket_errors", "counter", "Socket read and write errors",
                    {"side": "in", "direction": "read"}),
    "inWriteError": ("httptp_socket_errors", "counter", "", {"side": "in", "direction": "written"}),
    "outReadError": ("httptp_socket_errors", "counter", "", {"side": "out", "direction": "read"}),
    "outWriteError": ("httptp_socket_errors", "counter", "", {"side": "out", "direction": "written"}),
    "outDialSuccess": ("httptp_upstream_dials", "counter", "Connections opened to upstreams",
                       {"result": "ok"}),
    "outDialError": ("httptp_upstream_dials", "counter", "", {"result": "error"}),
    "outConns": ("httptp_upstream_connections", "gauge", "Open upstream connections", {}),
    "inTeleportErrors": ("httptp_teleport_errors", "counter",
                         "Teleport protocol errors (bad handshake, corrupt stream, bad frame)",
                         {"side": "in"}),
    "outTeleportErrors": ("httptp_teleport_errors", "counter", "", {"side": "out"}),
    "inTLSHandshakeErrors": ("httptp_tls_handshake_errors", "counter",
                             "TLS handshakes that failed or timed out on https/teleports listeners",
                             {}),
    "teleportSentPlainBytes": ("httptp_teleport_bytes", "counter",
                               "Teleport payload bytes before and after the codec, by direction",
                               {"direction": "sent", "stage": "plain"}),
    "teleportSentCompressedBytes": ("httptp_teleport_bytes", "counter", "",
                                    {"direction": "sent", "stage": "compressed"}),
    "teleportReceivedPlainBytes": ("httptp_teleport_bytes", "counter", "",
                                   {"direction": "received", "stage": "plain"}),
    "teleportReceivedCompressedBytes": ("httptp_teleport_bytes", "counter", "",
                                        {"direction": "received", "stage": "compressed"}),
    "inRequestTooLarge": ("httptp_too_large", "counter",
                          "Messages refused for a size limit: requests (413, 431, or a teleport "
                          "connection closed) and upstream responses (502)", {"side": "in"}),
    "outResponseTooLarge": ("httptp_too_large", "counter", "", {"side": "out"}),
    "outHealthChecks": ("httptp_health_checks", "counter",
                        "Active health checks sent to upstreams (-outHealthCheck)", {}),
    "outHealthCheckFailures": ("httptp_health_check_failures", "counter",
                               "Active health checks that failed (no answer, or not 2xx/3xx)", {}),
    "workerRestarts": ("httptp_worker_restarts", "counter", "Worker processes replaced after dying", {}),
    "outResolveErrors": ("httptp_upstream_resolve_errors", "counter",
                         "Failed DNS lookups of -out names (the last good addresses stay)", {}),
}


class StatsCollector:
    """prometheus-client collector over a ``Stats`` map (summed over blocks)."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        totals = self.stats.totals()
        families: dict[str, object] = {}
        for expvar, (name, kind, help_, labels) in _METRICS.items():
            if expvar not in totals:
                continue
            fam = families.get(name)
            if fam is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = families[name] = cls(name, help_ or name, labels=list(labels))
            fam.add_metric(list(labels.values()), totals[expvar])
        yield from families.values()
        yield from self._requests()
        ratio = GaugeMetricFamily("httptp_teleport_compression_ratio",
                                  "Teleport plain bytes per compressed byte so far, by direction",
                                  labels=["direction"])
        for direction, plain, packed in (
                ("sent", "teleportSentPlainBytes", "teleportSentCompressedBytes"),
                ("received", "teleportReceivedPlainBytes", "teleportReceivedCompressedBytes")):
            if totals.get(packed):
                ratio.add_metric([direction], totals[plain] / totals[packed])
        yield ratio
        level = GaugeMetricFamily("httptp_teleport_compress_level",
                                  "Compression level of the live teleport connections (mean over "
                                  "them), by side: in (-inCompressLevel), out (-outCompressLevel)",
                                  labels=["side"])
        for side, mean in self.stats.compress_levels().items():
            level.add_metric([side], mean)
        yield level
        yield from self._upstreams()
        workers = GaugeMetricFamily("httptp_workers", "Worker processes running")
        workers.add_metric([], len(self.stats.blocks_in_use()))
        yield workers
        info = InfoMetricFamily("httptp_build", "httptp version and runtime")
        info.add_metric([], {"version": httptp.__version__,
                             "python": "%d.%d.%d" % sys.version_info[:3]})
        yield info

    def _requests(self):
        proxied = CounterMetricFamily("httptp_requests_proxied",
                                      "Requests answered with the upstream's response, by "
                                      "status class", labels=["code"])
        for code, n in self.stats.response_classes().items():
            proxied.add_metric([code], n)
        yield proxied
        counts, total = self.stats.request_durations()
        duration = HistogramMetricFamily(
            "httptp_request_duration_seconds",
            "Whole request duration as the client sees it (request head read to the last "
            "byte of the answer written), proxied or answered 502/503/504 in the upstream's place")
        duration.add_metric([], _cumulative(counts), total)
        yield duration

    def _upstreams(self):
        names = self.stats.upstream_names()
        per = self.stats.upstream_totals()
        req = CounterMetricFamily("httptp_upstream_requests", "Requests sent to an upstream",
                                  labels=["upstream"])
        fail = CounterMetricFamily("httptp_upstream_failures",
                                   "Requests to an upstream that failed (transport error or timeout)",
                                   labels=["upstream"])
        inflight = GaugeMetricFamily("httptp_upstream_in_flight", "Requests in flight to an upstream",
                                     labels=["upstream"])
        ejected = GaugeMetricFamily("httptp_upstream_ejected",
                                    "1 while the upstream is ejected after failed requests "
                                    "(-outMaxFails)",
                                    labels=["upstream"])
        ewma = GaugeMetricFamily("httptp_upstream_latency_ewma_seconds",
                                 "Response time EWMA of an upstream (what the balancer weighs)",
                                 labels=["upstream"])
        health = GaugeMetricFamily("httptp_upstream_health",
                                   "Active health check state: 0 unknown (not checked), 1 up, "
                                   "2 down", labels=["upstream"])
        checks = CounterMetricFamily("httptp_upstream_health_checks",
                                     "Active health checks sent to an upstream", labels=["upstream"])
        check_fails = CounterMetricFamily("httptp_upstream_health_check_failures",
                                          "Active health checks of an upstream that failed",
                                          labels=["upstream"])
        latency = HistogramMetricFamily("httptp_upstream_latency_seconds",
                                        "Response time of successful requests to an upstream",
                                        labels=["upstream"])
        for idx, name in sorted(names.items()):
            u = per.get(idx)
            if u is None:
                continue
            req.add_metric([name], u["requests"])
            fail.add_metric([name], u["failures"])
            inflight.add_metric([name], u["inflight"])
            ejected.add_metric([name], 1 if u["ejected"] else 0)
            ewma.add_metric([name], u["ewma"])
            h = self.stats.health_details(idx)
            health.add_metric([name], h["state"])
            checks.add_metric([name], h["checks"])
            check_fails.add_metric([name], h["failures"])
            latency.add_metric([name], _cumulative(u["latency_buckets"]), u["latency_sum"])
        return req, fail, inflight, ejected, ewma, health, checks, check_fails, latency


class ProcessCollector:
    """``process_*`` summed over a master and its children (``httptp.procstats``):
    the names of prometheus-client's own process collector, which sees one
    process only."""

    def __init__(self, master: int):
        self.master = master
        self.cpu = procstats.CpuClock()

    def collect(self):
        try:
            got = procstats.sample(self.master)
        except (OSError, ValueError):       # /proc not as expected: no process_* this time
            got = None
        if got is None:
            return
        cpu = CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent "
                                  "in seconds (the master and its children, reaped ones "
                                  "included)")
        cpu.add_metric([], self.cpu(got.cpu_seconds))
        yield cpu
        for name, help_, value in (
                ("process_resident_memory_bytes", "Resident memory size in bytes, summed "
                 "(pages shared after fork count once per process)", got.resident_bytes),
                ("process_virtual_memory_bytes", "Virtual memory size in bytes, summed",
                 got.virtual_bytes),
                ("process_open_fds", "Number of open file descriptors, summed", got.open_fds),
                ("process_max_fds", "Maximum number of open file descriptors (the master's)",
                 got.max_fds),
                ("process_start_time_seconds", "Start time of the master since unix epoch in "
                 "seconds", got.start_time),
                ("httptp_processes", "Processes the process_* metrics sum: the master, its "
                 "workers and helpers", got.processes)):
            if value is not None:
                yield GaugeMetricFamily(name, help_, value=value)


class Exposition:
    """What the stats server answers.  One per stats-server process.
    ``master``: the pid whose process tree ``process_*`` sums (the stats
    helper's parent; default: this process)."""

    def __init__(self, stats, cmdline: list[str] | None = None, master: int | None = None):
        self.stats = stats
        self.cmdline = list(cmdline if cmdline is not None else sys.argv)
        self.own = {"expvarHandlerCalls": 0, "prometheusHandlerCalls": 0, "expvarRegexpErrors": 0}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(stats))
        self.registry.register(ProcessCollector(os.getpid() if master is None else master))

    def _integers(self) -> dict[str, int]:
        values = dict(self.stats.totals())
        values.update(self.own)
        return values

    def expvar(self, regexp: str | None = None) -> bytes:
        """JSON body; raises ValueError for a bad ``regexp`` (the caller answers 400)."""
        self.own["expvarHandlerCalls"] += 1
        values: dict[str, object] = {"cmdline": self.cmdline, **self._integers()}
        for side, mean in self.stats.compress_levels().items():    # ours: mean per side
            values[f"teleportCompressLevel{side.capitalize()}"] = round(mean, 2)
        if regexp:
            try:
                pattern = re.compile(regexp)
            except re.error as e:
                self.own["expvarRegexpErrors"] += 1
                raise ValueError(f"cannot parse regexp {regexp!r}: {e}") from None
            values = {k: v for k, v in values.items() if pattern.search(k)}
        return (json.dumps(dict(sorted(values.items())), indent=1) + "\n").encode()

    def prometheus(self) -> bytes:
        self.own["prometheusHandlerCalls"] += 1
        compat = []
        for name, value in sorted(self._integers().items()):
            help_ = COMPAT_HELP.get(name, "httptp counter (docs/metrics.md)")
            compat.append(f"# HELP {name} {help_}\n# TYPE {name} {_KINDS.get(name, 'counter')}\n"
                          f"{name} {value}\n")
        return "".join(compat).encode() + generate_latest(self.registry)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts of ``LATENCY_BUCKETS`` and +Inf → (le, cumulative count)."""
    total, buckets = 0, []
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts):
        total += n
        buckets.append((_bound(bound), total))
    return buckets


_KINDS = {name: kind for name, _, kind in COUNTERS}

# HELP of the original's names in the compatibility block (docs/metrics.md).
COMPAT_HELP = {
    "inRequestStart": "Requests received from clients",
    "inRequestSuccess": "Requests answered with the upstream's response (any status)",
    "inRequestNon200": "Proxied responses whose status was not 200",
    "inRequestTimeoutError": "Requests answered 504: the upstream took longer than -outTimeout",
    "inRequestOtherError": "Requests answered 502: the upstream failed",
    "inRequestBadRequest": "Requests answered 4xx by httptp itself",
    "inRequestOverload": "Requests answered 503 (http) or 429 (teleport) over -concurrency",
    "inRequestTooLarge": "Requests refused for -inMaxHeaderSize or -inMaxBodySize",
    "inAcceptSuccess": "Client connections accepted",
    "inAcceptError": "Failed accept calls",
    "inConnsRejectedByAllowList": "Client connections closed at accept by -inAllowIP",
    "inConns": "Open client connections",
    "inBytesRead": "Bytes read from client sockets",
    "inBytesWritten": "Bytes written to client sockets",
    "inReadCalls": "Read calls on client sockets",
    "inWriteCalls": "Write calls on client sockets",
    "inReadError": "Failed reads on client sockets",
    "inWriteError": "Failed writes on client sockets",
    "inTeleportErrors": "Teleport clients dropped for a protocol error",
    "inTLSHandshakeErrors": "TLS handshakes that failed or timed out on the listener",
    "outDialSuccess": "Connections opened to upstreams",
    "outDialError": "Failed connection attempts to upstreams",
    "outConns": "Open upstream connections",
    "outBytesRead": "Bytes read from upstream sockets",
    "outBytesWritten": "Bytes written to upstream sockets",
    "outReadCalls": "Read calls on upstream sockets",
    "outWriteCalls": "Write calls on upstream sockets",
    "outReadError": "Failed reads on upstream sockets",
    "outWriteError": "Failed writes on upstream sockets",
    "outTeleportErrors": "Teleport upstream connections dropped for a protocol error",
    "outResponseTooLarge": "Upstream responses over -outMaxHeaderSize or -outMaxBodySize",
    "outHealthChecks": "Active health checks sent",
    "outHealthCheckFailures": "Active health checks that failed",
    "outResolveErrors": "Failed DNS lookups of -out names",
    "teleportSentPlainBytes": "Teleport frame bytes handed to our compressors",
    "teleportSentCompressedBytes": "Bytes our teleport compressors produced",
    "teleportReceivedCompressedBytes": "Bytes fed to our teleport decompressors",
    "teleportReceivedPlainBytes": "Teleport frame bytes our decompressors produced",
    "workerRestarts": "Worker processes replaced after dying",
    "expvarHandlerCalls": "/expvar requests served by this stats server",
    "prometheusHandlerCalls": "/prometheus and /metrics requests served by this stats server",
    "expvarRegexpErrors": "/expvar requests with a bad regexp",
}
