"""/expvar and /prometheus bodies, read from the shared-memory stats.

Sans-IO: functions of a ``Stats`` map, no sockets.  The stats server (a helper
process of the master) serves them.

* ``/expvar``: JSON with the original's counter names (PROTOCOL.md §3.6), summed
  over every worker block, plus ``cmdline``; ``?r=REGEXP`` keeps matching names.
* ``/prometheus``: first the original's block, byte-compatible: for every
  integer expvar, sorted by name, ``# TYPE <name> counter`` then ``<name> <value>``
  (the original labelled gauges "counter" too; dashboards built on it keep
  working).  prometheus-client cannot write that block (its counters always end
  in ``_total`` and carry HELP), so it is formatted here.  Then the ``httptp_*``
  metrics from a custom collector in a private registry (not prometheus-client's
  multiprocess mode): Prometheus names with units and HELP, and per-upstream
  labels.
"""

from __future__ import annotations

import json
import re
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                   InfoMetricFamily)

import httptp
from httptp.stats import LATENCY_BUCKETS

# expvar name -> (metric name, kind, help, labels).  Metrics that share a name
# differ by label values; one family per metric name.
_METRICS = {
    "inRequestStart": ("httptp_requests_started", "counter", "Requests received from clients", {}),
    "inRequestSuccess": ("httptp_requests_proxied", "counter",
                         "Requests answered with the upstream's response", {}),
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
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), u["latency_buckets"]):
                cumulative += n
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([name], buckets, u["latency_sum"])
        return req, fail, inflight, ejected, ewma, health, checks, check_fails, latency


class Exposition:
    """What the stats server answers.  One per stats-server process."""

    def __init__(self, stats, cmdline: list[str] | None = None):
        self.stats = stats
        self.cmdline = list(cmdline if cmdline is not None else sys.argv)
        self.own = {"expvarHandlerCalls": 0, "prometheusHandlerCalls": 0, "expvarRegexpErrors": 0}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(stats))

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
            compat.append(f"# TYPE {name} counter\n{name} {value}\n")
        return "".join(compat).encode() + generate_latest(self.registry)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
