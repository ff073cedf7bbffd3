"""THE option table: every flag of httptp is declared here, once.

Each `Setting` names a flag as the Go original spells it (``outTimeout``), how its
text is parsed, its default as the original prints it, the help text, and
whether a HUP can change it.  Everything else is derived from this table:

- the command-line parser (``-flag value``, ``-flag=value``, ``--flag``...),
- the config-file keys (the flag name without the dash),
- the environment names (``HTTPTP_`` + upper snake case: ``HTTPTP_OUT_TIMEOUT``),
- the ``-help`` text and ``docs/settings.md``
  (``python -m httptp.settings --markdown > docs/settings.md``; a test compares them),
- the snake_case field names of `httptp.config.Config`.

Parsers here check one value at a time; rules that tie several flags together
(addresses by type, certificate/key counts) live in `httptp.config`.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from httptp import cpus, netaddr
from httptp.teleport import codecs as _codecs

ENV_PREFIX = "HTTPTP_"
PROG = "httptp"


# ---------------------------------------------------------------------------
# Value parsers: text in, value out, ValueError with a short message.

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
                   "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# "ms" before "m" and "s" so that "1ms" is one millisecond, as in Go.
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration (``3s``, ``1m30s``, ``500us``, ``1.5s``, ``0``) → seconds.

    A bare number other than 0 is an error, as with Go's time.ParseDuration.
    Negative durations are refused: no flag of ours has a use for them."""
    s = text.strip()
    if s.startswith("+"):
        s = s[1:]
    if s.startswith("-"):
        if s[1:] == "0":
            return 0.0
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("invalid duration '': want e.g. 3s, 500ms, 1m30s")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            hint = "missing unit (ns, us, ms, s, m, h)" if s.replace(".", "").isdigit() \
                else "want e.g. 3s, 500ms, 1m30s"
            raise ValueError(f"invalid duration {text!r}: {hint}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """Seconds → a short Go-style duration (for messages and docs)."""
    if seconds == 0:
        return "0"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"


_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool: 1 0 t f T F true false TRUE FALSE True False."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}: want true or false")


def _parse_int_text(text: str) -> int:
    s = text.strip()
    try:
        return int(s, 10)
    except ValueError:
        pass
    try:
        return int(s, 0)            # 0x10, 0o20, 1_000 as Go's flag package allows
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _parse_int_text(text)
        if value < minimum:
            word = "negative" if minimum == 0 else f"less than {minimum}"
            raise ValueError(f"{value} must not be {word}")
        return value
    return parse


def int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    at_least = int_at_least(minimum)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > maximum:
            raise ValueError(f"{value} must not be more than {maximum}")
        return value
    return parse


def size_or_default(default: int) -> Callable[[str], int]:
    """A byte size; 0 means the default, as fasthttp treats 0 in the original."""
    at_least_0 = int_at_least(0)

    def parse(text: str) -> int:
        return at_least_0(text) or default
    return parse


def positive_duration(text: str) -> float:
    """A duration that must be longer than 0 (a timeout of 0 would fail everything)."""
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be longer than 0")
    return value


def choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise ValueError(f"unknown value {text!r}: want one of {', '.join(names)}")
        return text
    parse.choices = names           # type: ignore[attr-defined]  (shown by -help and docs)
    return parse


def parse_level(text: str) -> int | str | None:
    """A compression level: "" (the codec's default), ``auto`` or an integer;
    its range is the codec's, checked in httptp.config."""
    s = text.strip()
    if not s:
        return None
    if s == _codecs.AUTO:
        return s
    try:
        return int(s, 10)
    except ValueError:
        raise ValueError(f"invalid level {text!r}: want a number, auto, or empty for the "
                         "codec's default") from None


def parse_string(text: str) -> str:
    return text


def parse_workers(text: str) -> int:
    """``auto`` → the CPUs this process may use (affinity, cgroup quota:
    httptp.cpus); otherwise an integer of at least 1."""
    if text.strip() == "auto":
        return cpus.available_cpus()
    return int_at_least(1)(text)


def comma_list(text: str) -> tuple[str, ...]:
    """``a, b`` → ("a", "b"); "" → (); an empty entry is an error."""
    if not text.strip():
        return ()
    items = tuple(part.strip() for part in text.split(","))
    if "" in items:
        raise ValueError(f"empty entry in the list {text!r}")
    return items


def parse_resolvers(text: str) -> tuple[tuple[str, int], ...]:
    """-resolver: ``ip``, ``ip:port`` or ``[v6]:port``, comma-separated → ((ip, port), ...)."""
    servers = []
    for item in comma_list(text):
        host, port = item, 53
        if item.startswith("[") or item.count(":") == 1:
            address = netaddr.parse_address(item, "tcp")
            host, port = address.host, address.port
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address (a DNS server is given by "
                             "address, like 10.0.0.2:53)") from None
        servers.append((host, port))
    return tuple(servers)


def parse_allow_ip(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return netaddr.AllowList.parse(text)


def parse_regexp(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise ValueError(f"invalid regexp {text!r}: {e}") from None
    return text


_HEALTH_PATH = re.compile(r"/[!-~]*")     # visible ASCII: a request-target in origin-form


def parse_health_path(text: str) -> str:
    """"" (checks off) or an origin-form path such as ``/healthz?full=1``."""
    if text and (not _HEALTH_PATH.fullmatch(text) or len(text) > 1024):
        raise ValueError(f"invalid health check path {text[:60]!r}: want a path starting "
                         "with / (visible ASCII, no spaces), or empty for no checks")
    return text


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_header_name(text: str) -> str:
    if text and not _TOKEN.fullmatch(text):
        raise ValueError(f"invalid header name {text!r}")
    return text


# ---------------------------------------------------------------------------
# The table.

class AddrType(NamedTuple):
    """What an -inType/-outType value means; code asks this table, never the name."""

    name: str
    teleport: bool      # the teleport protocol (else HTTP/1.1)
    tls: bool           # over TLS


ADDR_TYPE = {t.name: t for t in (
    AddrType("http", False, False),
    AddrType("https", False, True),
    AddrType("unix", False, False),
    AddrType("teleport", True, False),
    AddrType("teleports", True, True),
)}
ADDR_TYPES = tuple(ADDR_TYPE)
CODECS = _codecs.NAMES          # none, flate, snappy, zstd, brotli: one registry
_OURS_ONLY = " and ".join(c.name for c in _codecs.REGISTRY if not c.go)
_LEVEL_DEFAULTS = ", ".join(f"{c.name} {c.default_level}" for c in _codecs.REGISTRY if c.levels)
_AUTO_BOUNDS = "auto stays within " + ", ".join(
    f"{c.name} {c.auto_levels[0]}-{c.auto_levels[1]}" for c in _codecs.REGISTRY if c.auto_levels)
SECTIONS = ("Listener", "Upstream", "Limits", "Teleport", "TLS", "Process", "Stats")


def _snake(name: str) -> str:
    """outTimeout → out_timeout, inTLSCert → in_tls_cert, clientIPHeader → client_ip_header."""
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return s.lower()


@dataclass(frozen=True, slots=True)
class Setting:
    """One flag.  ``default`` is the text the original shows and is parsed like any
    other value.  ``help`` may have several lines: the first is the -help line,
    all of it goes into docs/settings.md."""

    name: str                               # Go flag name, without the dash
    parse: Callable[[str], Any]
    default: str
    help: str
    section: str
    meta: str = "string"                    # shown after the flag by -help: duration, int...
    reloadable: bool = True                 # can a HUP change it (new workers pick it up)
    implemented: bool = True                # False: only the default works yet (see config)
    refuse: bool = True                     # when not implemented: refuse (True) or ignore
    not_yet: tuple[str, ...] = ()           # values of an implemented flag that do not work yet
    ours: bool = False                      # not a flag of the Go original
    in_file: bool = True                    # may be set in the config file
    field: str = ""                         # Config field; "" → snake_case of name
    env: str | None = ""                    # "" → HTTPTP_ + upper snake case; None → no env

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", _snake(self.name))
        if self.env == "":
            object.__setattr__(self, "env", ENV_PREFIX + _snake(self.name).upper())

    @property
    def flag(self) -> str:
        return "-" + self.name

    @property
    def is_bool(self) -> bool:
        return self.parse is parse_bool

    @property
    def choices(self) -> tuple[str, ...]:
        return getattr(self.parse, "choices", ())

    @property
    def summary(self) -> str:
        return self.help.strip().splitlines()[0]


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # -- Listener ------------------------------------------------------------
    S("in", parse_string, "127.0.0.1:8080", section="Listener", reloadable=False, field="in_addr",
      help="Address to listen to for incoming requests: host:port, [v6]:port, :port, "
           "or a socket path for -inType=unix\n"
           "Port 0 picks a free port. Unlike the original (tcp4 only), IPv6 addresses work."),
    S("inType", choice(*ADDR_TYPES), "http", section="Listener", reloadable=False,
      help="Type of the listener: " + ", ".join(ADDR_TYPES)),
    S("reusePort", parse_bool, "false", section="Listener", reloadable=False, meta="bool",
      help="Let other processes (another httptp) listen on the same TCP port (SO_REUSEPORT)\n"
           "httptp always uses SO_REUSEPORT for its own per-worker sockets; without this flag "
           "it first checks that nobody else listens on -in. Ignored for unix sockets."),
    S("inAllowIP", parse_allow_ip, "", section="Listener", meta="list",
      help="Comma-separated IPv4/IPv6 addresses or CIDR ranges allowed to connect; "
           "empty allows everyone\n"
           "Checked at accept, before TLS. IPv4-mapped IPv6 peers (::ffff:1.2.3.4) match "
           "IPv4 entries. Unix-socket peers are never blocked. The original takes only exact "
           "IPv4 addresses."),
    S("clientIPHeader", parse_header_name, "", section="Listener",
      help="Header set (replaced) to the client's IP address in requests sent upstream, "
           "X-Forwarded-For appended to; empty sets none\n"
           "Only for http, https and unix listeners. Unix peers are reported as 0.0.0.0. "
           "X-Forwarded-For is a list: the client's address goes after the values the "
           "request came with, in one field (nginx's $proxy_add_x_forwarded_for); the Go "
           "original replaced it like any other name."),
    S("forwardedProto", parse_bool, "true", section="Listener", meta="bool", ours=True,
      help="Set X-Forwarded-Proto (http or https) in requests sent upstream\n"
           "Only for http and https listeners; what a client sent under that name is "
           "replaced. A unix listener (behind a local proxy that knows the scheme) and a "
           "teleport listener (the first hop set it) pass on what they received."),
    S("requestIDHeader", parse_header_name, "X-Request-Id", section="Listener", ours=True,
      help="Header of the request id: taken from the request when valid, else generated; "
           "sent upstream and logged; empty turns it off\n"
           "A valid id is 1 to 128 characters of A-Z a-z 0-9 and ._:+/=@-; any other value "
           "is replaced. Generated ids are a random per-worker prefix and a counter. The id "
           "crosses teleport links as the header it is, and is request_id in the access log."),
    S("inHeaderTimeout", positive_duration, "10s", section="Listener",
      meta="duration", ours=True,
      help="The whole request header must arrive within this time, or the client gets 408"),
    S("inIdleTimeout", positive_duration, "60s", section="Listener",
      meta="duration", ours=True,
      help="An idle keep-alive client connection is closed after this time"),
    # -- Upstream ------------------------------------------------------------
    S("out", parse_string, "127.0.0.1:8043", section="Upstream", meta="list",
      help="Comma-separated upstream addresses (host:port, [v6]:port, or socket paths "
           "for -outType=unix) to balance requests over\n"
           "A host that is a DNS name stands for all its A and AAAA records, each an upstream "
           "of its own, resolved again every -outResolveInterval; _service._proto.name (no "
           "port) for its SRV records (docs/operations.md, Discovery)."),
    S("outType", choice(*ADDR_TYPES), "teleport", section="Upstream",
      help="Type of the upstreams: " + ", ".join(ADDR_TYPES)),
    S("outTimeout", positive_duration, "3s", section="Upstream",
      meta="duration",
      help="Deadline for each request sent upstream; after it the client gets 504\n"
           "It bounds the wait for the response head, then (http upstreams, whose bodies "
           "stream) each wait for more of the body, as nginx's proxy_read_timeout; a "
           "client that reads slowly does not count. Past the head a timeout cuts the "
           "client connection: the 504 can no longer be sent."),
    S("outMaxFails", int_at_least(1), "3", section="Upstream", meta="int", ours=True,
      help="Failures in a row that eject an upstream from the balancer\n"
           "Counted over all workers; a failure older than -outFailTimeout starts the "
           "count again (as nginx's max_fails within fail_timeout)."),
    S("outFailTimeout", positive_duration, "5s", section="Upstream",
      meta="duration", ours=True,
      help="How long an ejected upstream rests before a single probe request is sent to it"),
    S("outIdleTimeout", positive_duration, "10s", section="Upstream",
      meta="duration", ours=True,
      help="A pooled idle upstream connection is closed after this time"),
    S("outHealthCheck", parse_health_path, "", section="Upstream", meta="path", ours=True,
      help="Path of the active health checks (GET /path to every upstream, from one "
           "process); empty: no active checks\n"
           "A 2xx or 3xx answer is good; anything else, or no answer within "
           "-outHealthCheckTimeout, is bad. An upstream marked down gets no client request, "
           "and only the checks bring it back (no client request is ever a probe). Teleport "
           "upstreams get a teleport request for the path. See docs/operations.md."),
    S("outHealthCheckInterval", positive_duration, "5s", section="Upstream",
      meta="duration", ours=True,
      help="Time between two health checks of an upstream"),
    S("outHealthCheckTimeout", positive_duration, "2s", section="Upstream",
      meta="duration", ours=True,
      help="A health check with no full answer head within this time fails"),
    S("outHealthCheckRise", int_at_least(1), "2", section="Upstream", meta="int", ours=True,
      help="Good checks in a row that bring a down upstream back up (HAProxy's rise)"),
    S("outHealthCheckFall", int_at_least(1), "3", section="Upstream", meta="int", ours=True,
      help="Failed checks in a row that mark an up upstream down (HAProxy's fall)"),
    # -- Discovery (docs/operations.md "Discovery") -------------------------
    S("outResolveInterval", positive_duration, "10s", section="Upstream",
      meta="duration", ours=True,
      help="How often -out names and SRV records are resolved again\n"
           "An -out host that is not an IP address stands for all its A and AAAA records, "
           "each its own upstream; _service._proto.name (no port) for its SRV records. "
           "With -resolver the interval is also capped by the records' TTL."),
    S("resolver", parse_resolvers, "", section="Upstream", meta="list", ours=True,
      help="DNS servers (ip or ip:port, comma-separated) asked for -out names, with TTLs\n"
           "Empty: the system resolver (getaddrinfo: /etc/hosts and resolv.conf; SRV "
           "records from the resolv.conf servers)."),
    S("outMaxAddrs", int_between(1, 4096), "256", section="Upstream", meta="int", ours=True,
      reloadable=False,
      help="Room for upstream addresses in the shared table (all -out entries, "
           "resolved names included)\n"
           "At most 4096. Addresses beyond it are left out and logged; addresses that left "
           "the set keep their entry until the room is needed. Each worker's shared "
           "memory holds 256 bytes per entry."),
    S("outResolveWait", parse_duration, "0s", section="Upstream", meta="duration", ours=True,
      help="At start, wait up to this long for -out names to resolve\n"
           "0: a name that does not resolve stops the start (and -checkConfig) at once; "
           "longer suits containers that start before their upstreams."),
    # -- Limits --------------------------------------------------------------
    S("concurrency", int_at_least(1), "100000", section="Limits", meta="int",
      help="Maximum number of concurrent client connections (http) or requests (teleport)\n"
           "Also caps the connections to each upstream at "
           "ceil(concurrency / number of upstreams)."),
    S("inMaxBodySize", size_or_default(4194304), "4194304", section="Limits", meta="int",
      help="Maximum request body size in bytes; 0 means the default\n"
           "Over it: 413. On teleport listeners too: a body with a Content-Length is "
           "skipped and its request answered 413; any other (chunked) body closes the "
           "connection."),
    S("inMaxHeaderSize", size_or_default(4096), "4096", section="Limits", meta="int",
      help="Maximum request header size in bytes; 0 means the default\n"
           "Over it: 431 (http), or the teleport connection is closed."),
    S("outMaxHeaderSize", size_or_default(4096), "4096", section="Limits", meta="int",
      help="Maximum upstream response header size in bytes; 0 means the default\n"
           "Over it: 502 for the client, and the upstream connection is closed."),
    S("outMaxBodySize", size_or_default(67108864), "67108864", section="Limits", meta="int",
      ours=True,
      help="Maximum upstream response body size in bytes; 0 means the default\n"
           "Over it: 502 for the client, and the upstream connection is closed (a "
           "teleport connection is redialled). An http response streams to an http "
           "client: one over the limit found after its head went out cuts the client "
           "connection. Raise it to proxy bigger downloads: streaming holds a few "
           "buffers per connection, not the body."),
    S("inGetOnly", parse_bool, "false", section="Limits", meta="bool",
      help="Refuse every request method but GET (http listeners)"),
    # -- Teleport ------------------------------------------------------------
    S("inCompress", choice("auto", *CODECS), "flate", section="Teleport",
      help="Compression of responses sent to teleport clients: auto, " + ", ".join(CODECS) + "\n"
           "auto answers in the client's codec. " + _OURS_ONLY + " work only between two "
           "httptp of ours."),
    S("outCompress", choice(*CODECS), "flate", section="Teleport",
      help="Compression of requests sent to teleport upstreams: " + ", ".join(CODECS)),
    S("inCompressLevel", parse_level, "", section="Teleport", meta="level", ours=True,
      help="Compression level of responses sent to teleport clients: a number, auto, or "
           "empty for the codec's default\n"
           "Ranges: " + _codecs.level_ranges() + "; defaults: " + _LEVEL_DEFAULTS + ". "
           "none and snappy have no levels, and a number needs a fixed -inCompress. auto "
           "follows the link: per connection it moves one step a second, up while the "
           "writer keeps up and compressing takes under half the worker's CPU, down when "
           "the writer falls behind or the CPU saturates (" + _AUTO_BOUNDS + "; brotli "
           "keeps its default level for the connection's life). A level changes nothing "
           "on the wire: every peer, the Go original included, reads any level. "
           "See docs/teleport.md."),
    S("outCompressLevel", parse_level, "", section="Teleport", meta="level", ours=True,
      help="Compression level of requests sent to teleport upstreams: a number, auto, or "
           "empty for the codec's default\n"
           "As -inCompressLevel, for -outCompress."),
    S("inDelay", parse_duration, "0", section="Teleport", meta="duration",
      help="How long a teleport listener may wait to batch responses into one write"),
    S("outDelay", parse_duration, "0", section="Teleport", meta="duration",
      help="How long a teleport client may wait to batch requests into one write"),
    S("outConnsPerAddr", int_at_least(1), "1", section="Teleport", meta="int",
      help="Number of teleport connections to each upstream address\n"
           "The original opened one connection whatever this said; httptp opens N."),
    # -- TLS -----------------------------------------------------------------
    S("inTLSCert", comma_list, "", section="TLS", meta="list",
      help="Comma-separated TLS certificate files for https/teleports listeners, "
           "chosen by SNI\n"
           "Must pair up with -inTLSKey. Empty with -inType=https turns on autocert."),
    S("inTLSKey", comma_list, "", section="TLS", meta="list",
      help="Comma-separated TLS key files, one for each -inTLSCert"),
    S("inTLSSessionTicketKey", parse_string, "", section="TLS",
      help="Secret for TLS session tickets (its SHA-256 is the key); empty picks a random one\n"
           "Set it to let sessions resume across workers and restarts."),
    S("inTLSAllowPlaintext", parse_bool, "false", section="TLS", meta="bool", ours=True,
      help="Let a teleports listener also accept teleport clients that do not ask for TLS\n"
           "The original always accepted them; httptp refuses them unless this is set."),
    S("outTLSCA", parse_string, "", section="TLS", meta="file", ours=True,
      field="out_tls_ca", env="HTTPTP_OUT_TLS_CA",
      help="PEM file of CA certificates that upstream certificates (https, teleports) must "
           "chain to; empty uses the system roots\n"
           "When given, only these CAs are trusted (the system roots are not)."),
    S("outTLSServerName", parse_string, "", section="TLS", ours=True,
      help="Name to send as SNI and to verify upstream certificates against; empty uses the "
           "host of each -out address"),
    S("outTLSInsecure", parse_bool, "false", section="TLS", meta="bool", ours=True,
      help="Do not verify upstream certificates (testing only: logged as a warning)"),
    S("outTLSCert", parse_string, "", section="TLS", meta="file", ours=True,
      help="Client certificate file presented to https/teleports upstreams (mutual TLS)"),
    S("outTLSKey", parse_string, "", section="TLS", meta="file", ours=True,
      help="Key file of -outTLSCert"),
    S("inTLSClientCA", parse_string, "", section="TLS", meta="file", ours=True,
      field="in_tls_client_ca", env="HTTPTP_IN_TLS_CLIENT_CA",
      help="PEM file of CA certificates: https/teleports listeners then require client "
           "certificates signed by them (mutual TLS); empty asks for none"),
    S("autocertCacheDir", parse_string, "autocert-cache", section="TLS",
      help="Directory where Let's Encrypt certificates are kept (autocert)"),
    S("autocertHostRegexp", parse_regexp, "^.*$", section="TLS",
      help="Regexp the SNI host name must match to get an autocert certificate"),
    S("autocertHTTPAddr", parse_string, ":80", section="TLS", ours=True, reloadable=False,
      help="Address answering ACME HTTP-01 challenges when autocert is on (other GET and "
           "HEAD requests are redirected to https, other methods get 400); "
           "empty disables HTTP-01"),
    S("autocertDirectory", parse_string, "https://acme-v02.api.letsencrypt.org/directory",
      section="TLS", ours=True,
      help="ACME directory URL of the certificate authority"),
    S("autocertDirectoryCA", parse_string, "", section="TLS", meta="file", ours=True,
      help="PEM file of CA certificates to trust for the ACME directory (a private or test CA)"),
    S("autocertEmail", parse_string, "", section="TLS", ours=True,
      help="Contact e-mail for the ACME account; empty registers without one"),
    S("autocertRenewBefore", positive_duration, "720h", section="TLS", meta="duration",
      ours=True,
      help="Renew an autocert certificate when it expires within this time"),
    # -- Process -------------------------------------------------------------
    S("workers", parse_workers, "auto", section="Process", meta="int", ours=True,
      help="Number of worker processes; auto is the number of CPUs this process may use\n"
           "auto counts the CPUs of the affinity mask (taskset, CPUAffinity=), lowered to "
           "the cgroup v2 cpu.max quota (a container's CPU limit) rounded up."),
    S("gracefulTimeout", parse_duration, "30s", section="Process", meta="duration",
      ours=True,
      help="On TERM, INT or HUP, how long workers may finish in-flight requests "
           "before they are killed"),
    S("httpParser", choice("auto", "httptools", "h11"), "auto", section="Process", ours=True,
      help="HTTP/1.1 parser: auto, httptools, h11 (auto: httptools when installed)"),
    S("logAllErrors", parse_bool, "false", section="Process", meta="bool",
      help="Log every error met while serving clients, not only unexpected ones"),
    S("accessLog", parse_string, "", section="Process", meta="file", ours=True,
      help="Access log file, one line per request (- is stderr); empty turns it off\n"
           "nginx's combined format, then key=value fields (request_time, request_id...: "
           "docs/operations.md), or JSON with -logFormat=json. USR1 reopens it (logrotate)."),
    S("logFormat", choice("text", "json"), "text", section="Process", ours=True,
      help="Format of the error log (stderr) and the access log: text or json"),
    S("config", parse_string, "", section="Process", ours=True, in_file=False,
      reloadable=False, field="config_file", meta="file",
      help="Config file with lines 'flagName = value' (see docs/config-file.md)"),
    S("checkConfig", parse_bool, "false", section="Process", meta="bool", ours=True,
      in_file=False, env=None, field="check_config", reloadable=False,
      help="Check the configuration, print 'configuration OK' and exit"),
    # -- Stats ---------------------------------------------------------------
    S("expvarAddr", parse_string, "localhost:8040", section="Stats", reloadable=False,
      help="Address of the stats server (/expvar, /prometheus or /metrics, /healthz, "
           "status page /); "
           "empty disables it"),
)
del S

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}
FILE_KEYS: frozenset[str] = frozenset(s.name for s in SETTINGS if s.in_file)
# Settings that are read by the CLI only and are not Config fields.
CLI_ONLY: frozenset[str] = frozenset({"checkConfig"})


# ---------------------------------------------------------------------------
# Command line.

class HelpRequested(Exception):
    """-h, -help or --help was given: print `help_text()` and exit 0."""


class VersionRequested(Exception):
    """-version or --version was given: print the version and exit 0."""


class ArgvError(ValueError):
    """A command-line problem; the message starts with the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):          # never print usage and exit: raise instead
        m = re.match(r"argument (-[^/ :]+)(?:/\S+)?: (.*)", message)
        if m:
            raise ArgvError(f"{m.group(1)}: {m.group(2)}")
        raise ArgvError(message)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with ``-flag`` and ``--flag`` for every setting.

    Every default is SUPPRESS: the result holds only what the command line set,
    as raw text, so precedence and parsing happen in one place (parse_argv)."""
    parser = _Parser(prog=PROG, add_help=False, allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    for s in SETTINGS:
        if s.is_bool:   # Go-style: -flag alone means true; -flag=false works
            parser.add_argument(s.flag, "--" + s.name, dest=s.name, nargs="?", const="true")
        else:
            parser.add_argument(s.flag, "--" + s.name, dest=s.name)
    return parser


HELP_FLAGS = ("-h", "-help", "--help", "--h")
VERSION_FLAGS = ("-version", "--version")


def _looks_like_flag(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1 and not re.fullmatch(r"-\d+(\.\d*)?", arg)


def parse_argv(argv: list[str]) -> dict[str, str]:
    """Command-line arguments → {flag name: raw text} for the flags given.

    Raises HelpRequested, VersionRequested, or ArgvError naming the flag."""
    known = {f"{dashes}{s.name}": s for s in SETTINGS for dashes in ("-", "--")}
    wants_value = False             # the previous argument was "-flag" needing a value
    for arg in argv:
        if arg == "--":
            break
        if arg in HELP_FLAGS:
            raise HelpRequested()
        if arg in VERSION_FLAGS:
            raise VersionRequested()
        name = arg.split("=", 1)[0]
        # Python 3.11's argparse accepts single-dash prefixes (-inT for -inType)
        # even with allow_abbrev=False (fixed in 3.12), so check names ourselves.
        if _looks_like_flag(arg) and name not in known and not wants_value:
            raise ArgvError(f"{name}: flag provided but not defined")
        wants_value = arg in known and not known[arg].is_bool
    namespace, rest = build_parser().parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    if rest:
        raise ArgvError(f"unexpected argument {rest[0]!r}")
    return dict(vars(namespace))


# ---------------------------------------------------------------------------
# -help and docs/settings.md.

def _shown_default(s: Setting) -> str:
    if s.is_bool:
        return s.default
    if s.meta in ("int", "duration"):
        return s.default
    return f'"{s.default}"'


def help_text() -> str:
    """Go-flag-style help: every flag, its value kind, first help line, default."""
    lines = [f"Usage of {PROG}: {PROG} [flags]",
             "Flags may be written -flag value, -flag=value, --flag or --flag=value; "
             "also set by HTTPTP_FLAG_NAME environment variables or a -config file.",
             "A HUP (reload) applies a change to any flag but those marked [restart].", ""]
    for section in SECTIONS:
        lines.append(f"{section}:")
        for s in (s for s in SETTINGS if s.section == section):
            lines.append(f"  -{s.name}" + ("" if s.is_bool else f" {s.meta}"))
            note = "" if s.implemented or not s.refuse else " [not implemented yet]"
            if not s.reloadable and s.name not in CLI_ONLY:
                note += " [restart]"
            lines.append(f"        {s.summary} (default {_shown_default(s)}){note}")
        lines.append("")
    lines.append("  -help")
    lines.append("        Print this help and exit")
    lines.append("  -version")
    lines.append("        Print the version and exit")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The text of docs/settings.md."""
    out = ["# httptp settings", "",
           "<!-- Generated file: edit httptp/settings.py instead, then run",
           "     python -m httptp.settings --markdown > docs/settings.md -->", "",
           "Every setting is a command-line flag (`-name value`, `-name=value`, `--name`, "
           "`--name=value`), an environment variable, and a key of the `-config` file "
           "(see [config-file.md](config-file.md)). Precedence: command line, then "
           "environment, then config file, then the default. Durations are Go durations "
           "(`3s`, `500ms`, `1m30s`, `0`); booleans are `true`/`false` (also `1`/`0`, `t`/`f`).",
           "", "*Reload*: whether a HUP applies a change (new workers start with it); "
           "the others need a restart. *Status*: *refused* means only the default works in "
           "this version; *ignored* means the value is accepted but not used yet; *not yet* "
           "lists values that are refused.", ""]
    for section in SECTIONS:
        out += [f"## {section}", ""]
        for s in (s for s in SETTINGS if s.section == section):
            out += [f"### `-{s.name}`", ""]
            first, *rest = [line.strip() for line in s.help.strip().splitlines()]
            out += [first, ""] + ([" ".join(rest), ""] if rest else [])
            status = "implemented"
            if not s.implemented:
                status = "refused (only the default works)" if s.refuse else "ignored (accepted)"
            elif s.not_yet:
                status = "not yet: " + ", ".join(f"`{v}`" for v in s.not_yet)
            out += [
                "| | |", "|---|---|",
                f"| Type | {s.meta}" + (": " + ", ".join(f"`{c}`" for c in s.choices)
                                        if s.choices else "") + " |",
                f"| Default | `{_md_cell(s.default)}` |" if s.default else "| Default | empty |",
                f"| Environment | `{s.env}` |" if s.env else "| Environment | — |",
                f"| Config file | `{s.name} = ...` |" if s.in_file else "| Config file | — |",
                f"| Reload | {'yes' if s.reloadable else 'restart'} |",
                f"| Status | {status} |",
                f"| Origin | {'httptp' if s.ours else 'Go original'} |",
                "",
            ]
    return "\n".join(out)


def example_config() -> str:
    """The text of deploy/httptp.conf.example: every key, commented out at its default."""
    out = ["# httptp configuration file (httptp -config=/etc/httptp/httptp.conf)",
           "# Generated from httptp/settings.py: python -m httptp.settings --example",
           "# Every key is shown commented out at its default; uncomment what you change.",
           "# Format: docs/config-file.md; every key: docs/settings.md.", ""]
    section = None
    for s in SETTINGS:
        if not s.in_file:
            continue
        if s.section != section:
            section = s.section
            out += ["", f"# --- {section} " + "-" * max(3, 60 - len(section))]
        out.append(f"# {s.summary}")
        out.append(f"#{s.name} = {s.default}".rstrip())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown())
    elif sys.argv[1:] == ["--example"]:
        sys.stdout.write(example_config())
    else:
        sys.stdout.write(help_text())
