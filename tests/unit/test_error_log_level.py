"""httptp.logs: the JSON error log's ``level``; text lines stay as they were."""

from __future__ import annotations

import json

import pytest

from httptp.logs import RateLimitedLog, error_logger, say


@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_json_error_log_has_a_level(capsys, level):
    log = error_logger("worker 3", "json", level="error")
    log("default level")
    log("given", level)
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert list(first) == ["time", "level", "who", "msg"]
    assert first["level"] == "error" and first["who"] == "worker 3"
    assert second["level"] == level and second["msg"] == "given"


def test_text_error_log_is_unchanged(capsys):
    error_logger("worker 3", "text")("something", "warning")
    assert capsys.readouterr().err == "httptp: worker 3: something\n"


def test_say_works_with_any_callable(capsys):
    lines = []
    say(lines.append, "plain", "warning")
    say(error_logger("m", "json"), "leveled", "warning")
    assert lines == ["plain"]
    assert json.loads(capsys.readouterr().err)["level"] == "warning"


def test_rate_limited_lines_are_warnings(capsys):
    RateLimitedLog(error_logger("w", "json")).say("k", "refused")
    assert json.loads(capsys.readouterr().err)["level"] == "warning"
    lines = []
    RateLimitedLog(lines.append).say("k", "refused")
    assert lines == ["refused"]
