"""USR2: replace the master by a fresh copy of itself, the code on disk now,
without closing a listening socket (nginx's and gunicorn's binary upgrade).

Theory of operation
-------------------
The *old* master, on USR2 (``spawn``):

1. forks a child that execs the same command line (``sys.executable`` and
   ``sys.orig_argv``), so Python imports the files on disk now: after
   ``pip install -U`` the new code.  Before the exec the child marks the
   master's listening sockets inheritable and describes them in
   ``HTTPTP_INHERIT_FDS`` (JSON: the ``-in`` identity and slot → fd, the
   helpers' sockets by flag, and the write end of a pipe back to the old
   master).  The new master reads its configuration itself, as at any start.
2. keeps serving and watches the child (``Upgrade``): the new master writes
   ``ready`` on the pipe once every one of its workers is ready.  Then the
   old master tells systemd ``MAINPID=<new pid>`` and drains as on TERM, but
   without ``STOPPING=1`` and without unlinking a unix socket's path.
3. if the new master exits before it is ready (a bad configuration exits 2,
   workers that cannot boot 3, code that does not import 1: its own line on
   stderr says why), or is not ready within the timeout (it gets TERM), the
   old master logs it and goes on serving as if nothing happened.

The *new* master (``take_inherited``, ``adopt_listeners``, ``adopt_socket``,
``report_ready``) reads and removes the variable, checks each fd (a listening
stream socket of the right family) and uses the ones whose identity (the flag's
value) is what its own configuration says.  Anything else is bound as at a
plain start, and inherited fds it has no use for are closed.  Its workers
accept from the very sockets the old workers accept from, so no connection
is refused or reset while both run; the old workers then drain.

Why the *old* master tells systemd ``MAINPID=`` first: with
``NotifyAccess=main`` (deploy/httptp.service) systemd accepts notifications
from the main pid only, and until the switch that is the old master.  The new
master says ``MAINPID=`` (itself) and its ``STATUS=`` again once the old one
has exited (``Arbiter.upgrade_tick``).  It is the old one's child until then,
and is re-parented (to systemd or init) after.

The shared stats memory is an anonymous mmap: it does not survive exec, so
the new master starts with its counters at zero (docs/signals.md says which).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from httptp.supervisor.procs import flush_std
from httptp.supervisor.sockets import TcpListeners, UnixListener

ENV = "HTTPTP_INHERIT_FDS"
READY = b"ready\n"

Log = Callable[[str], None]


class InheritError(Exception):
    """An inherited fd (or the variable) is not what it should be; one line."""


def listener_identity(config) -> str:
    """What must match for a new master to take the old ``-in`` sockets:
    ``tcp 127.0.0.1:0``, ``unix /run/httptp.sock`` (the flag as written, so
    port 0 keeps the port the old master got)."""
    return f"{config.listen.kind} {config.listen}"


# -- the new master ----------------------------------------------------------------


@dataclass
class Inherited:
    """What an old master handed over through ``HTTPTP_INHERIT_FDS``."""
    parent: int                                   # the old master's pid
    ready_fd: int | None                          # write ``ready`` here
    listen: str = ""                              # listener_identity() of the old -in
    slots: dict[int, int] = field(default_factory=dict)                 # slot → fd
    sockets: dict[str, tuple[str, int]] = field(default_factory=dict)   # flag → (value, fd)


def take_inherited(log: Log, environ=os.environ) -> Inherited | None:
    """Read and remove ``HTTPTP_INHERIT_FDS``; None when unset or unusable (logged)."""
    text = environ.pop(ENV, None)
    if text is None:
        return None
    try:
        inherited = _parse(text)
        if inherited.parent != os.getppid():
            # The old master died before we got here, or the variable was copied by
            # hand.  Nothing bound yet, so the listening sockets among the fds can
            # only be inherited ones: close them, or they would queue connections
            # that nobody accepts.  Other fds are left alone.
            _close_sockets([*inherited.slots.values(),
                            *(fd for _, fd in inherited.sockets.values())])
            raise InheritError(f"it names pid {inherited.parent}, not our parent "
                               f"{os.getppid()}")
    except InheritError as err:
        log(f"ignoring {ENV}: {err}; binding every socket as at a plain start")
        return None
    return inherited


def _parse(text: str) -> Inherited:
    try:
        data = json.loads(text)
        ready_fd = data.get("ready_fd")
        inherited = Inherited(
            parent=_int(data["parent"]),
            ready_fd=None if ready_fd is None else _int(ready_fd),
            listen=str(data.get("listen", "")),
            slots={_int(slot): _int(fd) for slot, fd in data.get("slots", {}).items()},
            sockets={str(flag): (str(value), _int(fd))
                     for flag, (value, fd) in data.get("sockets", {}).items()})
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise InheritError(f"malformed ({type(err).__name__}: {err})") from None
    fds = [*inherited.slots.values(), *(fd for _, fd in inherited.sockets.values()),
           *([inherited.ready_fd] if inherited.ready_fd is not None else [])]
    if len(set(fds)) != len(fds):
        raise InheritError("malformed (an fd is listed twice)")
    return inherited


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not an integer: {value!r}")
    number = int(value)
    if not 0 <= number < 2**31:
        raise ValueError(f"out of range: {number}")
    return number


def adopt_listeners(inherited: Inherited | None, config, slots: int, log: Log):
    """The old master's ``-in`` sockets as our listeners (TcpListeners or
    UnixListener) with exactly ``slots`` slots, or None: bind as usual.

    TCP slots beyond what was inherited are bound now (ListenError if that
    fails); inherited slots beyond ``slots`` are closed (as TTOU does)."""
    if inherited is None or not inherited.slots:
        return None
    fds, inherited.slots = inherited.slots, {}
    if inherited.listen != listener_identity(config):
        log(f"upgrade: the old master listened on {inherited.listen}, not "
            f"{listener_identity(config)}: binding -in anew")
        _close_sockets(fds.values())
        return None
    unix = config.listen.kind == "unix"
    socks: dict[int, socket.socket] = {}
    try:
        for slot, fd in sorted(fds.items()):
            socks[slot] = listening_socket(fd, unix)
    except InheritError as err:
        log(f"upgrade: {err}: binding -in anew")
        for sock in socks.values():
            sock.close()
        _close_sockets(fd for slot, fd in fds.items() if slot not in socks)
        return None
    if unix:
        return _adopt_unix(config, socks)
    return _adopt_tcp(socks, slots)


def _adopt_unix(config, socks: dict[int, socket.socket]) -> UnixListener:
    first, *rest = socks.values()
    for sock in rest:       # one shared socket: an old master passes one fd
        sock.close()
    listener = UnixListener(config.listen.path)
    listener.adopt(first)
    return listener


def _adopt_tcp(socks: dict[int, socket.socket], slots: int) -> TcpListeners:
    first = next(iter(socks.values()))
    listeners = TcpListeners(first.family, first.getsockname())
    for slot, sock in socks.items():
        listeners.adopt(slot, sock)
    for slot in [s for s in socks if s >= slots]:
        listeners.remove(slot)
    for slot in range(slots):
        if slot not in socks:
            listeners.add(slot)           # ListenError: the start fails, the old master stays
    return listeners


def adopt_socket(inherited: Inherited | None, flag: str, value: str, log: Log):
    """The old master's socket for ``-flag`` (``expvarAddr``, ``autocertHTTPAddr``)
    if it was bound from the same ``value``; else None (the caller binds)."""
    if inherited is None or flag not in inherited.sockets:
        return None
    old_value, fd = inherited.sockets.pop(flag)
    if old_value != value:
        log(f"upgrade: -{flag} was {old_value!r}, is {value!r}: binding it anew")
        _close_sockets([fd])
        return None
    try:
        return listening_socket(fd, unix=False)
    except InheritError as err:
        log(f"upgrade: -{flag}: {err}: binding it anew")
        _close_sockets([fd])
        return None


def close_unused(inherited: Inherited | None) -> None:
    """Close the inherited sockets nothing adopted (a flag now empty)."""
    if inherited is not None:
        _close_sockets(fd for _, fd in inherited.sockets.values())
        inherited.sockets = {}


def listening_socket(fd: int, unix: bool) -> socket.socket:
    """A socket object for inherited ``fd``, checked: a listening stream socket,
    unix or not as asked.  Raises InheritError (the fd is then left open)."""
    kind = "unix" if unix else "TCP"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise InheritError(f"inherited fd {fd} is not a socket ({err.strerror or err})") from None
    try:
        good = (sock.type == socket.SOCK_STREAM
                and (sock.family == socket.AF_UNIX) == unix
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        good = False
    if not good:
        sock.detach()
        raise InheritError(f"inherited fd {fd} is not a listening {kind} socket")
    sock.set_inheritable(False)           # as if we had bound it: not passed to other programs
    return sock


def report_ready(inherited: Inherited, log: Log) -> None:
    """Tell the old master we serve: it drains and exits."""
    fd = inherited.ready_fd
    if fd is None:
        return
    inherited.ready_fd = None
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            log(f"upgrade: could not tell the old master (pid {inherited.parent}) we are "
                f"ready: fd {fd} is not a pipe")
            return                         # not ours to close either
    except OSError as err:
        log(f"upgrade: could not tell the old master (pid {inherited.parent}) we are "
            f"ready: {err.strerror or err}")
        return
    try:
        os.write(fd, READY)
    except OSError as err:
        log(f"upgrade: could not tell the old master (pid {inherited.parent}) we are "
            f"ready: {err.strerror or err}")
    finally:
        _close_fds([fd])


def _close_sockets(fds) -> None:
    """Close the inherited fds that are listening sockets; leave anything else
    (the variable names fds: never close one we cannot tell is ours)."""
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = False
        if listening:
            sock.close()
        else:
            sock.detach()


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- the old master ----------------------------------------------------------------


@dataclass
class Upgrade:
    """An old master's view of the new master it started."""
    pid: int
    ready_r: int                   # read end of the pipe the new master writes ``ready`` to
    deadline: float                # time.monotonic(): not ready by then → TERM, keep serving
    state: str = "starting"        # "starting", "ready" (we drain), "abandoned" (told to stop)

    def poll_ready(self) -> bool:
        """True once the new master wrote ``ready`` (never blocks)."""
        try:
            return READY.strip() in os.read(self.ready_r, 64)
        except OSError:            # nothing yet (EAGAIN), or closed
            return False

    def close(self) -> None:
        _close_fds([self.ready_r])
        self.ready_r = -1


