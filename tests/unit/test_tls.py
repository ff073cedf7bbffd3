"""httptp.tls without processes: names, ticket keys, and that the master side
stays free of gevent."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

from httptp import tls


@pytest.mark.parametrize("pattern, name, ok", [
    ("a.example", "a.example", True),
    ("a.example", "A.Example.", True),
    ("*.b.example", "x.b.example", True),
    ("*.b.example", "X.B.EXAMPLE", True),
    ("*.b.example", "b.example", False),
    ("*.b.example", "y.x.b.example", False),
    ("a.example", "b.example", False),
])
def test_name_matches(pattern, name, ok):
    assert tls.name_matches(pattern, name) is ok


def test_ticket_keys_fixed_and_rotating():
    fixed = tls.TicketKeys("secret")
    assert len(fixed.key()) == 80 and fixed.key(1) == fixed.key(2) == tls.TicketKeys("secret").key()
    assert tls.TicketKeys("other").key() != fixed.key()
    rot = tls.TicketKeys("", period=100.0)
    assert rot.key(5) == rot.key(5) and rot.key(5) != rot.key(6)
    assert rot.period_number(1050.0) == 10 and rot.next_boundary(1050.0) == 50.0
    assert tls.TicketKeys("").key(5) != rot.key(5)       # a random secret per master


def test_ticket_key_is_set_through_openssl():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    key = tls.TicketKeys("x").key()
    tls.apply_ticket_key(ctx, key)
    assert tls.read_ticket_key(ctx) == key
    with pytest.raises(ValueError):
        tls.apply_ticket_key(ctx, b"short")


def test_master_side_imports_no_gevent():
    code = ("import sys, httptp.tls, httptp.config; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'gevent']")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
