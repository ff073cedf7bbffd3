"""RateLimitedLog: the first line at once, then a count per period."""

from httptp.logs import RateLimitedLog


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_first_at_once_then_a_count_per_period():
    lines, clock = [], Clock()
    log = RateLimitedLog(lines.append, 60.0, clock=clock)
    log.say("10.0.0.1", "refused 10.0.0.1")
    assert lines == ["refused 10.0.0.1"]
    for _ in range(5):
        log.say("10.0.0.1", "refused 10.0.0.1")
    log.flush()
    assert lines == ["refused 10.0.0.1"]          # the period has not ended
    clock.t += 60
    log.flush()
    assert lines[1] == "refused 10.0.0.1 (5 more in the last 60 s)"
    clock.t += 60
    log.flush()                                   # a quiet period: the key is forgotten
    assert len(lines) == 2
    log.say("10.0.0.1", "refused 10.0.0.1")
    assert lines[2] == "refused 10.0.0.1"


def test_keys_are_separate_and_bounded():
    lines, clock = [], Clock()
    log = RateLimitedLog(lines.append, 60.0, max_keys=2, clock=clock)
    log.say("a", "a")
    log.say("b", "b")
    log.say("c", "c")        # over max_keys: counted as "other"
    log.say("d", "d")
    assert lines == ["a", "b", "more refusals of other kinds or peers"]
    clock.t += 61
    log.flush()
    assert lines[3].endswith("(1 more in the last 60 s)")


def test_a_call_after_the_period_says_the_count_without_a_flush():
    lines, clock = [], Clock()
    log = RateLimitedLog(lines.append, 60.0, clock=clock)
    log.say("k", "over the limit")
    log.say("k", "over the limit")
    log.say("k", "over the limit")
    clock.t += 61
    log.say("k", "over the limit")
    assert lines == ["over the limit", "over the limit (2 more in the last 60 s)"]
    clock.t += 61
    log.say("k", "over the limit")
    assert lines[-1] == "over the limit"
