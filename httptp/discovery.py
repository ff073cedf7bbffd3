"""Discovery: ``-out`` names and SRV records as live sets of upstreams.

Theory of operation
-------------------
An ``-out`` entry ``name:port`` whose host is not an IP literal stands for all
its A and AAAA records; ``_service._proto.name`` (an ``Address`` of kind
"srv") for the targets and ports of its SRV records, with their priority and
weight.  Each address found is an upstream of its own: its own index in the
shared name table (``httptp.stats``), listed as ``address NUL origin``, so
its own load, latency, failures and ejection in every worker's balancer.

One process resolves, never each worker: the master once at start (and for
a name a HUP adds), then the resolver helper (``run_helper``), a child of
the master like the stats one, every ``-outResolveInterval`` (capped by the
records' TTL when ``-resolver`` servers are asked directly).  It publishes a
changed set with ``Stats.assign_upstreams``, which bumps the table's
generation; workers compare that number on their heartbeat and rebuild their
upstream list (``httptp.io.pipeline.Proxy.refresh_upstreams``): a new address
takes requests at once, a removed one takes no new request, finishes what it
has and closes its pooled connections.

A lookup that fails (timeout, SERVFAIL, NXDOMAIN, no records) keeps the last
good addresses of that entry, is counted (``outResolveErrors``) and logged
once per name per minute.  At start a name that does not resolve is one
``ConfigError`` line (``-checkConfig`` too), unless ``-outResolveWait`` gives
it time.

Blocking code (``socket.getaddrinfo``, dnspython): it runs in the master
before any fork or on a HUP, and in the helper; never on a worker's hub.
dnspython is imported only when it is used (``-resolver`` or an SRV entry).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable

from httptp.errors import ConfigError
from httptp.netaddr import Address, is_ip
from httptp.stats import NAME_BYTES, ORIGIN_SEP, Stats, pack_meta

LONGEST_ADDRESS = len("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535")
MAX_ORIGIN = NAME_BYTES - LONGEST_ADDRESS - len(ORIGIN_SEP)
MIN_REFRESH = 1.0           # seconds: a TTL of 0 does not make us ask in a loop
DNS_TIMEOUT = 2.0           # seconds for one lookup (all servers of -resolver)


class ResolveError(Exception):
    """A name did not resolve; ``str()`` is the one-line reason."""


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream address and where it came from."""

    address: str                # "ip:port", "[v6]:port" or a unix path: dialable
    origin: str                 # the -out entry; == address for a plain entry
    priority: int = 0           # SRV: lower is used first
    weight: int | None = None   # SRV weight, None when not from SRV

    @property
    def table_name(self) -> str:
        return self.address if self.address == self.origin else \
            self.address + ORIGIN_SEP + self.origin

    @property
    def meta(self) -> int:
        return pack_meta(self.priority, self.weight)


def is_dynamic(address: Address) -> bool:
    """An -out entry that is resolved: SRV, or a TCP host that is not an IP."""
    return address.kind == "srv" or (address.kind == "tcp" and not is_ip(address.host))


def uses_discovery(config) -> bool:
    return any(is_dynamic(a) for a in config.upstreams)


def check_origin(address: Address) -> str:
    """Why this -out entry cannot be a table origin, or ""."""
    if is_dynamic(address) and len(str(address).encode()) > MAX_ORIGIN:
        return (f"{address}: a resolved name must be at most {MAX_ORIGIN} characters "
                "(it is stored with each of its addresses)")
    return ""


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# -- asking DNS -------------------------------------------------------------------------------