def describe(config, listeners, sockets: dict[str, tuple[str, socket.socket | None]]) -> dict:
    """The part of ``HTTPTP_INHERIT_FDS`` an old master knows before the fork."""
    return {"listen": listener_identity(config),
            "slots": {str(slot): fd for slot, fd in listeners.slot_fds().items()},
            "sockets": {flag: [value, sock.fileno()] for flag, (value, sock) in sockets.items()
                        if sock is not None}}


def command_line() -> list[str]:
    """How this process was started, to run again: the interpreter with the
    options and script (or ``-m httptp``) it was given."""
    if not sys.executable:
        raise OSError("the Python interpreter's path is unknown (sys.executable is empty)")
    return [sys.executable, *sys.orig_argv[1:]]


def spawn(description: dict, *, timeout: float, blocked: Callable[[], ContextManager],
          in_child: Callable[[], None]) -> Upgrade:
    """Fork and exec the new master; raises OSError (nothing started).

    ``blocked`` holds the master's signals around the fork, ``in_child``
    resets them in the child (the exec keeps ignored signals ignored and the
    mask, not handlers)."""
    argv = command_line()
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(ready_r, False)
    env = dict(os.environ)
    env[ENV] = json.dumps(dict(description, parent=os.getpid(), ready_fd=ready_w))
    fds = [int(fd) for fd in description["slots"].values()]
    fds += [fd for _, fd in description["sockets"].values()] + [ready_w]
    flush_std()
    try:
        with blocked():
            pid = os.fork()
            if pid == 0:
                _exec_child(argv, env, fds, in_child)
    except OSError:
        _close_fds([ready_r, ready_w])
        raise
    os.close(ready_w)
    return Upgrade(pid, ready_r, time.monotonic() + timeout)


def _exec_child(argv: list[str], env: dict, fds: list[int], in_child) -> None:
    """In the forked child: become the new master; never returns."""
    try:
        in_child()
        if "WATCHDOG_PID" in env:          # systemd's, for the main pid: that is us now
            env["WATCHDOG_PID"] = str(os.getpid())
        for fd in fds:
            os.set_inheritable(fd, True)
        os.execve(argv[0], argv, env)
    except BaseException as exc:           # noqa: BLE001 - reported, then _exit
        try:
            os.write(2, f"httptp: upgrade: cannot run {' '.join(argv)}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(127)
