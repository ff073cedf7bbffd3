"""sd_notify without a dependency: one datagram to ``$NOTIFY_SOCKET``.

systemd (``Type=notify`` / ``Type=notify-reload``) reads ``READY=1``,
``RELOADING=1``, ``STOPPING=1``, ``WATCHDOG=1`` and ``STATUS=...`` lines from it.  Outside
systemd the variable is unset and every call is a no-op.  A name starting with
``@`` is a Linux abstract socket (the ``@`` stands for a leading NUL byte).
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send ``lines`` as one message; True if it was sent.  Never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False  # systemd went away or the socket is not ours: nothing to tell
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *_status(status))


def reloading(status: str = "") -> bool:
    # MONOTONIC_USEC is required by Type=notify-reload (systemd 253+), harmless before.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *_status(status))


def status(text: str) -> bool:
    return notify(*_status(text))


def _status(text: str) -> tuple[str, ...]:
    return (f"STATUS={text}",) if text else ()


def watchdog_timeout(environ=os.environ, pid: int | None = None) -> float | None:
    """``WatchdogSec=`` in seconds when systemd expects WATCHDOG=1 from this
    process (``WATCHDOG_USEC`` set and ``WATCHDOG_PID``, if set, is ours), else None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 1e6


class Watchdog:
    """WATCHDOG=1 at half the ``WatchdogSec=`` interval, as sd_watchdog_enabled(3)
    advises, when the caller says all is well.  Disabled (``timeout`` None)
    outside a unit with ``WatchdogSec=``."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = watchdog_timeout() if timeout is None else timeout
        self.next_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.timeout is not None

    def due_in(self, now: float) -> float:
        """Seconds until the next ping is due (0: now; inf: disabled)."""
        if self.timeout is None:
            return float("inf")
        return max(0.0, self.next_at - now)

    def ping(self, now: float) -> bool:
        self.next_at = now + self.timeout / 2
        return notify("WATCHDOG=1")

    def skip(self, now: float) -> None:
        """No ping now: look again soon (within a quarter of the timeout)."""
        self.next_at = now + min(1.0, self.timeout / 4)