class Resolver:
    """Resolve -out entries: ``servers`` empty → the system resolver
    (getaddrinfo; SRV from resolv.conf's servers), else those (ip, port)
    servers via dnspython, with TTLs."""

    def __init__(self, servers: tuple[tuple[str, int], ...] = (), timeout: float = DNS_TIMEOUT):
        self.servers = servers
        self.timeout = timeout
        self._dns = None

    def resolve(self, address: Address) -> tuple[list[Target], float | None]:
        """(targets, TTL in seconds or None when unknown); raises ResolveError."""
        if address.kind == "srv":
            return self._srv(address.host, str(address))
        addrs, ttl = self._addresses(address.host, address.port)
        if not addrs:
            raise ResolveError("no A or AAAA records")
        return [Target(a, str(address)) for a in addrs], ttl

    def _addresses(self, host: str, port: int) -> tuple[list[str], float | None]:
        if not self.servers:
            return _getaddrinfo(host, port), None
        found, ttls = [], []
        for rdtype in ("A", "AAAA"):
            records, ttl = self._ask(host, rdtype)
            found += [format_address(r.address, port) for r in records]
            if ttl is not None:
                ttls.append(ttl)
        return sorted(set(found)), min(ttls, default=None)

    def _srv(self, name: str, origin: str) -> tuple[list[Target], float | None]:
        records, ttl = self._ask(name, "SRV")
        targets, ttls = [], [ttl] if ttl is not None else []
        for r in records:
            host = r.target.to_text(omit_final_dot=True)
            if not host or host == ".":
                continue                        # "service not available here"
            addrs, t = self._addresses(host, r.port)
            if t is not None:
                ttls.append(t)
            targets += [Target(a, origin, r.priority, r.weight) for a in addrs]
        if not targets:
            raise ResolveError("no SRV targets with addresses")
        unique = {t.address: t for t in targets}        # one upstream per address
        return sorted(unique.values(), key=lambda t: (t.priority, t.address)), min(ttls, default=None)

    def _ask(self, name: str, rdtype: str):
        """The records of one type (maybe none) and their TTL (None when none)."""
        import dns.exception
        import dns.resolver
        try:
            answer = self._dnspython().resolve(name, rdtype, raise_on_no_answer=False,
                                               lifetime=self.timeout)
        except dns.resolver.NXDOMAIN:
            raise ResolveError("no such name (NXDOMAIN)") from None
        except dns.resolver.LifetimeTimeout:
            raise ResolveError(f"no answer within {self.timeout:g} s") from None
        except dns.resolver.NoNameservers:
            raise ResolveError("no server could answer (SERVFAIL or refused)") from None
        except dns.exception.DNSException as e:
            raise ResolveError(str(e) or type(e).__name__) from None
        rrset = answer.rrset
        if rrset is None:
            return [], None
        return list(rrset), float(rrset.ttl)

    def _dnspython(self):
        if self._dns is None:
            import dns.exception
            import dns.nameserver
            import dns.resolver
            if self.servers:
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                                 for ip, port in self.servers]
            else:
                try:
                    r = dns.resolver.Resolver()     # /etc/resolv.conf
                except dns.exception.DNSException as e:
                    raise ResolveError(f"no DNS server for SRV: {e}") from None
            r.timeout = min(1.0, self.timeout)
            r.cache = None
            self._dns = r
        return self._dns


