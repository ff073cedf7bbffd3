"""-version and --version: print the version of the code this process imported, exit 0."""

from __future__ import annotations

import platform

import pytest

import httptp
from httptp import cli, settings
from tests.helpers import run_httptp

VERSION_LINE = f"httptp {httptp.__version__} (Python {platform.python_version()})"


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_requested(flag):
    with pytest.raises(settings.VersionRequested):
        settings.parse_argv(["-workers=2", flag])


def test_an_unknown_flag_before_it_is_still_an_error():
    with pytest.raises(settings.ArgvError):
        settings.parse_argv(["-nosuchflag", "-version"])


def test_help_lists_it():
    assert "\n  -version\n        Print the version and exit\n" in settings.help_text()


def test_cli_version(capsys):
    assert cli.main(["-version"]) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == (VERSION_LINE + "\n", "")


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_the_real_command_prints_the_version_and_exits_0(flag):
    p = run_httptp(flag, "-in=127.0.0.1:1", timeout=30)
    assert (p.returncode, p.stdout, p.stderr) == (0, VERSION_LINE + "\n", "")


def test_version_is_the_package_metadata_version():
    from importlib.metadata import version
    assert httptp.__version__ == version("httptp")
