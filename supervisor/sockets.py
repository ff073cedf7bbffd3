"""The master's listening sockets: one SO_REUSEPORT socket per worker slot for
TCP, one shared socket for a unix path.

Theory of operation
-------------------
Everything is bound in the master before any fork, so the port never refuses a
connection while workers come and go.  A worker inherits its slot's socket
through ``fork()`` (no exec, so close-on-exec does not matter and the sockets
keep Python's default non-inheritable flag).  The master keeps its copy open
for the slot's lifetime: a replacement worker (respawn or HUP) inherits the
connections queued on it.

With several TCP sockets in one SO_REUSEPORT group the kernel hashes each new
connection to one of them.  Closing one resets the connections queued on it
unless ``net.ipv4.tcp_migrate_req=1`` (Linux 5.14+).  All sockets of a group
must belong to the same effective UID.

SO_REUSEPORT also lets a second process (another httptp of the same user) join
our group silently.  Unless the operator asked for that (``-reusePort``), we
first bind one probe socket *without* SO_REUSEPORT, which fails with
EADDRINUSE if anyone is listening there, then close it before the real
binds.  The window between probe and bind is a known, tiny race.

A unix socket path that exists is removed only if it is a socket nobody
accepts on (a stale leftover); a live socket or any other file is refused.
The socket gets the permissions of the umask (we never chmod); its path is
unlinked at close if it is still our socket.  ``@name`` is a Linux abstract
socket: no file, nothing to remove.
"""

from __future__ import annotations

import os
import socket
import stat

DEFAULT_BACKLOG = 1024


class ListenError(Exception):
    """A listener could not be opened; ``str()`` is the operator's one-line reason."""


def somaxconn() -> int:
    """The kernel's accept-queue cap, used as our backlog (1024 if unreadable)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read().strip()) or DEFAULT_BACKLOG
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def format_sockaddr(family: int, sockaddr) -> str:
    """``127.0.0.1:8080``, ``[::1]:8080`` or the unix path."""
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    if family == socket.AF_INET:
        return f"{sockaddr[0]}:{sockaddr[1]}"
    return str(sockaddr)


def resolve(host: str, port: int) -> tuple[int, tuple]:
    """``(family, sockaddr)`` to bind; host "" means all IPv4 interfaces.  Resolved once."""
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ListenError(f"-in: cannot resolve {host!r}: {err}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def tcp_listener(family: int, sockaddr, *, reuse_port: bool = True,
                 backlog: int | None = None) -> socket.socket:
    """A bound TCP socket; listening if ``backlog`` is given.  Raises OSError."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind(sockaddr)
        if backlog is not None:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class TcpListeners:
    """One SO_REUSEPORT listening socket per slot, all on one address."""

    def __init__(self, family: int, sockaddr) -> None:
        self.family = family
        self.sockaddr = sockaddr          # port 0 is replaced by the port the kernel chose
        self._by_slot: dict[int, socket.socket] = {}
        self._backlog = somaxconn()

    @property
    def name(self) -> str:
        return format_sockaddr(self.family, self.sockaddr)

    def probe(self) -> None:
        """Fail if anyone listens on the address already (bind without SO_REUSEPORT)."""
        if self.sockaddr[1] == 0:
            return  # the kernel picks a free port: nobody can be there
        try:
            tcp_listener(self.family, self.sockaddr, reuse_port=False).close()
        except OSError as err:
            raise ListenError(f"-in: cannot listen on {self.name}: {err}") from None

    def get(self, slot: int) -> socket.socket:
        return self._by_slot[slot]

    def add(self, slot: int) -> socket.socket:
        """Bind and listen one more socket of the group for ``slot``.  Raises ListenError."""
        try:
            sock = tcp_listener(self.family, self.sockaddr, backlog=self._backlog)
        except OSError as err:
            raise ListenError(f"-in: cannot listen on {self.name}: {err}") from None
        if self.sockaddr[1] == 0:
            self.sockaddr = (self.sockaddr[0], sock.getsockname()[1]) + tuple(self.sockaddr[2:])
        self._by_slot[slot] = sock
        return sock

    def adopt(self, slot: int, sock: socket.socket) -> None:
        """Use ``sock``, a listening socket inherited from an old master (USR2), for ``slot``."""
        self._by_slot[slot] = sock

    def slot_fds(self) -> dict[int, int]:
        """{slot: fd} of the master's copies: what a new master inherits (USR2)."""
        return {slot: sock.fileno() for slot, sock in self._by_slot.items()}

    def remove(self, slot: int) -> None:
        """Close the master's copy of ``slot``'s socket (a worker's copy keeps it alive)."""
        sock = self._by_slot.pop(slot, None)
        if sock is not None:
            sock.close()

    def keep_only(self, slot: int) -> None:
        """In a worker: close every other slot's socket."""
        for other in [s for s in self._by_slot if s != slot]:
            self.remove(other)

    def close(self) -> None:
        for slot in list(self._by_slot):
            self.remove(slot)

    def own_path(self) -> None:
        """Nothing: a TCP listener has no path (see UnixListener)."""

    forget_path = own_path


