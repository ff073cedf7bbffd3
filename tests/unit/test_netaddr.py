import ipaddress

import pytest

from httptp.netaddr import Address, AllowList, parse_address


@pytest.mark.parametrize("text, host, port, shown", [
    ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
    (":8080", "", 8080, ":8080"),
    ("localhost:80", "localhost", 80, "localhost:80"),
    ("backend-1.example.com:443", "backend-1.example.com", 443, "backend-1.example.com:443"),
    ("[::1]:8080", "::1", 8080, "[::1]:8080"),
    ("[::]:1", "::", 1, "[::]:1"),
    ("[2001:db8::1]:65535", "2001:db8::1", 65535, "[2001:db8::1]:65535"),
    ("[fe80::1%eth0]:80", "fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
])
def test_tcp_addresses(text, host, port, shown):
    a = parse_address(text, "http")
    assert (a.kind, a.host, a.port) == ("tcp", host, port)
    assert str(a) == shown
    assert a.sockaddr() == (host, port)
    assert parse_address(shown, "teleport") == a


def test_ipv6_flag():
    assert parse_address("[::1]:80", "http").is_ipv6
    assert not parse_address("1.2.3.4:80", "http").is_ipv6


@pytest.mark.parametrize("text", [
    "127.0.0.1", "::1:8080", "[::1]8080", "[::1]", "[zz::1]:80", "host:", "host:abc",
    "host:-1", "host:65536", "host:0", "", "bad host:80", "a..b:80", "[::1:80",
])
def test_bad_tcp_addresses(text):
    with pytest.raises(ValueError):
        parse_address(text, "http")


def test_port0_only_when_listening():
    with pytest.raises(ValueError, match="out of range 1..65535"):
        parse_address("127.0.0.1:0", "http")
    assert parse_address("127.0.0.1:0", "http", allow_port0=True).port == 0


def test_unix_addresses():
    a = parse_address("/run/httptp.sock", "unix")
    assert a == Address("unix", path="/run/httptp.sock")
    assert str(a) == "/run/httptp.sock" and a.sockaddr() == "/run/httptp.sock"
    assert parse_address("unix:/tmp/x.sock", "unix").path == "/tmp/x.sock"
    assert parse_address("relative.sock", "unix").path == "relative.sock"
    assert parse_address("@abstract", "unix").sockaddr() == "\0abstract"
    for bad in ("", "unix:", "@", "a\0b"):
        with pytest.raises(ValueError):
            parse_address(bad, "unix")


def test_allow_list_empty_allows_everyone():
    for entries in ("", "  "):
        allow = AllowList(entries)
        assert not allow
        assert allow.allows("1.2.3.4") and allow.allows("::1") and allow.allows("junk")


def test_allow_list_v4_exact_and_cidr():
    allow = AllowList("10.0.0.0/8, 192.168.1.7 ,127.0.0.1")
    assert allow.allows("10.1.2.3")
    assert allow.allows("192.168.1.7")
    assert allow.allows("127.0.0.1")
    assert not allow.allows("192.168.1.8")
    assert not allow.allows("11.0.0.1")
    assert not allow.allows("::1")


def test_allow_list_v6():
    allow = AllowList("2001:db8::/32,::1")
    assert allow.allows("2001:db8:1::5")
    assert allow.allows("::1")
    assert allow.allows("fe80::1%eth0") is False
    assert not allow.allows("2001:db9::1")
    assert not allow.allows("127.0.0.1")


def test_allow_list_ipv4_mapped_peers_and_entries():
    allow = AllowList("1.2.3.0/24")
    assert allow.allows("::ffff:1.2.3.4")
    assert not allow.allows("::ffff:1.2.4.4")
    mapped = AllowList("::ffff:10.0.0.0/104")        # a mapped range written as IPv6
    assert mapped.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert mapped.allows("10.9.9.9") and mapped.allows("::ffff:10.9.9.9")


def test_allow_list_non_strict_cidr_and_unparsable_peer():
    allow = AllowList("10.1.2.3/8")
    assert allow.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert not allow.allows("")
    assert not allow.allows("not-an-ip")


def test_allow_list_cache_is_bounded():
    allow = AllowList("10.0.0.0/8")
    for i in range(AllowList.CACHE_SIZE + 10):
        assert allow.allows(f"10.0.{i // 256 % 256}.{i % 256}")
    assert len(allow._cache) <= AllowList.CACHE_SIZE
    assert allow.allows("10.0.0.1") and not allow.allows("9.0.0.1")


def test_allow_list_from_networks():
    allow = AllowList(AllowList.parse("1.2.3.4"))
    assert allow.allows("1.2.3.4") and not allow.allows("1.2.3.5")
    allow = AllowList.from_networks(AllowList.parse("::1, 10.0.0.0/8"))
    assert allow.allows("::1") and allow.allows("10.0.0.1") and not allow.allows("::2")
    assert AllowList.from_networks(()).allows("anything")


@pytest.mark.parametrize("entries", ["1.2.3.4,", "1.2.3.4,,5.6.7.8", "1.2.3.256", "host",
                                     "10.0.0.0/33", "::1/129"])
def test_allow_list_errors(entries):
    with pytest.raises(ValueError):
        AllowList.parse(entries)
    with pytest.raises(ValueError):
        AllowList(entries)
