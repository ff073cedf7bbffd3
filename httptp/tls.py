"""TLS for https/teleports listeners and upstreams (DESIGN.md §8).

Theory of operation
-------------------
The master builds every ``ssl.SSLContext`` before it forks (``build``), with
the stdlib only: it must never import gevent.  A context built before the
fork is shared by all workers, OpenSSL state included, so whatever ticket key
it holds is the same in every worker and a session resumes on any of them.

In the worker, ``TLS.for_worker()`` turns each context into a
``gevent.ssl.SSLContext`` *in place* (``ctx.__class__ = gevent.ssl.SSLContext``:
gevent's class is a subclass with ``__slots__ = ()``, so the object and its
OpenSSL ``SSL_CTX`` stay the same).  Why not ``ctx.sslsocket_class =
gevent.ssl.SSLSocket`` on a stdlib context: the stdlib's ``wrap_socket`` calls
``sslsocket_class._create(...)``, which gevent's SSLSocket does not have
(AttributeError, checked with gevent 26.9).  Building new gevent contexts in
the worker from the same files would work too but would give every worker its
own random ticket key.  After the swap, ``wrap_socket`` returns gevent's
cooperative SSLSocket: handshakes and reads yield to the hub.

Session tickets
---------------
Python's ``ssl`` cannot set the ticket key, so we call OpenSSL through ctypes:
``SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS=59, 80, key)`` on the
``SSL_CTX *`` that CPython keeps right after ``PyObject_HEAD`` in its
``PySSLContext`` (checked before use: ``SSL_CTX_get_options`` through the
pointer must equal ``ctx.options``).  The function comes from the libssl that
``_ssl`` is linked with (``dlsym`` on the ``_ssl`` module searches its
dependencies).  OpenSSL's 80-byte key is 16 bytes of key name, 32 of HMAC key,
32 of AES key.  From a 32-byte secret ``k`` we make them as
``HMAC-SHA256(k, "httptp ticket name")[:16] || HMAC-SHA256(k, "httptp ticket
hmac") || HMAC-SHA256(k, "httptp ticket aes")``.

* ``-inTLSSessionTicketKey=S``: ``k = SHA-256(S)`` as the Go original derives
  it; fixed, so two httptp processes (or restarts) with the same S accept each
  other's tickets.  If the ctypes call does not work, httptp refuses to start.
* otherwise: the master draws a random 32-byte secret; period ``n`` (12 h
  each, counted from the Unix epoch) uses ``k = HMAC-SHA256(secret, n)``.
  Every worker computes the same key for the same period without talking, and
  a greenlet applies it at each period boundary.  A ticket from the previous
  period is no longer accepted: that client does one full handshake.  If the
  ctypes call does not work, this is logged once and OpenSSL's own random key
  (made in the master, so shared by the workers) is used, without rotation.

OpenSSL encrypts and decrypts tickets with the keys of the context the
connection was created with (the default context here), even when the SNI
callback switches to another certificate's context; we still set the key on
every context, including those the ``fallback`` hook returns.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import hmac
import os
import ssl
import sys
import time
import weakref
from typing import Callable

from httptp.errors import ConfigError
from httptp.settings import ADDR_TYPE

TICKET_PERIOD = 12 * 3600.0
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEY_SIZE = 80

# TLS 1.2: forward secrecy and AEAD only.  TLS 1.3 suites are OpenSSL's defaults.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"
ALPN_HTTP = ["http/1.1"]


def _log(message: str) -> None:
    sys.stderr.write(f"httptp: {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- ticket keys

class TicketKeyError(Exception):
    """The ticket key could not be set through OpenSSL."""


_libssl = None


def _ssl_lib():
    global _libssl
    if _libssl is None:
        import _ssl
        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        _libssl = lib
    return _libssl


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of a Python SSLContext (first field after PyObject_HEAD).

    That layout is CPython's (Modules/_ssl.c, PySSLContext); elsewhere the
    memory read would be meaningless, so refuse instead of guessing.  The
    options comparison below then checks the pointer before it is used."""
    if sys.implementation.name != "cpython":
        raise TicketKeyError(f"not CPython ({sys.implementation.name})")
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or _ssl_lib().SSL_CTX_get_options(ptr) != ctx.options:
        raise TicketKeyError("cannot find the SSL_CTX of a Python SSLContext")
    return ptr


