"""The master's signal table and its wakeup-pipe queue.

Theory of operation
-------------------
``SIGNALS`` maps each signal the master handles to the name of its
``Arbiter.handle_<name>`` method and to the operator's action word (nginx's
``-s`` vocabulary), which docs/signals.md lists.

The Python-level handler does nothing at all.  ``signal.set_wakeup_fd`` makes
CPython's C-level handler write the signal number, one byte per delivery, into
our non-blocking pipe; that pipe *is* the queue.  The loop blocks in
``select()`` on it, reads the bytes and dispatches them in order.  So nothing
runs inside a handler (no logging, no allocation, no re-entrancy), and a
signal that arrives while the loop is busy is simply read on the next pass.
If a storm of signals ever filled the pipe (64 KiB), the extra ones would be
dropped; the loop reaps children on every pass anyway, so a lost CHLD costs
nothing.

Around ``fork()`` the handled signals are blocked (``blocked()``), so a
signal meant for the new child cannot run the master's handler in the child
before the child has reset its dispositions (``reset_in_child()``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

# signal -> (Arbiter.handle_<name>, operator's action word)
SIGNALS: dict[int, tuple[str, str]] = {
    signal.SIGTERM: ("term", "stop"),
    signal.SIGINT: ("int", "stop"),
    signal.SIGQUIT: ("quit", "quit"),
    signal.SIGHUP: ("hup", "reload"),
    signal.SIGTTIN: ("ttin", "incr"),
    signal.SIGTTOU: ("ttou", "decr"),
    signal.SIGUSR1: ("usr1", "reopen"),
    signal.SIGUSR2: ("usr2", "upgrade"),
    signal.SIGCHLD: ("chld", "reap"),
}

# A new worker starts with these ignored and the other handled signals at their
# default.  INT: Ctrl-C reaches the whole process group, and the master decides
# how workers stop.  HUP: a terminal hang-up must not kill workers the master is
# about to replace gracefully.  TTIN/TTOU: their default action stops the
# process, and only the master acts on them.  USR2 (upgrade): its default kills,
# and `systemctl kill -s USR2` reaches every process of the unit.
WORKER_IGNORES = frozenset({signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                            signal.SIGUSR2})


def _enqueue(signum, frame):
    """Nothing to do: the C handler already wrote ``signum`` to the wakeup pipe.  NO LOGGING."""


class SignalQueue:
    """The master's signals as a stream of numbers read from a wakeup pipe."""

    def __init__(self) -> None:
        self._r = self._w = -1
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Create the pipe and route every signal of ``SIGNALS`` into it (main thread only)."""
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, _enqueue) for signum in SIGNALS}

    def wait(self, timeout: float) -> list[int]:
        """Signal numbers received, in order; [] after ``timeout`` seconds without any."""
        readable, _, _ = select.select([self._r], [], [], timeout)
        if not readable:
            return []
        try:
            return list(os.read(self._r, 4096))
        except BlockingIOError:
            return []

    @contextlib.contextmanager
    def blocked(self):
        """Hold the handled signals pending (delivered on exit) around ``fork()``."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def reset_in_child(self) -> None:
        """In a new worker: worker dispositions, no pipe, signals unblocked.

        Call it first thing after ``fork()`` inside ``blocked()``; it unblocks
        the signals itself, since the child never leaves that block.
        """
        signal.set_wakeup_fd(-1)
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN if signum in WORKER_IGNORES else signal.SIG_DFL)
        self._close_pipe()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def close(self) -> None:
        """In the master at exit: restore the handlers found at ``install()``, close the pipe."""
        if self._w >= 0:
            signal.set_wakeup_fd(-1)
        for signum, handler in self._previous.items():
            if handler is not None:  # None: installed outside Python, nothing to restore
                signal.signal(signum, handler)
        self._previous = {}
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1
