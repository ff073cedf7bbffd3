"""httptp.io.timers.Deadline: re-armed per request, it always counts the full period."""

import time

import gevent
import pytest

from httptp.io.timers import Deadline


class _Expired(Exception):
    pass


def test_rearming_restarts_the_full_period():
    # A reused gevent.Timeout would fire here: libev keeps only the time left
    # after cancel(), so 10 x 0.1 s inside a 0.3 s timeout adds up and fires.
    d = Deadline(0.3, _Expired)
    for _ in range(10):
        d.arm()
        gevent.sleep(0.1)
        d.disarm()
    d.close()


def test_fires_once_in_the_arming_greenlet():
    d = Deadline(0.05, _Expired)
    t0 = time.monotonic()
    d.arm()
    with pytest.raises(_Expired):
        gevent.sleep(5)
    assert 0.04 <= time.monotonic() - t0 < 2
    gevent.sleep(0.15)          # a repeating timer underneath: it must not fire again
    d.close()


def test_disarmed_never_fires():
    d = Deadline(0.05, _Expired)
    d.arm()
    d.disarm()
    gevent.sleep(0.15)
    d.close()