def apply_ticket_key(ctx: ssl.SSLContext, key80: bytes) -> None:
    """Set OpenSSL's session ticket key (name 16 + HMAC 32 + AES 32 bytes) of ``ctx``."""
    if len(key80) != TICKET_KEY_SIZE:
        raise ValueError(f"a ticket key has {TICKET_KEY_SIZE} bytes, not {len(key80)}")
    try:
        lib = _ssl_lib()
        ptr = _ssl_ctx_pointer(ctx)
        buf = ctypes.create_string_buffer(key80, TICKET_KEY_SIZE)
        ok = lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_SIZE, buf)
    except (OSError, AttributeError) as e:
        raise TicketKeyError(f"cannot call OpenSSL: {e}") from None
    if ok != 1:
        raise TicketKeyError("OpenSSL refused the ticket key")


def read_ticket_key(ctx: ssl.SSLContext) -> bytes:
    """The 80-byte ticket key ``ctx`` uses now (for tests)."""
    buf = ctypes.create_string_buffer(TICKET_KEY_SIZE)
    if _ssl_lib().SSL_CTX_ctrl(_ssl_ctx_pointer(ctx), _SSL_CTRL_GET_TLSEXT_TICKET_KEYS,
                               TICKET_KEY_SIZE, buf) != 1:
        raise TicketKeyError("OpenSSL did not return the ticket key")
    return buf.raw


def expand_ticket_key(secret32: bytes) -> bytes:
    """32 secret bytes → OpenSSL's 80-byte key: name 16 + HMAC 32 + AES 32."""
    def part(label: bytes) -> bytes:
        return hmac.new(secret32, b"httptp ticket " + label, hashlib.sha256).digest()
    return part(b"name")[:16] + part(b"hmac") + part(b"aes")


class TicketKeys:
    """The fixed key of -inTLSSessionTicketKey, or keys rotating every ``period``."""

    def __init__(self, text: str = "", period: float = TICKET_PERIOD):
        if text:
            self.fixed: bytes | None = expand_ticket_key(hashlib.sha256(text.encode()).digest())
            self.secret = b""
        else:
            self.fixed = None
            self.secret = os.urandom(32)
        self.period = period

    def period_number(self, now: float | None = None) -> int:
        return int((time.time() if now is None else now) // self.period)

    def key(self, n: int | None = None) -> bytes:
        if self.fixed is not None:
            return self.fixed
        if n is None:
            n = self.period_number()
        return expand_ticket_key(hmac.new(self.secret, n.to_bytes(8, "big"),
                                          hashlib.sha256).digest())

    def next_boundary(self, now: float | None = None) -> float:
        """Seconds from ``now`` to the next period boundary."""
        now = time.time() if now is None else now
        return (self.period_number(now) + 1) * self.period - now


# --------------------------------------------------------------------------- certificates

def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"-{flag}: cannot read {path}: {e.strerror or e}") from None


