"""``httptp`` command: parse and check the configuration, then hand it to the
supervisor.  A bad configuration is one line on stderr and exit status 2,
before anything binds a socket."""

from __future__ import annotations

import os
import platform
import sys

from httptp import settings
from httptp.config import check_implemented, inactive_in_use, load_config
from httptp.errors import ConfigError

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args, os.environ)
        check_implemented(config)
        # Certificates are read and checked here, before anything binds (exit 2).
        from httptp.tls import build as build_tls
        tls = build_tls(config)
        resolved = _resolve_names(config)
    except settings.HelpRequested:
        sys.stdout.write(settings.help_text())
        return 0
    except settings.VersionRequested:
        print(version_line())
        return 0
    except ConfigError as e:
        print(f"{settings.PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if _check_only(args):
        print("configuration OK")
        return 0
    inactive = inactive_in_use(config)
    if inactive:
        print(f"{settings.PROG}: info: accepted but not active in this version: "
              + " ".join(inactive), file=sys.stderr)
    # Imported here: the supervisor is heavy and the config tests must not need it.
    from httptp.supervisor.arbiter import Arbiter
    return Arbiter(config, reload_config=lambda: load_config(args, os.environ), tls=tls,
                   resolved=resolved).run()


def version_line() -> str:
    """What -version prints: ``httptp 0.1.0 (Python 3.11.2)``.  The version is
    the one of the code this process imported (``httptp.__version__``), which
    is what a USR2 upgrade runs (docs/signals.md)."""
    from httptp import __version__
    return f"{settings.PROG} {__version__} (Python {platform.python_version()})"


def _resolve_names(config):
    """-out names resolved now (a name that does not is a ConfigError; with
    -outResolveWait after waiting), or None when -out has none."""
    from httptp import discovery
    if not discovery.uses_discovery(config):
        return None
    try:
        return discovery.resolve_start(
            config, log=lambda m: print(f"{settings.PROG}: {m}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        raise ConfigError("-out: interrupted while waiting for names to resolve") from None


def _check_only(args: list[str]) -> bool:
    raw = settings.parse_argv(args).get("checkConfig", "false")
    return settings.parse_bool(raw)     # already validated by load_config
