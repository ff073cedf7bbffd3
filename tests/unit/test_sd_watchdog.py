"""supervisor/systemd.py's watchdog: when systemd expects WATCHDOG=1 from us,
and how often.  (What the master sends, and when, is tested with a real
notify socket in tests/process/test_systemd.py.)"""

from __future__ import annotations

import math
import os
import socket
import time

import pytest

from httptp.supervisor import systemd


@pytest.mark.parametrize("environ, want", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),     # another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": ""}, None),
])
def test_watchdog_timeout(environ, want):
    assert systemd.watchdog_timeout(environ) == want


def test_disabled_watchdog_is_never_due():
    dog = systemd.Watchdog.__new__(systemd.Watchdog)
    dog.timeout, dog.next_at = None, 0.0
    assert not dog.enabled and dog.due_in(time.monotonic()) == math.inf


def test_pings_at_half_the_timeout_and_looks_again_soon_after_a_skip(monkeypatch):
    name = f"httptp-unit-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        dog = systemd.Watchdog(timeout=10.0)
        assert dog.enabled and dog.due_in(100.0) == 0.0
        assert dog.ping(100.0)
        assert sock.recv(64) == b"WATCHDOG=1"
        assert dog.due_in(100.0) == 5.0 and dog.due_in(106.0) == 0.0
        dog.skip(106.0)
        assert dog.due_in(106.0) == 1.0          # min(1 s, a quarter of the timeout)