class UnixListener:
    """One listening unix socket shared by every slot."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.abstract = path.startswith("@")
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None   # (st_dev, st_ino) of the file we made

    @property
    def name(self) -> str:
        return self.path

    def open(self) -> None:
        """Bind and listen.  Raises ListenError."""
        address = "\0" + self.path[1:] if self.abstract else self.path
        if not self.abstract:
            try:
                self._remove_stale()
            except OSError as err:   # e.g. no permission to inspect or remove the path
                raise ListenError(f"-in: cannot listen on {self.path}: {err}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            sock.listen(somaxconn())
        except OSError as err:
            sock.close()
            raise ListenError(f"-in: cannot listen on {self.path}: {err}") from None
        self._sock = sock
        if not self.abstract:
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)

    def adopt(self, sock: socket.socket) -> None:
        """Use ``sock``, the listening socket inherited from an old master (USR2).
        The path stays the old master's to unlink until ``own_path()``."""
        self._sock = sock
        self._inode = None

    def own_path(self) -> None:
        """From now on ``close()`` unlinks the path (a new master that took over)."""
        if not self.abstract and self._sock is not None:
            try:
                st = os.stat(self.path)
            except OSError:
                return
            self._inode = (st.st_dev, st.st_ino)

    def forget_path(self) -> None:
        """``close()`` leaves the path alone: a new master serves on it now (USR2)."""
        self._inode = None

    def slot_fds(self) -> dict[int, int]:
        return {0: self._sock.fileno()} if self._sock is not None else {}

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"-in: cannot listen on {self.path}: exists and is not a socket")
        if _accepts(self.path):
            raise ListenError(f"-in: cannot listen on {self.path}: another process listens on it")
        os.unlink(self.path)

    def get(self, slot: int) -> socket.socket:
        return self._sock

    add = get   # every slot shares the one socket

    def remove(self, slot: int) -> None:
        """Nothing: the shared socket lives as long as the master."""

    def keep_only(self, slot: int) -> None:
        """Nothing: a worker keeps the shared socket."""

    def close(self) -> None:
        """Close, and unlink the path if it is still the socket we created."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._inode is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass  # already gone, or replaced by someone else's: leave it
            self._inode = None


def _accepts(path: str) -> bool:
    """True if something is listening on the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def open_listeners(address, slots: int, reuse_port: bool) -> TcpListeners | UnixListener:
    """Bind ``address`` (an Address: kind "tcp" or "unix") for ``slots`` worker slots.

    TCP: with ``reuse_port`` false, probe first that nobody else listens there.
    Raises ListenError with the operator's one-line message.
    """
    if address.kind == "unix":
        listener = UnixListener(address.path)
        listener.open()
        return listener
    listeners = TcpListeners(*resolve(address.host, address.port))
    if not reuse_port:
        listeners.probe()
    try:
        for slot in range(slots):
            listeners.add(slot)
    except ListenError:
        listeners.close()
        raise
    return listeners
