"""deploy/ stays true to the code: the example config is generated and loads,
and the systemd unit starts as shipped (systemd-analyze verify and security
where systemd-analyze is installed: `make test-deps`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from httptp.config import load_config
from httptp.settings import example_config, parse_duration, BY_NAME
from tests.helpers import HTTPTP

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


# ------------------------------------------------------------------ the unit

UNIT = DEPLOY / "httptp.service"
SYSUSERS = DEPLOY / "httptp.sysusers.conf"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (make test-deps installs Debian's systemd)")
# `systemd-analyze security --offline` of the unit before issue 13 (systemd 252):
# it must not get worse.  The hardened unit rates 1.7.
MAX_EXPOSURE = 3.9


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


UNIT_KEYS = _directives(UNIT.read_text())


def test_unit_needs_no_user_created_by_hand():
    """DynamicUser=yes starts on a stock Debian; the sysusers.d file, if
    installed, makes the same name a static user (keys readable by its group)."""
    assert UNIT_KEYS["DynamicUser"] == ["yes"]
    assert UNIT_KEYS["User"] == ["httptp"] and UNIT_KEYS["Group"] == ["httptp"]
    entries = [l.split() for l in SYSUSERS.read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    assert [e[:2] for e in entries] == [["u", "httptp"]]
    assert "httptp.sysusers.conf" in UNIT.read_text()


def test_unit_documented_paths_are_writable_under_protect_system_strict():
    assert UNIT_KEYS["ProtectSystem"] == ["strict"]
    assert UNIT_KEYS["LogsDirectory"] == ["httptp"]       # -accessLog=/var/log/httptp/...
    assert UNIT_KEYS["StateDirectory"] == ["httptp"]      # -autocertCacheDir=/var/lib/httptp/...
    # the default -autocertCacheDir is relative: it lands in the state directory
    assert not BY_NAME["autocertCacheDir"].default.startswith("/")
    assert UNIT_KEYS["WorkingDirectory"] == ["/var/lib/httptp"]
    docs = (DEPLOY.parent / "docs" / "operations.md").read_text()
    assert "-accessLog=/var/log/httptp/access.log" in docs
    assert "/var/lib/httptp/autocert" in (DEPLOY.parent / "docs" / "acme.md").read_text()


def test_unit_reload_checks_the_config_first():
    start = UNIT_KEYS["ExecStart"][0]
    check, signal_ = UNIT_KEYS["ExecReload"]
    assert check == start + " -checkConfig"
    assert signal_ == "/bin/kill -HUP $MAINPID"


def test_unit_hardening():
    want = {"SystemCallFilter": "@system-service", "ProtectClock": "yes",
            "RestrictSUIDSGID": "yes", "UMask": "0027", "NoNewPrivileges": "yes",
            "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
            "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "MemoryDenyWriteExecute": "yes"}
    for key, value in want.items():
        assert value in UNIT_KEYS.get(key, []), key
    assert UNIT_KEYS["WatchdogSec"]


def test_unit_commands_accept_the_example_config(tmp_path):
    """As installed by the comment at the top of the unit: the example config
    as /etc/httptp/httptp.conf.  ExecStart's flags pass -checkConfig, as
    ExecReload's first command does."""
    conf = tmp_path / "httptp.conf"
    conf.write_text((DEPLOY / "httptp.conf.example").read_text())
    assert "install -D -m 0644 deploy/httptp.conf.example /etc/httptp/httptp.conf" in UNIT.read_text()
    for command in (UNIT_KEYS["ExecStart"][0] + " -checkConfig", UNIT_KEYS["ExecReload"][0]):
        argv = [a.replace("/etc/httptp/httptp.conf", str(conf)) for a in command.split()]
        assert argv[0] == "/usr/local/bin/httptp"
        run = subprocess.run([HTTPTP, *argv[1:]], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})
        assert run.returncode == 0 and run.stdout == "configuration OK\n", run.stderr


def _for_analysis(tmp_path):
    """The unit with ExecStart's /usr/local/bin/httptp replaced by this venv's
    httptp: verify checks that the commands exist."""
    unit = tmp_path / "httptp.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/httptp", HTTPTP))
    return unit


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    unit = _for_analysis(tmp_path)
    run = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60)
    problems = [l for l in (run.stdout + run.stderr).splitlines() if "httptp.service" in l]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


@needs_analyze
def test_unit_exposure_does_not_get_worse(tmp_path):
    unit = _for_analysis(tmp_path)
    run = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for httptp\.service: (\d+\.\d+)", run.stdout + run.stderr)
    if m is None and "--offline" in run.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {run.stderr.strip()[:200]}")
    assert m, run.stdout + run.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, run.stdout
