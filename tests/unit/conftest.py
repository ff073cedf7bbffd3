"""Fixtures shared by the unit tests: a fake clock and a small stats map on it."""

from __future__ import annotations

import pytest

from httptp.stats import Stats


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def stats(clock):
    s = Stats.create(4, 8, clock=clock)
    yield s
    s.close()
