"""Addresses and the client allow-list.

`parse_address` turns ``host:port``, ``[v6]:port``, ``:port`` or a unix socket
path into an `Address`; `AllowList` answers "may this peer connect?" for
-inAllowIP.  Pure functions: nothing here opens a socket.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP ``host:port`` (host "" = all interfaces; IPv6 without brackets), a
    unix socket ``path`` (``@name`` is a Linux abstract socket), or an SRV name
    (``_service._proto.name`` in ``host``: -out only, resolved, never dialled)."""

    kind: str                   # "tcp", "unix" or "srv"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.path
        if self.kind == "srv":
            return self.host
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_ipv6(self) -> bool:
        return self.kind == "tcp" and ":" in self.host

    def sockaddr(self) -> str | tuple[str, int]:
        """What socket.bind()/connect() take: (host, port) or the path
        (an abstract ``@name`` becomes ``\\0name``)."""
        if self.kind == "unix":
            return "\0" + self.path[1:] if self.path.startswith("@") else self.path
        return (self.host, self.port)


def parse_address(text: str, kind_hint: str, *, allow_port0: bool = False,
                  allow_srv: bool = False) -> Address:
    """Parse one address.  ``kind_hint`` is the -inType/-outType: "unix" means a
    path (a ``unix:`` prefix is accepted), anything else ``host:port``.
    ``allow_port0`` allows port 0 (listening on a free port); ``allow_srv`` an
    SRV name ``_service._proto.name`` without a port.  Raises ValueError."""
    if kind_hint == "unix":
        path = text[len("unix:"):] if text.startswith("unix:") else text
        if not path or path == "@":
            raise ValueError(f"empty unix socket path in {text!r}")
        if "\0" in path:
            raise ValueError(f"NUL byte in unix socket path {text!r}")
        return Address("unix", path=path)
    if allow_srv and text.startswith("_") and ":" not in text:
        if not is_srv_name(text):
            raise ValueError(f"invalid SRV name {text!r}: want _service._proto.name")
        return Address("srv", host=text)
    host, port_text = _split_host_port(text)
    return Address("tcp", host=host, port=_parse_port(port_text, text, allow_port0))


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ValueError(f"invalid address {text!r}: want [ipv6]:port")
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r} in {text!r}") from None
        return host, text[end + 2:]
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"invalid address {text!r}: missing port (want host:port)")
    if ":" in host:
        raise ValueError(f"invalid address {text!r}: put IPv6 addresses in brackets, "
                         "like [::1]:8080")
    if host and not _valid_host(host):
        raise ValueError(f"invalid host {host!r} in {text!r}")
    return host, port


def is_srv_name(text: str) -> bool:
    """``_service._proto.name``: two underscore labels, then a DNS name."""
    labels = text.rstrip(".").split(".")
    return (len(labels) >= 3 and all(label.startswith("_") and len(label) > 1
                                     for label in labels[:2])
            and _valid_host(".".join(labels[2:])) and not is_ip(".".join(labels[2:])))


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 literal (a zone ``%eth0`` allowed)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _valid_host(host: str) -> bool:
    """An IPv4 address or a DNS name (letters, digits, '-', '_', '.')."""
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return all(label and len(label) <= 63 and
               all(c.isalnum() or c in "-_" for c in label) and label.isascii()
               for label in labels)


def _parse_port(port_text: str, text: str, allow_port0: bool) -> int:
    if not port_text.isdigit():
        raise ValueError(f"invalid port {port_text!r} in {text!r}")
    port = int(port_text)
    low = 0 if allow_port0 else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} out of range {low}..65535 in {text!r}")
    return port


class AllowList:
    """-inAllowIP: comma-separated IPv4/IPv6 addresses and CIDR ranges.

    An empty list allows everyone.  IPv4-mapped IPv6 peers (``::ffff:1.2.3.4``)
    are checked as IPv4.  Answers are cached per peer address string; the cache
    is cleared when it reaches CACHE_SIZE entries, which bounds memory under a
    scan from many addresses at the cost of a re-check."""

    CACHE_SIZE = 4096

    __slots__ = ("networks", "_v4", "_v6", "_cache")

    def __init__(self, entries: str | Iterable[Network] = ""):
        networks = self.parse(entries) if isinstance(entries, str) else tuple(entries)
        self.networks: tuple[Network, ...] = networks
        self._v4 = tuple(n for n in networks if n.version == 4)
        self._v6 = tuple(n for n in networks if n.version == 6)
        self._cache: dict[str, bool] = {}

    @classmethod
    def from_networks(cls, networks: Iterable[Network]) -> "AllowList":
        """From already parsed networks (Config.in_allow_ip)."""
        return cls(tuple(networks))

    @staticmethod
    def parse(entries: str) -> tuple[Network, ...]:
        """``"10.0.0.0/8, ::1"`` → networks.  Raises ValueError naming the entry."""
        if not entries.strip():
            return ()
        networks = []
        for raw in entries.split(","):
            entry = raw.strip()
            if not entry:
                raise ValueError(f"empty entry in {entries!r}")
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"invalid IP address or CIDR range {entry!r}") from None
            networks.append(_unmap_network(net))
        return tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, ip: str) -> bool:
        """May a peer with this address (as getpeername() gives it) connect?
        An unparsable address is refused when the list is not empty."""
        if not self.networks:
            return True
        answer = self._cache.get(ip)
        if answer is None:
            answer = self._check(ip)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[ip] = answer
        return answer

    def _check(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])    # drop an IPv6 zone
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        nets = self._v4 if addr.version == 4 else self._v6
        return any(addr in n for n in nets)

    def __repr__(self) -> str:
        return f"AllowList({', '.join(map(str, self.networks))!r})"


def _unmap_network(net: Network) -> Network:
    """``::ffff:10.0.0.0/104`` → ``10.0.0.0/8`` so mapped ranges match IPv4 peers."""
    if net.version == 6 and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net
