"""The port helpers the process tests rely on: a port told to a program before it
binds must not be one the kernel can hand to anyone else meanwhile."""

from __future__ import annotations

import socket

from tests import helpers
from tests.helpers import dead_address, free_port


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    low = helpers._ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
            s.listen(1)


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(helpers, "_ephemeral_low", lambda: taken + 1)
        monkeypatch.setattr(helpers.random.Random, "randrange", lambda self, a, b: taken)
        # the only candidate is taken: no port, rather than a port in use
        try:
            free_port()
        except AssertionError as e:
            assert "no free port" in str(e)
        else:
            raise AssertionError("a port in use was handed out")


def test_dead_address_refuses():
    host, port = dead_address().rsplit(":", 1)
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0