def check_pair(cert_flag: str, cert_path: str, key_flag: str, key_path: str,
               now: datetime.datetime | None = None):
    """Validate a certificate/key pair; return the leaf certificate
    (``cryptography.x509.Certificate``).  One-line ConfigError naming the flag."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert_pem = _read(cert_flag, cert_path)
    key_pem = _read(key_flag, key_path)
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"-{cert_flag}: {cert_path} is not a PEM certificate")
    leaf = certs[0]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    not_after, not_before = leaf.not_valid_after_utc, leaf.not_valid_before_utc
    if now >= not_after:
        raise ConfigError(f"-{cert_flag}: {cert_path} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC")
    if now < not_before:
        raise ConfigError(f"-{cert_flag}: {cert_path} is not valid before "
                          f"{not_before:%Y-%m-%d %H:%M:%S} UTC")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"-{key_flag}: {key_path} is encrypted; give an unencrypted key") from None
    except Exception:
        raise ConfigError(f"-{key_flag}: {key_path} is not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(f"-{key_flag}: {key_path} does not match the certificate {cert_path}")
    return leaf


def cert_names(cert) -> list[str]:
    """DNS names of a certificate, lower case: SAN DNS entries, else the CN."""
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [str(n).lower().rstrip(".") for n in names]


def name_matches(pattern: str, name: str) -> bool:
    """``pattern`` (lower case; ``*.example.com`` covers exactly one label) matches ``name``."""
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == name


def _load_verify(ctx: ssl.SSLContext, flag: str, path: str) -> None:
    _read(flag, path)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(f"-{flag}: {path} holds no usable CA certificate ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    return getattr(e, "reason", None) or str(e).strip().splitlines()[0]


def error_text(e: BaseException) -> str:
    """A TLS failure in a few words: OpenSSL's reason and the verification message."""
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return "timed out"
    verify = getattr(e, "verify_message", None)
    reason = getattr(e, "reason", None)
    if verify:
        return f"certificate verify failed: {verify}"
    if reason:
        return reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or e.__class__.__name__


