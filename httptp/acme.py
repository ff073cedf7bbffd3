"""ACME (RFC 8555) certificates for ``-inType=https`` without ``-inTLSCert``.

Runs only in the ACME helper process that the master forks (see
``httptp.supervisor.helpers``): plain blocking code and threads, no gevent.
Workers never talk to the CA; they read the cache directory through
``httptp.certstore.AutocertStore`` and ask for a new host by dropping a
request file there.

Theory of operation
-------------------
``AcmeManager`` owns the account (its key is ``acme_account+key`` in the
cache directory), the orders (one at a time in the whole helper, so never two
for one host), and the renewals.  ``AcmeManager.run()`` loops:

- collect requests: ``acme+requests/<host>`` files written by workers, and a
  datagram on ``acme+helper.sock`` that wakes the loop at once;
- order a certificate for each requested host that matches
  ``-autocertHostRegexp`` and has none yet;
- renew every cached certificate that expires within ``-autocertRenewBefore``
  (checked at start, then when the next one is due and at least every
  ``check_interval``);
- a failed order is retried with a per-host exponential back-off
  (``BACKOFF_FIRST`` doubling up to ``BACKOFF_MAX``); the old certificate, if
  any, keeps being served meanwhile.  A host without one is published in
  ``acme+failed/<host>`` for exactly its back-off (the loop removes the file
  when the back-off ends): meanwhile the workers fail its handshakes at once
  instead of waiting for a certificate that is not coming.  Its request is
  used up, and the next order comes from the first handshake after the
  back-off (as Go's autocert does), so a name nobody asks for again is not
  ordered again.

Certificates are written atomically (temp file + rename) as ONE file per host,
``<cacheDir>/<host>``: the private key (PEM ``EC PRIVATE KEY``) followed by the
full chain.  This is also the layout of Go's ``autocert.DirCache``, so a cache
made by the Go original is picked up (and the other way round).  One file
means a worker can never load a new certificate with an old key.

Challenges: HTTP-01 is answered by ``ChallengeHTTPServer`` on the
``-autocertHTTPAddr`` socket the master bound (tokens in memory; every other
GET or HEAD is redirected to https, other methods get 400).  TLS-ALPN-01 (RFC 8737; certbot's ``acme``
package dropped it, so ``tls_alpn_01_certificate`` builds the certificate with
``cryptography``) is published as ``acme+tls-alpn-01/<host>`` for the workers
to serve to clients that offer ALPN ``acme-tls/1``.  HTTP-01 is tried first
when the HTTP address is set; after a failure the next attempt tries the
other type.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import json
import os
import re
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
from typing import Callable, Iterable
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from httptp.certstore import (ACCOUNT_KEY, ACME_TLS_ALPN, ALPN_DIR, FAILED_DIR,  # noqa: F401
                              HELPER_SOCKET, REQUESTS_DIR, normalize_host)

# -- cache directory layout (shared with httptp.certstore) ----------------------

DIR_MODE = 0o700
FILE_MODE = 0o600

ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

BACKOFF_FIRST = 30.0           # first retry of a failed order, doubling...
BACKOFF_MAX = 3600.0           # ...up to an hour
CHECK_INTERVAL = 300.0         # renewal checks at least this often
RENEW_MIN_GAP = 3600.0         # never renew one host twice within this time
ORDER_TIMEOUT = 90.0           # one order, authorizations to certificate
MAX_PENDING = 100              # distinct new hosts waiting for an order
REQUEST_SCAN = 5.0             # look at acme+requests/ at least this often

def host_matches(pattern: "re.Pattern[str]", host: str) -> bool:
    """Go's ``regexp.MatchString``: unanchored search."""
    return pattern.search(host) is not None


def ensure_dir(path: str) -> None:
    """Create ``path`` (and parents) with mode 0700; tighten it if it exists."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & 0o777 != DIR_MODE and st.st_uid == os.getuid():
        os.chmod(path, DIR_MODE)


def write_atomic(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to a temp file in the same directory, fsync, rename over ``path``."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="+tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def read_bundle(path: str) -> tuple[object, list[x509.Certificate]] | None:
    """``(private key, [leaf, chain...])`` from a key+chain PEM file, None if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        key = serialization.load_pem_private_key(data, password=None)
        certs = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError, TypeError):
        return None
    if not certs:
        return None
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf_pub = certs[0].public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub != leaf_pub:
        return None
    return key, certs


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.value.get_values_for_type(x509.DNSName)]


