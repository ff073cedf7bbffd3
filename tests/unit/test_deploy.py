"""deploy/ stays true to the code: the example config is generated and loads."""

from __future__ import annotations

import re
from pathlib import Path

from httptp.config import load_config
from httptp.settings import example_config, parse_duration, BY_NAME

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_config_is_generated_from_the_settings():
    assert (DEPLOY / "httptp.conf.example").read_text() == example_config(), \
        "regenerate: python -m httptp.settings --example > deploy/httptp.conf.example"


def test_example_config_uncommented_loads(tmp_path):
    text = (DEPLOY / "httptp.conf.example").read_text()
    conf = tmp_path / "httptp.conf"
    conf.write_text(re.sub(r"(?m)^#(\w+ = ?)", r"\1", text))
    cfg = load_config([f"-config={conf}"], {})
    assert cfg.out_type == "teleport" and cfg.in_addr == "127.0.0.1:8080"


def test_stop_timeouts_exceed_the_graceful_timeout():
    graceful = parse_duration(BY_NAME["gracefulTimeout"].default)
    unit = (DEPLOY / "httptp.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert parse_duration(re.search(r"TimeoutStopSec=(\S+)", unit).group(1)) > graceful
    sv = (DEPLOY / "supervisord.conf").read_text()
    assert "stopsignal=TERM" in sv
    assert int(re.search(r"stopwaitsecs=(\d+)", sv).group(1)) > graceful