def _getaddrinfo(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ResolveError(e.strerror or str(e)) from None
    except UnicodeError:
        raise ResolveError("not a valid DNS name") from None
    found = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            found.append(format_address(sockaddr[0], sockaddr[1]))
    return sorted(set(found))


# -- the set ---------------------------------------------------------------------------------

def current_set(config, resolved: dict[str, list[Target]], room: int) -> list[Target]:
    """Every -out entry's targets in -out order (a plain entry is its own),
    at most ``room`` of them."""
    targets: list[Target] = []
    seen = set()
    for address in config.upstreams:
        entry = resolved.get(str(address), []) if is_dynamic(address) \
            else [Target(str(address), str(address))]
        for t in entry:
            if t.table_name not in seen:
                seen.add(t.table_name)
                targets.append(t)
    return targets[:room]


def publish(stats: Stats, targets: list[Target]) -> bool:
    """List ``targets`` in the shared table if that changes it; True if so."""
    wanted = {t.table_name: t.meta for t in targets}
    listed = {name: priority | (weight << 16) for _, name, priority, weight
              in stats.listed_upstreams()}
    if wanted == listed:
        return False
    stats.assign_upstreams(list(wanted), wanted)
    return True


def known_targets(stats: Stats) -> dict[str, list[Target]]:
    """What the table lists now, by -out entry (resolved entries only)."""
    from httptp.stats import split_upstream_name
    known: dict[str, list[Target]] = {}
    for _, name, priority, weight in stats.listed_upstreams():
        address, origin = split_upstream_name(name)
        if origin != address:
            known.setdefault(origin, []).append(
                Target(address, origin, priority, weight - 1 if weight else None))
    return known


def resolve_start(config, *, known: dict[str, list[Target]] | None = None,
                  log: Callable[[str], None] = lambda m: None, wait: float | None = None,
                  sleep=time.sleep, clock=time.monotonic) -> dict[str, list[Target]]:
    """Targets of every -out name, for the start or a HUP: a name in ``known``
    keeps its addresses (the helper refreshes them), the others are asked now.
    A name that does not resolve raises ConfigError (one line), after
    retrying every second for ``wait`` seconds (default ``-outResolveWait``;
    a HUP passes 0: the master must not block)."""
    known = known or {}
    wait = config.out_resolve_wait if wait is None else wait
    resolver = Resolver(config.resolver)
    result = {}
    deadline = clock() + wait
    waited = False
    for address in config.upstreams:
        origin = str(address)
        if not is_dynamic(address) or origin in result:
            continue
        if known.get(origin):
            result[origin] = known[origin]
            continue
        for _ in range(int(wait) + 2):                       # bounded: once a second
            try:
                result[origin] = resolver.resolve(address)[0]
                break
            except ResolveError as e:
                if clock() >= deadline:
                    after = f" after waiting {wait:g} s" if wait else ""
                    raise ConfigError(f"-out: {origin} does not resolve{after}: {e}") from None
                if not waited:
                    log(f"-out: {origin} does not resolve yet ({e}); waiting up to "
                        f"{wait:g} s (-outResolveWait)")
                    waited = True
                sleep(min(1.0, max(0.0, deadline - clock())))
        else:
            raise ConfigError(f"-out: {origin} does not resolve")
    return result


# -- the resolver helper ------------------------------------------------------------------------

def run_helper(stats: Stats, config, log: Callable[[str], None], *,
               sleep=time.sleep, clock=time.monotonic, rounds: int | None = None) -> int:
    """The resolver helper's loop (forever, or ``rounds`` passes in tests):
    resolve each -out name when due, publish the set when it changed."""
    from httptp.logs import RateLimitedLog
    resolver = Resolver(config.resolver)
    failures = RateLimitedLog(log)
    resolved = known_targets(stats)
    names = {str(a): a for a in config.upstreams if is_dynamic(a)}
    due = {origin: clock() if origin not in resolved else clock() + config.out_resolve_interval
           for origin in names}
    room = stats.max_upstreams
    warned_room = False
    count = 0
    while rounds is None or count < rounds:
        count += 1
        for origin, address in names.items():
            if clock() < due[origin]:
                continue
            due[origin] = clock() + _next_wait(config, _refresh(
                resolver, stats, failures, resolved, origin, address))
        targets = current_set(config, resolved, min(room, config.out_max_addrs))
        if publish(stats, targets):
            log(f"upstreams now: {describe(targets)}")
        wanted = sum(len(resolved.get(o, [])) for o in names)
        if wanted > len(targets) and not warned_room:
            log(f"-outMaxAddrs: {len(targets)} addresses listed, more resolved; "
                "raise -outMaxAddrs to use them all")
            warned_room = True
        failures.flush()
        sleep(max(0.05, min(min(due.values(), default=clock() + 1.0) - clock(), 1.0)))
    return 0


def _refresh(resolver: Resolver, stats: Stats, failures, resolved: dict, origin: str,
             address: Address) -> float | None:
    """Resolve one entry into ``resolved``; its TTL, or None."""
    try:
        targets, ttl = resolver.resolve(address)
    except ResolveError as e:
        stats.incr_resolve_errors()
        kept = len(resolved.get(origin, []))
        failures.say(("resolve", origin),
                     f"-out {origin}: cannot resolve: {e}; keeping its last {kept} address(es)")
        return None
    resolved[origin] = targets
    return ttl


def _next_wait(config, ttl: float | None) -> float:
    if ttl is None:
        return config.out_resolve_interval
    return min(config.out_resolve_interval, max(ttl, MIN_REFRESH))


def describe(targets: list[Target], most: int = 10) -> str:
    """The set for a log line: the first ``most`` upstreams, then a count."""
    shown = ", ".join(_short(t) for t in targets[:most])
    return shown + (f" and {len(targets) - most} more" if len(targets) > most else "")


def _short(t: Target) -> str:
    return t.address if t.address == t.origin else f"{t.address} ({t.origin})"