def renewal_due(cert: x509.Certificate, renew_before: float) -> float:
    """Unix time at which ``cert`` enters its renewal window."""
    return cert.not_valid_after_utc.timestamp() - renew_before


# -- TLS-ALPN-01 (RFC 8737) --------------------------------------------------------

def tls_alpn_01_certificate(host: str, key_authorization: str,
                            lifetime: float = 7 * 86400) -> bytes:
    """Key + self-signed certificate (PEM) answering TLS-ALPN-01 for ``host``.

    RFC 8737 §3: subjectAltName with exactly the dNSName ``host``, and the
    critical acmeIdentifier extension (1.3.6.1.5.5.7.1.31) whose value is the
    DER OCTET STRING of SHA-256(key authorization).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER,
                                                      b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    return key_pem(key) + cert.public_bytes(serialization.Encoding.PEM)


def _register_tls_alpn_01():
    """The challenge and response classes certbot's ``acme`` no longer ships."""
    from acme import challenges

    existing = challenges.Challenge.TYPES.get("tls-alpn-01")
    if existing is not None and hasattr(existing, "key_authorization"):
        return existing

    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"     # the response body is "{}" (keyAuthorization is dropped)

    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        response_cls = TLSALPN01Response
        typ = "tls-alpn-01"

        def validation(self, account_key, **kwargs):
            return self.key_authorization(account_key)

    challenges.ChallengeResponse.register(TLSALPN01Response)
    challenges.Challenge.register(TLSALPN01)
    return TLSALPN01


# -- HTTP-01 server -----------------------------------------------------------------

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
MAX_DISCARD = 65536            # request body read (and dropped) before a 400


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "httptp"
    sys_version = ""
    timeout = 10
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def __getattr__(self, name: str):
        # The base class answers 501 for a method without a do_<METHOD>; every
        # method but GET and HEAD is refused here instead.
        if name.startswith("do_"):
            return self._refuse
        raise AttributeError(name)

    def _refuse(self) -> None:
        """400 "use https", as Go's autocert answers: a redirect would turn a POST
        into a GET (301, 302) or, with 308, seem to work while the client keeps
        sending its bodies in the clear first."""
        self._discard_body()
        self._send(400, b"use https\n", body=True)

    def _discard_body(self) -> None:
        """Read a small body, so that closing the connection with it unread does
        not reset it before the client has read the answer."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if 0 < length <= MAX_DISCARD:
            self.rfile.read(length)

    def _answer(self, body: bool) -> None:
        target = self.path
        if not target.startswith("/"):
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if target.startswith(CHALLENGE_PREFIX):
            token = target[len(CHALLENGE_PREFIX):].split("?", 1)[0]
            answer = self.server.tokens.get(token)
            if answer is None:
                self._send(404, b"no such challenge\n", body)
            else:
                self._send(200, answer.encode("ascii"), body)
            return
        host = (self.headers.get("Host") or "").strip()
        name = _strip_port(host)
        if not name or not re.fullmatch(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]", name):
            self._send(400, b"missing or bad Host header\n", body)
            return
        port = self.server.https_port
        location = f"https://{name}{'' if port in (None, 443) else f':{port}'}{target}"
        self._send(301, b"use https\n", body, location=location)

    def _send(self, status: int, data: bytes, body: bool, location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format, *args) -> None:   # noqa: A002 - one line per request is noise
        pass


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ChallengeHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTP-01 answers, redirects of GET and HEAD to https (301) and 400 for
    other methods, on a socket bound by the master.

    One thread per connection, at most ``max_connections`` at once (more are
    closed at once), each with a 10 s socket timeout.
    """

    daemon_threads = True
    max_connections = 64

    def __init__(self, sock: socket.socket, https_port: int | None = None) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.tokens: dict[str, str] = {}
        self.https_port = https_port
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def server_bind(self) -> None:     # the master bound it
        pass

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(0.5,),
                                  name="acme-http-01", daemon=True)
        thread.start()
        return thread


