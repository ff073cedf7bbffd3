"""Worker side of autocert: server TLS contexts from the ACME cache directory.

No gevent import here and no ACME code: the worker only reads files that the
ACME helper process (``httptp.acme``) writes, and asks it for a certificate
by creating ``acme+requests/<host>`` and sending ``<host>`` as a datagram to
``acme+helper.sock`` (best effort; the helper also looks at the request
directory every few seconds).

When the order for a host without a certificate fails, the helper writes
``acme+failed/<host>`` (JSON: ``retry_at``, wall-clock end of the back-off;
``failures`` in a row; ``error``, one line) and removes it when the back-off
ends (the helper's own clock decides: ``retry_at`` only goes into our log
line, so a step of the wall clock changes nothing).  While it exists, a
handshake for that host fails at once, with the alert of a host without a
certificate, and a log line rate-limited per host
(``httptp.logs.RateLimitedLog``; ``flush_logs()`` from the heartbeat).  The
store remembers the failure and looks at the file at most once a second, so
the handshakes it refuses make no system call; the first one after the file
is gone asks the helper again.

Cache directory layout (mode 0700; every file 0600)::

    <cacheDir>/acme_account+key          ACME account key (PEM EC P-256)
    <cacheDir>/<host>                    key (PEM) followed by the full chain;
                                         replaced atomically (rename) on renewal
    <cacheDir>/acme+requests/<host>      empty: a worker asks for <host>
    <cacheDir>/acme+tls-alpn-01/<host>   RFC 8737 challenge key + certificate,
                                         present only during a TLS-ALPN-01 validation
    <cacheDir>/acme+failed/<host>        the last order for <host> (no certificate)
                                         failed: handshakes fail while it exists
                                         (the helper's back-off)
    <cacheDir>/acme+helper.sock          the helper's wake-up datagram socket

``<host>`` is always a lower-case DNS name (letters, digits, '-', '.'), so no
host file can clash with the names containing '+'.  The key+chain file per
host is Go's ``autocert.DirCache`` layout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable

from httptp.logs import RateLimitedLog

ACCOUNT_KEY = "acme_account+key"
REQUESTS_DIR = "acme+requests"
ALPN_DIR = "acme+tls-alpn-01"
FAILED_DIR = "acme+failed"
HELPER_SOCKET = "acme+helper.sock"
ACME_TLS_ALPN = "acme-tls/1"

RECHECK = 1.0            # look at a host's file at most this often
POLL = 0.1               # while waiting for a new certificate
MAX_FAILED = 1024        # failed orders remembered; beyond, all are forgotten (and re-read)

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_host(host: str | None) -> str | None:
    """A lower-case DNS name safe as a file name, or None (IP address, bad name).

    The same rule as ``httptp.acme.normalize_host`` (kept here so a worker need
    not import the ACME code)."""
    if not host:
        return None
    name = host.strip().rstrip(".").lower()
    if not name or len(name) > 253 or "." not in name:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


@dataclass
class _Entry:
    context: ssl.SSLContext | None
    stamp: tuple | None          # (mtime_ns, inode, size) of the file it was loaded from
    checked: float               # monotonic time of the last stat


@dataclass
class _Failure:
    """``acme+failed/<host>`` as last read."""
    retry_at: float              # wall-clock time the helper's back-off ends (for the log)
    failures: int                # failed orders in a row
    error: str                   # why the last one failed, one line
    stamp: tuple                 # (mtime_ns, inode, size) of the file
    checked: float               # monotonic time of the last stat


class AutocertStore:
    """Contexts for autocert hosts, loaded from (and reloaded when) the cache changes.

    ``make_context(cert_path, key_path)`` builds a server context (both paths
    are the same key+chain file).  ``sleep(seconds)`` is how ``context_for``
    waits for a new certificate: pass ``gevent.sleep`` in a worker so that
    other connections keep being served.  ``log(message)`` gets one line per
    problem (a file that cannot be loaded, a request that timed out), and the
    refusals of hosts whose order failed, rate-limited per host: call
    ``flush_logs()`` every second or so.
    """

    def __init__(self, cache_dir: str, host_regexp: str, *,
                 make_context: Callable[[str, str], ssl.SSLContext],
                 request_timeout: float = 30.0, log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cache_dir = cache_dir
        self.host_regexp = re.compile(host_regexp)
        self.make_context = make_context
        self.request_timeout = request_timeout
        self.log = log or (lambda message: None)
        self.sleep = sleep
        self._entries: dict[str, _Entry] = {}
        self._challenges: dict[str, _Entry] = {}
        self._requested: dict[str, float] = {}     # host → monotonic time we last asked
        self._failed: dict[str, _Failure] = {}     # host → its failed order, as last read
        self._refusals = RateLimitedLog(self.log)

    # -- certificates ----------------------------------------------------------------

    def context_for(self, host: str) -> ssl.SSLContext | None:
        """The context for ``host`` (SNI), or None: not an autocert host, its
        order failed (the helper's back-off runs), or no certificate came
        within ``request_timeout``.

        Cheap when the certificate is known (a dict lookup, a ``stat`` at most
        once a second), and when its order failed (the same).  For a matching
        host without either it asks the helper and waits, calling ``sleep``,
        until a certificate or a failure comes.
        """
        name = normalize_host(host)
        if name is None or self.host_regexp.search(name) is None:
            return None
        if name in self._entries:
            return self._cached(name)       # a certificate is loaded: never None
        failure = self._failure(name)
        if failure is not None:
            return self._refuse(name, failure)
        context = self._cached(name)
        if context is not None:
            return context
        self._request(name)
        deadline = time.monotonic() + self.request_timeout
        while time.monotonic() < deadline:
            self.sleep(POLL)
            context = self._cached(name, force=True)
            if context is not None:
                return context
            failure = self._failure(name, force=True)
            if failure is not None:
                return self._refuse(name, failure)
        self.log(f"autocert: no certificate for {name} after {self.request_timeout:g} s")
        return None

    def flush_logs(self) -> None:
        """Log the counts of refusals (call it every second or so: a heartbeat)."""
        self._refusals.flush()

    def _cached(self, name: str, force: bool = False) -> ssl.SSLContext | None:
        entry = self._entries.get(name)
        now = time.monotonic()
        if entry is not None and not force and now - entry.checked < RECHECK:
            return entry.context
        path = os.path.join(self.cache_dir, name)
        stamp = _stamp(path)
        if entry is not None and stamp == entry.stamp:
            entry.checked = now
            return entry.context
        if stamp is None:
            if entry is not None:
                entry.checked = now      # removed: keep serving what we have
                return entry.context
            return None
        try:
            context = self.make_context(path, path)
        except (OSError, ssl.SSLError, ValueError) as err:
            # Half-written files cannot happen (rename), but a bad file can: keep the old one.
            self.log(f"autocert: cannot load {path}: {err}")
            if entry is not None:
                entry.checked = now
                entry.stamp = stamp
                return entry.context
            return None
        self._entries[name] = _Entry(context, stamp, now)
        return context

    # -- failed orders -------------------------------------------------------------------

    def _failure(self, name: str, force: bool = False) -> _Failure | None:
        """``name``'s failed order while the helper's back-off runs, else None.

        From memory; the file is looked at (a ``stat``, and a read when it
        changed) at most once a second, or at every call with ``force``."""
        failure = self._failed.get(name)
        now = time.monotonic()
        if failure is None or force or now - failure.checked >= RECHECK:
            failure = self._read_failure(name, failure, now)
        return failure

    def _read_failure(self, name: str, known: _Failure | None, now: float) -> _Failure | None:
        path = os.path.join(self.cache_dir, FAILED_DIR, name)
        stamp = _stamp(path)
        if stamp is None:
            self._failed.pop(name, None)
            return None
        if known is not None and known.stamp == stamp:
            known.checked = now
            return known
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
            failure = _Failure(float(record["retry_at"]), int(record["failures"]),
                               str(record["error"]), stamp, now)
        except (OSError, ValueError, KeyError, TypeError):
            self._failed.pop(name, None)      # gone meanwhile, or not the helper's
            return None
        if len(self._failed) >= MAX_FAILED:
            self._failed.clear()      # hosts nobody asked for again: read again if asked
        self._failed[name] = failure
        return failure

    def _refuse(self, name: str, failure: _Failure) -> None:
        """The handshake fails (no certificate: the default context has none)."""
        until = time.strftime("%H:%M:%S", time.gmtime(failure.retry_at))
        self._refusals.say(name, f"autocert: TLS handshakes for {name} fail until {until} UTC: "
                                 f"its certificate order failed ({failure.failures} in a row): "
                                 f"{failure.error}")
        return None

    # -- asking the helper ----------------------------------------------------------------

    def _request(self, name: str) -> None:
        """Ask the helper for ``name``: a request file, then a wake-up datagram."""
        now = time.monotonic()
        if now - self._requested.get(name, -1e9) < 1.0:
            return
        self._requested[name] = now
        directory = os.path.join(self.cache_dir, REQUESTS_DIR)
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)   # the master made it,
            os.makedirs(directory, mode=0o700, exist_ok=True)        # unless it was removed
            fd = os.open(os.path.join(directory, name),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
        except OSError as err:
            self.log(f"autocert: cannot ask for a certificate for {name}: {err}")
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.sendto(name.encode("ascii"), socket.MSG_DONTWAIT,
                        os.path.join(self.cache_dir, HELPER_SOCKET))
        except OSError:
            pass      # no helper socket (yet): it scans the request directory anyway
        finally:
            sock.close()

    # -- TLS-ALPN-01 -----------------------------------------------------------------------

    def challenge_context(self, host: str) -> ssl.SSLContext | None:
        """A context serving ``host``'s RFC 8737 challenge certificate with ALPN
        ``acme-tls/1`` while the helper has one published, else None.

        Use it only for a client that offered ``acme-tls/1`` (see
        ``offers_acme_tls``): the certificate is self-signed on purpose.
        """
        name = normalize_host(host)
        if name is None:
            return None
        path = os.path.join(self.cache_dir, ALPN_DIR, name)
        stamp = _stamp(path)
        if stamp is None:
            self._challenges.pop(name, None)
            return None
        entry = self._challenges.get(name)
        if entry is not None and entry.stamp == stamp:
            return entry.context
        try:
            context = challenge_server_context(path)
        except (OSError, ssl.SSLError, ValueError) as err:
            self.log(f"autocert: cannot load {path}: {err}")
            return None
        self._challenges[name] = _Entry(context, stamp, time.monotonic())
        return context


def challenge_server_context(path: str) -> ssl.SSLContext:
    """A minimal server context for a TLS-ALPN-01 validation (TLS 1.2+, ALPN acme-tls/1)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(path, path)
    context.set_alpn_protocols([ACME_TLS_ALPN])
    return context


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


# -- ClientHello peeking -----------------------------------------------------------------

def client_hello_alpn(data: bytes) -> list[str] | None:
    """The ALPN protocols offered in a TLS ClientHello (the first bytes a client
    sends, e.g. read with ``MSG_PEEK`` before the handshake); None if ``data``
    is not a complete-enough ClientHello or has no ALPN extension.

    Python's ``ssl`` cannot show the offered ALPN list to an SNI callback, so
    this is how a worker can tell a TLS-ALPN-01 validation from a client.
    """
    try:
        if len(data) < 5 or data[0] != 0x16:            # handshake record
            return None
        body = data[5:5 + int.from_bytes(data[3:5], "big")]
        if not body or body[0] != 0x01:                 # ClientHello
            return None
        pos = 4 + 2 + 32                                # header, version, random
        pos += 1 + body[pos]                            # session id
        pos += 2 + int.from_bytes(body[pos:pos + 2], "big")   # cipher suites
        pos += 1 + body[pos]                            # compression methods
        end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= min(end, len(body)):
            ext_type = int.from_bytes(body[pos:pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2:pos + 4], "big")
            ext = body[pos + 4:pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type != 16:                          # application_layer_protocol_negotiation
                continue
            names, i = [], 2
            while i < len(ext):
                n = ext[i]
                names.append(ext[i + 1:i + 1 + n].decode("ascii", "replace"))
                i += 1 + n
            return names
    except IndexError:
        return None
    return None


def offers_acme_tls(data: bytes) -> bool:
    """True if the ClientHello in ``data`` offers exactly ALPN ``acme-tls/1`` (RFC 8737 §3)."""
    return client_hello_alpn(data) == [ACME_TLS_ALPN]
