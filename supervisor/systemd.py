"""sd_notify without a dependency: one datagram to ``$NOTIFY_SOCKET``.

systemd (``Type=notify`` / ``Type=notify-reload``) reads ``READY=1``,
``RELOADING=1``, ``STOPPING=1`` and ``STATUS=...`` lines from it.  Outside
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