# -- the manager ---------------------------------------------------------------------

class OrderError(Exception):
    """An order failed; ``str()`` says why in one line."""


class AcmeManager:
    """Account, orders and renewals for one cache directory.

    ``http_server`` (a started ``ChallengeHTTPServer``) enables HTTP-01;
    TLS-ALPN-01 is always offered (the workers serve it from the cache dir).
    """

    def __init__(self, cache_dir: str, *, directory_url: str, host_regexp: str = "^.*$",
                 directory_ca: str = "", email: str = "", renew_before: float = 30 * 86400,
                 http_server: ChallengeHTTPServer | None = None,
                 challenges: Iterable[str] | None = None,
                 log: Callable[[str], None] | None = None,
                 check_interval: float = CHECK_INTERVAL, renew_min_gap: float = RENEW_MIN_GAP,
                 backoff_first: float = BACKOFF_FIRST, backoff_max: float = BACKOFF_MAX,
                 order_timeout: float = ORDER_TIMEOUT) -> None:
        self.cache_dir = cache_dir
        self.directory_url = directory_url
        self.directory_ca = directory_ca
        self.email = email
        self.host_regexp = re.compile(host_regexp)
        self.renew_before = renew_before
        self.http_server = http_server
        if challenges is None:
            challenges = (["http-01"] if http_server is not None else []) + ["tls-alpn-01"]
        self.challenges = list(challenges)
        self.log = log or _stderr_log
        self.check_interval = check_interval
        self.renew_min_gap = renew_min_gap
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.order_timeout = order_timeout
        self.orders = 0                             # orders placed by this process
        self._client = None
        self._failures: dict[str, int] = {}         # host → failed orders in a row
        self._retry_at: dict[str, float] = {}       # host → monotonic time of the next try
        self._obtained_at: dict[str, float] = {}    # host → monotonic time of the last success
        self._warned_window: set[str] = set()
        self._published: set[str] = set()           # hosts with an acme+failed/<host>
        self._wake: socket.socket | None = None
        self._stop = threading.Event()
        ensure_dir(cache_dir)
        ensure_dir(os.path.join(cache_dir, REQUESTS_DIR))
        ensure_dir(os.path.join(cache_dir, ALPN_DIR))
        ensure_dir(os.path.join(cache_dir, FAILED_DIR))
        self._remove_temp_files()
        self._clear_failures()       # our back-off starts empty: so do the workers'

    # -- account ------------------------------------------------------------------

    def account_key(self):
        """The account key, created (0600) on first use."""
        import josepy as jose
        path = os.path.join(self.cache_dir, ACCOUNT_KEY)
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(path, key_pem(key))
            self.log(f"created the ACME account key {path}")
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return jose.JWKEC(key=key), jose.ES256
        return jose.JWKRSA(key=key), jose.RS256

    def client(self):
        """A registered ``acme.client.ClientV2`` (registered once, then reused)."""
        if self._client is not None:
            return self._client
        from acme import client as acme_client, errors, messages
        jwk, alg = self.account_key()
        verify = self.directory_ca or True
        net = acme_client.ClientNetwork(jwk, alg=alg, verify_ssl=verify,
                                        user_agent="httptp-acme", timeout=30)
        directory = acme_client.ClientV2.get_directory(self.directory_url, net)
        acme = acme_client.ClientV2(directory, net)
        contact = (f"mailto:{self.email}",) if self.email else ()
        reg = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        try:
            regr = acme.new_account(reg)
            self.log(f"registered an ACME account at {self.directory_url}: {regr.uri}")
        except errors.ConflictError as existing:
            regr = messages.RegistrationResource(uri=existing.location, body=reg)
            acme.net.account = acme.query_registration(regr)
        self._client = acme
        return acme

    # -- orders -----------------------------------------------------------------------

    def cert_path(self, host: str) -> str:
        return os.path.join(self.cache_dir, host)

    def obtain(self, host: str, challenge_types: Iterable[str] | None = None) -> str:
        """Order a certificate for ``host`` and write it to the cache; its path.

        Raises OrderError (or an acme/requests error) on failure.
        """
        from acme import crypto_util, messages
        tls_alpn_cls = _register_tls_alpn_01()
        types = list(challenge_types or self.challenges)
        acme = self.client()
        key = ec.generate_private_key(ec.SECP256R1())
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        csr = crypto_util.make_csr(pkcs8, [host])
        self.orders += 1
        self.log(f"ordering a certificate for {host} (challenges: {', '.join(types)})")
        order = acme.new_order(csr)
        cleanups: list[Callable[[], None]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                challb = _pick_challenge(authz.body.challenges, types, tls_alpn_cls)
                if challb is None:
                    offered = ", ".join(c.chall.typ if hasattr(c.chall, "typ") else "?"
                                        for c in authz.body.challenges)
                    raise OrderError(f"no usable challenge for {host} (offered: {offered})")
                response, validation = challb.chall.response_and_validation(acme.net.key)
                cleanups.append(self._publish(host, challb, validation))
                acme.answer_challenge(challb, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.order_timeout)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for cleanup in cleanups:
                cleanup()
        if not order.fullchain_pem:
            raise OrderError(f"the CA sent no certificate for {host}")
        path = self.cert_path(host)
        write_atomic(path, key_pem(key) + order.fullchain_pem.encode("ascii"))
        leaf = x509.load_pem_x509_certificate(order.fullchain_pem.encode("ascii"))
        self.log(f"obtained a certificate for {host}, valid until "
                 f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
        self._obtained_at[host] = time.monotonic()
        return path

    def _publish(self, host: str, challb, validation) -> Callable[[], None]:
        typ = challb.chall.typ
        if typ == "http-01":
            token = challb.chall.encode("token")
            self.http_server.tokens[token] = validation
            return lambda: self.http_server.tokens.pop(token, None)
        path = os.path.join(self.cache_dir, ALPN_DIR, host)
        write_atomic(path, tls_alpn_01_certificate(host, validation))

        def unpublish() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return unpublish

    # -- decisions ------------------------------------------------------------------------

    def cached_hosts(self) -> list[str]:
        """Hosts with a certificate file in the cache that still match the regexp."""
        hosts = []
        for entry in os.scandir(self.cache_dir):
            host = normalize_host(entry.name)
            if host == entry.name and entry.is_file() and host_matches(self.host_regexp, host):
                hosts.append(host)
        return sorted(hosts)

    def requested_hosts(self) -> list[str]:
        """Hosts workers asked for; bad or non-matching requests are deleted."""
        directory = os.path.join(self.cache_dir, REQUESTS_DIR)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.stat().st_mtime)
        except FileNotFoundError:
            return []
        hosts = []
        for entry in entries:
            host = normalize_host(entry.name)
            if host != entry.name or not host_matches(self.host_regexp, host) \
                    or len(hosts) >= MAX_PENDING:
                _unlink(entry.path)
                continue
            hosts.append(host)
        return hosts

    def due(self, host: str, now_wall: float | None = None) -> float:
        """Wall-clock time at which ``host`` needs an order (0 or past: now)."""
        bundle = read_bundle(self.cert_path(host))
        if bundle is None or host not in cert_names(bundle[1][0]):
            return 0.0
        leaf = bundle[1][0]
        due = renewal_due(leaf, self.renew_before)
        lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        if self.renew_before >= lifetime and host not in self._warned_window:
            self._warned_window.add(host)
            self.log(f"warning: -autocertRenewBefore ({self.renew_before:g} s) is not shorter "
                     f"than the lifetime of {host}'s certificate ({lifetime:.0f} s); "
                     f"renewing it at most every {self.renew_min_gap:g} s")
        obtained = self._obtained_at.get(host)
        if obtained is not None:
            wall_now = time.time() if now_wall is None else now_wall
            due = max(due, wall_now + (obtained + self.renew_min_gap - time.monotonic()))
        return due

    def attempt(self, host: str) -> bool:
        """One order for ``host`` unless it is backing off; True on success."""
        if self.backing_off(host):
            return False
        self._withdraw_failure(host)            # an order runs: handshakes wait for it
        failures = self._failures.get(host, 0)
        types = self.challenges[failures % len(self.challenges):] + \
            self.challenges[:failures % len(self.challenges)]
        try:
            self.obtain(host, types)
        except Exception as err:                        # noqa: BLE001 - logged, retried
            failures += 1
            self._failures[host] = failures
            delay = min(self.backoff_first * 2 ** (failures - 1), self.backoff_max)
            self._retry_at[host] = time.monotonic() + delay
            serving = read_bundle(self.cert_path(host)) is not None
            self.log(f"order for {host} failed ({failures} in a row): {_one_line(err)}; "
                     f"retrying in {delay:g} s" +
                     ("; the current certificate keeps serving" if serving else ""))
            if not serving:
                self._publish_failure(host, failures, delay, err)
            if _is_account_problem(err):
                self._client = None
            return False
        self._failures.pop(host, None)
        self._retry_at.pop(host, None)
        return True

    def backing_off(self, host: str) -> bool:
        return time.monotonic() < self._retry_at.get(host, 0.0)

    def _failure_path(self, host: str) -> str:
        return os.path.join(self.cache_dir, FAILED_DIR, host)

    def _publish_failure(self, host: str, failures: int, delay: float, err: Exception) -> None:
        """``acme+failed/<host>`` for the workers (``httptp.certstore``): while
        it exists, handshakes for ``host`` fail at once.  ``retry_at`` (wall
        clock) is for their log line only: ``expire_failures`` removes the file
        when the back-off ends, on this process's monotonic clock."""
        record = {"retry_at": time.time() + delay, "failures": failures,
                  "error": _one_line(err)[:500]}
        try:
            write_atomic(self._failure_path(host), json.dumps(record).encode("utf-8"))
        except OSError as e:
            self.log(f"cannot publish the failure for {host} ({e}); "
                     "its handshakes wait for a certificate instead of failing at once")
            return
        self._published.add(host)

    def _withdraw_failure(self, host: str) -> None:
        self._published.discard(host)
        _unlink(self._failure_path(host))

    def expire_failures(self) -> float:
        """Withdraw the failures whose back-off has ended (the next handshake
        asks again); seconds until the next one ends."""
        next_in = CHECK_INTERVAL
        for host in list(self._published):
            left = self._retry_at.get(host, 0.0) - time.monotonic()
            if left <= 0:
                self._withdraw_failure(host)
            else:
                next_in = min(next_in, left)
        return next_in

    def _clear_failures(self) -> None:
        self._published.clear()
        try:
            entries = list(os.scandir(os.path.join(self.cache_dir, FAILED_DIR)))
        except FileNotFoundError:
            return
        for entry in entries:
            _unlink(entry.path)

    def serve_requests(self) -> float:
        """Order for the hosts workers asked for; seconds until the next look.

        A request is used up by the order, failed or not: during the back-off
        the workers fail the host's handshakes themselves, and the first one
        after it asks again.  (A request that comes during the back-off anyway,
        from a worker that had not seen the failure yet, is dropped too: that
        worker sees the failure while it waits.)
        """
        for host in self.requested_hosts():
            if self._stop.is_set():
                break
            if read_bundle(self.cert_path(host)) is None and not self.backing_off(host):
                self.attempt(host)
            _unlink(os.path.join(self.cache_dir, REQUESTS_DIR, host))
        return REQUEST_SCAN

    def check_renewals(self) -> float:
        """Renew the cached certificates that are due; seconds until the next check."""
        wall = time.time()
        next_in = self.check_interval
        for host in self.cached_hosts():
            if self._stop.is_set():
                break
            due = self.due(host, wall)
            if due <= wall:
                self.attempt(host)
                due = self.due(host)
                retry = self._retry_at.get(host)
                if retry is not None:
                    next_in = min(next_in, max(0.5, retry - time.monotonic()))
            next_in = min(next_in, max(0.5, due - time.time()))
        return next_in

    def run_once(self) -> float:
        """Serve the requests and the due renewals; seconds until the next work."""
        return min(self.serve_requests(), self.check_renewals(), self.expire_failures())

    # -- loop -----------------------------------------------------------------------------

    def open_wake_socket(self) -> None:
        path = os.path.join(self.cache_dir, HELPER_SOCKET)
        _unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            os.chmod(path, FILE_MODE)
        except OSError as err:
            sock.close()
            self.log(f"cannot bind {path} ({err}); polling for requests every second")
            return
        self._wake = sock

    def run(self) -> None:
        """Loop until ``stop()``."""
        self.open_wake_socket()
        try:
            renew_at = 0.0                     # at start: check every cached certificate
            while not self._stop.is_set():
                try:
                    wait = self.serve_requests()
                    if time.monotonic() >= renew_at:
                        renew_at = time.monotonic() + self.check_renewals()
                    wait = min(wait, self.expire_failures())   # last: this pass's failures too
                except Exception as err:                  # noqa: BLE001 - keep the helper up
                    self.log(f"error: {_one_line(err)}")
                    wait = 5.0
                wait = min(wait, max(0.0, renew_at - time.monotonic()))
                self._sleep(min(wait, 1.0 if self._wake is None else wait))
        finally:
            if self._wake is not None:
                self._wake.close()
                _unlink(os.path.join(self.cache_dir, HELPER_SOCKET))
            self._clear_failures()    # nobody backs off now: workers ask (and wait) again

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            step = min(left, 1.0)         # to notice stop()
            if self._wake is None:
                time.sleep(step)
                continue
            self._wake.settimeout(step)
            try:
                self._wake.recv(512)
                return                    # a worker asked: look at the requests now
            except (socket.timeout, InterruptedError):
                continue
            except OSError:
                time.sleep(step)

    def stop(self) -> None:
        self._stop.set()

    def _remove_temp_files(self) -> None:
        for directory in (self.cache_dir, os.path.join(self.cache_dir, ALPN_DIR)):
            for entry in os.scandir(directory):
                if entry.name.startswith(".tmp-") and entry.name.endswith("+tmp"):
                    _unlink(entry.path)


def _pick_challenge(challbs, types: list[str], tls_alpn_cls):
    by_type = {}
    for challb in challbs:
        typ = getattr(challb.chall, "typ", None)
        if typ == "tls-alpn-01" and not isinstance(challb.chall, tls_alpn_cls):
            continue            # parsed before the class was registered: cannot answer
        by_type.setdefault(typ, challb)
    for typ in types:
        if typ in by_type:
            return by_type[typ]
    return None


def _is_account_problem(err: Exception) -> bool:
    text = str(err)
    return any(word in text for word in ("accountDoesNotExist", "unauthorized", "badNonce",
                                          "Connection", "directory"))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _stderr_log(message: str) -> None:
    sys.stderr.write(f"httptp: acme: {message}\n")
    sys.stderr.flush()


# -- the helper process ----------------------------------------------------------------

def helper_main(config, http_sock: socket.socket | None) -> int:
    """Entry point of the ACME helper child (forked by the master).

    SIGTERM and SIGQUIT stop it (SIGINT is ignored, as in workers: the master
    decides); an order in progress is abandoned (the cache is only ever
    changed by atomic renames).
    """
    manager_box: list[AcmeManager] = []

    def on_stop(signum, frame):
        if manager_box:
            manager_box[0].stop()
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, on_stop)
    server = None
    if http_sock is not None:
        port = config.listen.port if getattr(config.listen, "port", None) else None
        server = ChallengeHTTPServer(http_sock, https_port=port)
        server.start()
        _stderr_log(f"answering HTTP-01 on {_sock_name(http_sock)}")
    manager = AcmeManager(
        config.autocert_cache_dir, directory_url=config.autocert_directory,
        host_regexp=config.autocert_host_regexp, directory_ca=config.autocert_directory_ca,
        email=config.autocert_email, renew_before=config.autocert_renew_before,
        http_server=server)
    manager_box.append(manager)
    try:
        manager.run()
    except SystemExit:
        pass
    finally:
        if server is not None:
            server.socket.close()
    return 0


def _sock_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


__all__ = ["AcmeManager", "ChallengeHTTPServer", "OrderError", "helper_main",
           "tls_alpn_01_certificate", "normalize_host", "write_atomic", "ensure_dir",
           "ACCOUNT_KEY", "REQUESTS_DIR", "ALPN_DIR", "HELPER_SOCKET", "ACME_TLS_ALPN"]

