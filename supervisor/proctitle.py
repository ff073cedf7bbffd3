"""Process titles (``ps``/``top``) through setproctitle, a no-op when it is missing."""

from __future__ import annotations

try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # optional: titles are a convenience, never a reason to fail
    _setproctitle = None


def set_title(title: str) -> None:
    """Show ``title`` as this process's command line where setproctitle is installed."""
    if _setproctitle is not None:
        _setproctitle(title)