def _hardened(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


# --------------------------------------------------------------------------- server side

class ServerTLS:
    """The contexts of an https or teleports listener.

    ``pairs``: (certificate file, key file), the first is the default.
    ``fallback(name)`` is asked for an SNI name no static certificate covers
    (autocert); it returns a context or None (then the default answers).
    """

    def __init__(self, pairs: list[tuple[str, str]], *, alpn: list[str] | None = None,
                 client_ca: str = "", ticket_key: str = "",
                 fallback: Callable[[str], ssl.SSLContext | None] | None = None,
                 log: Callable[[str], None] = _log):
        self.fallback = fallback
        self.log = log
        self.alpn = alpn
        self.client_ca = client_ca
        self.contexts: list[tuple[list[str], ssl.SSLContext]] = []
        for cert_path, key_path in pairs:
            leaf = check_pair("inTLSCert", cert_path, "inTLSKey", key_path)
            ctx = self.new_context()
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as e:
                raise ConfigError(f"-inTLSCert: cannot load {cert_path} with {key_path}: "
                                  f"{_reason(e)}") from None
            self.contexts.append((cert_names(leaf), ctx))
        if self.contexts:
            self.default = self.contexts[0][1]
        elif fallback is not None:
            self.default = self.new_context()    # no certificate: everything via the fallback
        else:
            raise ConfigError("-inTLSCert: no certificate")
        self.default.sni_callback = self._sni
        self.tickets = TicketKeys(ticket_key)
        self._keyed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.ticket_keys_work = True
        try:
            self._apply_ticket_keys()
        except TicketKeyError as e:
            self.ticket_keys_work = False
            if ticket_key:
                raise ConfigError(f"-inTLSSessionTicketKey: cannot set the key: {e}") from None
            self.log(f"TLS session ticket keys cannot be set ({e}); using OpenSSL's random "
                     "key shared by the workers, without rotation")

    autocert = None          # the AutocertStore when certificates come from ACME

    def enable_autocert(self, store) -> None:
        """Serve ACME certificates from ``store``; TLS-ALPN-01 challenges are
        answered on connections whose ClientHello offers only ``acme-tls/1``
        (see ``wrap_challenge``)."""
        self.autocert = store
        self.challenge = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _hardened(self.challenge)
        self.challenge.set_alpn_protocols(["acme-tls/1"])

        self.challenge.sni_callback = self._challenge_sni

    def flush_logs(self) -> None:
        """Worker heartbeat: the autocert store's rate-limited lines (their counts)."""
        if self.autocert is not None:
            self.autocert.flush_logs()

    def _challenge_sni(self, sslsock, name, _ctx):
        ctx = self.autocert.challenge_context(name) if name else None
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslsock.context = ctx
        return None

    def wrap_challenge(self, sock):
        """A server-side TLS socket that answers a TLS-ALPN-01 validation."""
        return self.challenge.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def new_context(self) -> ssl.SSLContext:
        """A server context with our settings and no certificate (the fallback may use it)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _hardened(ctx)
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.alpn:
            ctx.set_alpn_protocols(self.alpn)
        if self.client_ca:
            _load_verify(ctx, "inTLSClientCA", self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # -- ticket keys -----------------------------------------------------------
    def _apply_ticket_keys(self) -> None:
        key = self.tickets.key()
        for ctx in self.all_contexts():
            apply_ticket_key(ctx, key)
            self._keyed[ctx] = key

    def all_contexts(self) -> list[ssl.SSLContext]:
        out = [ctx for _, ctx in self.contexts]
        if not out:
            out.append(self.default)
        return out

    def rotate_forever(self) -> None:
        """Worker greenlet: apply the next period's key at each boundary."""
        import gevent
        if self.tickets.fixed is not None or not self.ticket_keys_work:
            return
        while True:
            gevent.sleep(self.tickets.next_boundary() + 0.01)
            try:
                self._apply_ticket_keys()
            except TicketKeyError as e:
                self.log(f"TLS session ticket key rotation failed: {e}")
                return

    # -- SNI --------------------------------------------------------------------
    def select(self, name: str | None) -> ssl.SSLContext | None:
        """The context for an SNI name (None: keep the default)."""
        if not name:
            return None
        for names, ctx in self.contexts:
            for pattern in names:
                if name_matches(pattern, name):
                    return ctx
        if self.fallback is not None:
            ctx = self.fallback(name)
            if ctx is not None and self.ticket_keys_work:
                key = self.tickets.key()
                if self._keyed.get(ctx) != key:
                    try:
                        apply_ticket_key(ctx, key)
                        self._keyed[ctx] = key
                    except TicketKeyError:
                        pass
            return ctx
        return None

    def _sni(self, sslsock, name, _ctx):
        try:
            sslsock.sni_name = name         # for the access log (ClientConn.tls_info)
        except AttributeError:              # an object that takes no new attribute
            pass
        try:
            ctx = self.select(name)
            if ctx is not None and ctx is not sslsock.context:
                sslsock.context = ctx
        except Exception as e:   # never let a callback error abort the handshake silently
            self.log(f"TLS SNI callback failed for {name!r}: {e.__class__.__name__}: {e}")
        return None

    # -- worker ---------------------------------------------------------------------
    def for_worker(self, sockets: bool = True) -> None:
        """After the fork: make the contexts hand out gevent-cooperative sockets
        (``sockets``: for callers that serve TLS sockets in greenlets).  The
        worker's https and teleports listeners keep stdlib contexts: their
        transports run ``SSLObject``s over memory BIOs (httptp.io.transport).  The ACME TLS-ALPN context is cooperative either way: a
        validation is answered by a greenlet."""
        if sockets:
            for ctx in self.all_contexts():
                cooperative(ctx)
            self.default.sni_callback = self._sni   # again: gevent wraps it for its sockets
        if self.autocert is not None:
            cooperative(self.challenge)
            self.challenge.sni_callback = self._challenge_sni

    def wrap(self, sock):
        """A server-side TLS socket over ``sock``; the caller runs ``do_handshake()``
        under a deadline."""
        return self.default.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def cooperative(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Turn a stdlib context into gevent's SSLContext in place (same SSL_CTX): its
    ``wrap_socket`` then gives gevent SSLSockets.  Worker side only."""
    import gevent.ssl
    if not isinstance(ctx, gevent.ssl.SSLContext):
        callback = ctx.sni_callback
        ctx.__class__ = gevent.ssl.SSLContext
        if callback is not None:
            ctx.sni_callback = callback
    return ctx


# --------------------------------------------------------------------------- building

def server_tls(config, fallback: Callable[[str], ssl.SSLContext | None] | None = None,
               log: Callable[[str], None] = _log) -> ServerTLS:
    """The ServerTLS of an https/teleports listener; ConfigError (one line) if unusable."""
    if len(config.in_tls_cert) != len(config.in_tls_key):
        raise ConfigError(f"-inTLSCert: {len(config.in_tls_cert)} certificate(s) but "
                          f"-inTLSKey has {len(config.in_tls_key)} key(s); they must pair up")
    autocert = None
    if not config.in_tls_cert:
        if ADDR_TYPE[config.in_type].teleport:
            raise ConfigError("-inTLSCert: teleports needs a certificate")
        if fallback is None:
            # https without certificates: autocert (ACME), as in the original.
            # The orders run in the master's ACME helper; this store, in each
            # worker, serves what the helper put in -autocertCacheDir.
            from httptp.certstore import AutocertStore
            built: list[ServerTLS] = []

            def make_context(cert_path: str, key_path: str) -> ssl.SSLContext:
                ctx = built[0].new_context()        # our ciphers, ALPN, client CA
                ctx.load_cert_chain(cert_path, key_path)
                return ctx
            autocert = AutocertStore(config.autocert_cache_dir, config.autocert_host_regexp,
                                     make_context=make_context, sleep=_cooperative_sleep, log=log)
            fallback = autocert.context_for
    server = ServerTLS(list(zip(config.in_tls_cert, config.in_tls_key)),
                       alpn=None if ADDR_TYPE[config.in_type].teleport else ALPN_HTTP,
                       client_ca=getattr(config, "in_tls_client_ca", ""),
                       ticket_key=config.in_tls_session_ticket_key, fallback=fallback, log=log)
    if autocert is not None:
        built.append(server)
        server.enable_autocert(autocert)
    return server


def _cooperative_sleep(seconds: float) -> None:
    """The autocert store waits for the ACME helper inside an SNI callback, in a
    worker: let the hub serve other connections meanwhile."""
    import gevent
    gevent.sleep(seconds)


def client_context(config, log: Callable[[str], None] = _log) -> ssl.SSLContext | None:
    """The context for https/teleports upstreams (None for other -outType).

    Verification is on: against ``-outTLSCA`` only when given (the system roots
    are then not trusted), else the system roots.  ``-outTLSInsecure`` turns it off."""
    if not ADDR_TYPE[config.out_type].tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _hardened(ctx)
    if not ADDR_TYPE[config.out_type].teleport:
        ctx.set_alpn_protocols(ALPN_HTTP)
    if config.out_tls_ca:
        _load_verify(ctx, "outTLSCA", config.out_tls_ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.out_tls_cert or config.out_tls_key:
        if not (config.out_tls_cert and config.out_tls_key):
            flag = "outTLSKey" if config.out_tls_cert else "outTLSCert"
            raise ConfigError(f"-{flag}: -outTLSCert and -outTLSKey go together")
        check_pair("outTLSCert", config.out_tls_cert, "outTLSKey", config.out_tls_key)
        try:
            ctx.load_cert_chain(config.out_tls_cert, config.out_tls_key)
        except ssl.SSLError as e:
            raise ConfigError(f"-outTLSCert: cannot load {config.out_tls_cert}: "
                              f"{_reason(e)}") from None
    if config.out_tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log("warning: -outTLSInsecure: upstream TLS certificates are NOT verified "
            "(anyone on the path can read and change the traffic)")
    return ctx


class TLS:
    """What the master hands to each worker: the listener's ServerTLS and the
    upstream client context, either may be None."""

    def __init__(self, server: ServerTLS | None, client: ssl.SSLContext | None,
                 server_name: str = ""):
        self.server = server
        self.client = client
        self.server_name = server_name      # -outTLSServerName; "" → each -out host

    def for_worker(self, server_sockets: bool = True) -> None:
        if self.server is not None:
            self.server.for_worker(server_sockets)
        if self.client is not None:
            cooperative(self.client)


def build(config, fallback: Callable[[str], ssl.SSLContext | None] | None = None,
          log: Callable[[str], None] = _log) -> TLS | None:
    """Every TLS object ``config`` needs (None when it needs none).  Called in the
    master before binding and forking, and again on HUP.  Raises ConfigError."""
    server = None
    if ADDR_TYPE[config.in_type].tls:
        server = server_tls(config, fallback, log)
    elif getattr(config, "in_tls_client_ca", ""):
        raise ConfigError("-inTLSClientCA: only for -inType=https or teleports")
    client = client_context(config, log)
    if server is None and client is None:
        return None
    return TLS(server, client, config.out_tls_server_name)
