"""Helper children of the master: processes without proxy listeners that do
work which is neither proxying nor supervising (the ACME client, the stats
server, the active health checks).

Theory of operation
-------------------
``Helpers`` is a small table of named helpers, driven by the arbiter's loop
like the workers are: ``ensure(name, main, key)`` forks a child that runs
``main()`` and exits with its return value; ``reaped(pid, status)`` takes the
exit of one of ours and schedules a respawn with a back-off (0.5 s doubling to
60 s for helpers that die young, at once after ``STABLE_AFTER`` seconds);
``tick(now)`` respawns what is due and SIGKILLs what did not stop in time.
``ensure`` with a different ``key`` (a HUP changed the helper's settings)
stops the running child with TERM and starts the new one when it has exited,
so two copies never run at once.  ``stop()`` tells every helper to stop and
never respawns them again.

The master stays synchronous: no thread and no gevent here.  A helper child
may start threads (the ACME helper does); it starts from the master's state at
fork time, with the worker signal dispositions reset by ``in_child``.

The stats helper (``stats_main``) serves -expvarAddr from the shared memory.

The health helper (``health_main``) runs the -outHealthCheck checks and
publishes them in the shared memory's health table (``httptp.health``).

The resolver helper (``resolver_main``) runs while -out has DNS or SRV names:
it resolves them again and again and publishes the addresses in the shared
upstream table (``httptp.discovery``).  The master writes that table too, at
start and on HUP, so it stops this helper first with ``stop_now`` (one writer
at a time) and starts it again after.

The ACME helper: ``autocert_enabled(config)`` says whether it runs
(``-inType=https`` with no ``-inTLSCert``); ``open_http_socket`` binds the
``-autocertHTTPAddr`` socket in the master before any fork, so the port is
held across helper restarts; ``acme_main(config, sock)`` is what the child
runs (it imports ``httptp.acme``, and so the ``acme`` library, in the child
only).
"""

from __future__ import annotations

import math
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from httptp.settings import ADDR_TYPE
from httptp.supervisor import proctitle
from httptp.supervisor.procs import Backoff, flush_std as _flush_std, kill as _kill

STABLE_AFTER = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0
STOP_GRACE = 5.0           # TERM → SIGKILL for a helper being replaced or stopped


@dataclass
class Helper:
    name: str
    main: Callable[[], int]
    key: object = None
    pid: int | None = None
    started: float = 0.0
    respawn_at: float | None = None
    deadline: float = math.inf          # SIGKILL after this (set when told to stop)
    killed: bool = False
    retired: bool = False               # stopped for good: never respawned
    replacement: tuple | None = field(default=None)   # (main, key) to start after the exit
    backoff: Backoff = field(
        default_factory=lambda: Backoff(STABLE_AFTER, BACKOFF_FIRST, BACKOFF_MAX))


class Helpers:
    """The master's helper children.

    ``in_child(name)`` runs first in every new child (reset signals, close
    the proxy listeners); ``fork_guard()`` is a context manager around
    ``fork()`` (the arbiter's ``signals.blocked``).
    """

    def __init__(self, log: Callable[[str], None], *,
                 in_child: Callable[[str], None] | None = None,
                 fork_guard: Callable[[], ContextManager] | None = None) -> None:
        self.log = log
        self.in_child = in_child or (lambda name: None)
        self.fork_guard = fork_guard
        self.helpers: dict[str, Helper] = {}
        self.stopping = False

    # -- the table --------------------------------------------------------------

    def ensure(self, name: str, main: Callable[[], int], key: object = None) -> None:
        """Run ``main`` as helper ``name``; restart it if ``key`` changed."""
        if self.stopping:
            return
        helper = self.helpers.get(name)
        if helper is None or helper.retired and helper.pid is None:
            helper = self.helpers[name] = Helper(name, main, key)
            self._spawn(helper)
            return
        if helper.retired or helper.key != key:
            helper.replacement = (main, key)
            helper.retired = False
            if helper.pid is not None:
                self.log(f"{self._label(helper)}: settings changed; restarting it")
                self._tell(helper, signal.SIGTERM, STOP_GRACE)
            else:
                self._replace(helper)

    def remove(self, name: str) -> None:
        """Stop helper ``name`` (TERM, SIGKILL after ``STOP_GRACE``) for good."""
        helper = self.helpers.get(name)
        if helper is None or helper.retired:
            return
        helper.retired = True
        helper.replacement = None
        helper.respawn_at = None
        if helper.pid is not None:
            self._tell(helper, signal.SIGTERM, STOP_GRACE)
        else:
            del self.helpers[name]

    def stop(self, signum: int = signal.SIGTERM, grace: float = STOP_GRACE) -> None:
        """Tell every helper to stop; none is respawned after this."""
        self.stopping = True
        for helper in self.helpers.values():
            helper.retired = True
            helper.replacement = None
            helper.respawn_at = None
            if helper.pid is not None:
                self._tell(helper, signum, min(grace, STOP_GRACE))

    def stop_now(self, name: str, timeout: float = STOP_GRACE) -> None:
        """Stop helper ``name`` and wait (at most ``timeout``, then SIGKILL) until
        it has exited: after this it writes nothing.  The next ``ensure``
        starts it again.  Blocks the master briefly; for a HUP only."""
        helper = self.helpers.pop(name, None)
        if helper is None or helper.pid is None:
            return
        self.log(f"{self._label(helper)}: stopping it for the reload")
        _kill(helper.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(helper.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.01)
        _kill(helper.pid, signal.SIGKILL)
        try:
            os.waitpid(helper.pid, 0)
        except ChildProcessError:
            pass

    def alive(self) -> int:
        return sum(1 for h in self.helpers.values() if h.pid is not None)

    def busy(self) -> bool:
        """Something is due soon (the arbiter then loops faster)."""
        return any(h.respawn_at is not None or h.deadline < math.inf
                   for h in self.helpers.values())

    def pid_of(self, name: str) -> int | None:
        helper = self.helpers.get(name)
        return helper.pid if helper else None

    # -- the arbiter's loop --------------------------------------------------------

    def reaped(self, pid: int, how: str) -> bool:
        """``pid`` exited (``how`` says how); False if it was not a helper."""
        helper = next((h for h in self.helpers.values() if h.pid == pid), None)
        if helper is None:
            return False
        helper.pid = None
        helper.deadline = math.inf
        helper.killed = False
        lived = time.monotonic() - helper.started
        if helper.replacement is not None:
            self.log(f"{self._label(helper, pid)} {how}; starting its replacement")
            self._replace(helper)
        elif helper.retired or self.stopping:
            self.log(f"{self._label(helper, pid)} {how}")
            del self.helpers[helper.name]
        else:
            delay = helper.backoff.next(lived)
            when = "now" if delay == 0 else f"in {delay:g} s"
            self.log(f"{self._label(helper, pid)} {how} after {lived:.1f} s; respawning {when}")
            helper.respawn_at = time.monotonic() + delay
        return True

    def tick(self, now: float) -> None:
        for helper in list(self.helpers.values()):
            if helper.pid is not None and now > helper.deadline and not helper.killed:
                self.log(f"{self._label(helper)} did not stop in time; killing it")
                _kill(helper.pid, signal.SIGKILL)
                helper.killed = True
            if helper.respawn_at is not None and now >= helper.respawn_at and not self.stopping:
                helper.respawn_at = None
                self._spawn(helper)

    def kill_all(self) -> None:
        """At the master's exit: SIGKILL whatever still runs (only after a bug)."""
        for helper in self.helpers.values():
            if helper.pid is not None:
                _kill(helper.pid, signal.SIGKILL)

    # -- internals --------------------------------------------------------------------

    def _replace(self, helper: Helper) -> None:
        helper.main, helper.key = helper.replacement
        helper.replacement = None
        helper.backoff.failures = 0
        self._spawn(helper)

    def _spawn(self, helper: Helper) -> None:
        _flush_std()
        guard = self.fork_guard() if self.fork_guard else _nothing()
        try:
            with guard:
                pid = os.fork()
                if pid == 0:
                    self._child(helper)
        except OSError as err:
            delay = helper.backoff.next(0.0)
            self.log(f"cannot start the {helper.name} helper: fork: {err}; retrying in {delay:g} s")
            helper.respawn_at = time.monotonic() + delay
            return
        helper.pid = pid
        helper.started = time.monotonic()
        helper.deadline = math.inf
        helper.killed = False
        self.log(f"{self._label(helper)} started")

    def _child(self, helper: Helper) -> None:
        code = 1
        try:
            self.in_child(helper.name)
            proctitle.set_title(f"httptp: {helper.name} helper")
            code = helper.main()
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = (f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"
                     if frames else "")
            self.log(f"{helper.name} helper (pid {os.getpid()}) crashed: "
                     f"{type(exc).__name__}: {exc}{where}")
            code = 1
        finally:
            _flush_std()
            os._exit(code if isinstance(code, int) else (0 if code is None else 1))

    def _tell(self, helper: Helper, signum: int, grace: float) -> None:
        helper.deadline = min(helper.deadline, time.monotonic() + grace)
        _kill(helper.pid, signum)

    @staticmethod
    def _label(helper: Helper, pid: int | None = None) -> str:
        return f"{helper.name} helper (pid {pid or helper.pid})"


# -- the ACME helper ---------------------------------------------------------------------

ACME = "acme"


def autocert_enabled(config) -> bool:
    """ACME runs for ``-inType=https`` without ``-inTLSCert``."""
    return getattr(config, "in_type", None) == "https" and not config.in_tls_cert


def acme_key(config) -> tuple:
    """The settings the running ACME helper was started with (a HUP changing
    one of them restarts it)."""
    return (config.autocert_cache_dir, config.autocert_host_regexp,
            config.autocert_directory, config.autocert_directory_ca,
            config.autocert_email, config.autocert_renew_before, config.in_addr)


def open_http_socket(text: str, flag: str = "-autocertHTTPAddr"):
    """Bind and listen on a helper's address (``-autocertHTTPAddr``,
    ``-expvarAddr``); None when it is empty.

    Raises ``ListenError`` with the operator's one-line reason, naming ``flag``.
    """
    from httptp.netaddr import parse_address
    from httptp.supervisor.sockets import ListenError, resolve, tcp_listener
    if not text:
        return None
    try:
        address = parse_address(text, "http", allow_port0=True)
    except ValueError as err:
        raise ListenError(f"{flag}: {err}") from None
    try:
        family, sockaddr = resolve(address.host, address.port)
        return tcp_listener(family, sockaddr, reuse_port=False, backlog=128)
    except ListenError as err:
        raise ListenError(str(err).replace("-in:", f"{flag}:", 1)) from None
    except OSError as err:
        raise ListenError(f"{flag}: cannot listen on {text}: "
                          f"{err.strerror or err}") from None


STATS = "stats"


def stats_main(stats, sock, cmdline: list[str], config=None, started: float | None = None,
               listening: str | None = None) -> Callable[[], int]:
    """What the stats helper child runs: /expvar, /prometheus, /healthz and the
    status page on the -expvarAddr socket, read from the shared memory
    (DESIGN.md §7).  ``config``, ``started`` (the master's start, wall time)
    and ``listening`` (the bound -in, port 0 resolved) feed the status page's
    header."""
    info = status_info(config, started, listening)

    def main() -> int:
        from httptp.statsserver import serve
        proctitle.set_title(f"httptp: stats [{sock.getsockname()[0]}:{sock.getsockname()[1]}]")
        serve(sock, stats, cmdline, info)
        return 0
    return main


HEALTH = "health"


def health_key(config, generation: int) -> tuple:
    """What the running health helper was started with.  ``generation`` is the
    master's configuration generation: every HUP restarts the checker, so it
    takes the TLS files read again, as the workers do (the states it
    published carry over: ``httptp.health.Checker``)."""
    return (config.out_health_check, config.out_health_check_interval,
            config.out_health_check_timeout, config.out_health_check_rise,
            config.out_health_check_fall, config.out_type, generation)


def health_main(config, stats, tls) -> Callable[[], int]:
    """What the health helper child runs: -outHealthCheck every
    -outHealthCheckInterval, from one process (gevent is imported in the child only)."""
    def main() -> int:
        from httptp.health import Checker, stale_after
        from httptp.io import health_probe
        from httptp.logs import error_logger
        interval = config.out_health_check_interval
        timeout = config.out_health_check_timeout
        checker = Checker(stats, path=config.out_health_check,
                          rise=config.out_health_check_rise, fall=config.out_health_check_fall,
                          out_type=config.out_type,
                          log=error_logger("health", config.log_format, "warning"),
                          stale_after=stale_after(config))
        health_probe.run(checker, _health_probe(config, tls), interval, timeout)
        return 0
    return main


def _health_probe(config, tls):
    from httptp.io import health_probe
    client = tls.client if tls is not None else None
    server_name = tls.server_name if tls is not None else ""
    path, timeout = config.out_health_check, config.out_health_check_timeout
    if ADDR_TYPE[config.out_type].teleport:
        from httptp.teleport.handshake import BY_NAME
        return health_probe.TeleportProbe(
            path, timeout, compress=BY_NAME[config.out_compress],
            max_header_size=config.out_max_header_size, max_body_size=config.out_max_body_size,
            tls_context=client, server_name=server_name)
    if client is not None:
        from httptp.tls import cooperative
        client = cooperative(client)        # in this child only: gevent sockets
    return health_probe.HTTPProbe(path, timeout, client, server_name)


def status_info(config, started: float | None = None, listening: str | None = None) -> dict:
    """What the status page says of the configuration: -in, -out and their types."""
    if config is None:
        return {"started": started, "in": listening}
    return {"in": listening or config.in_addr, "in_type": config.in_type,
            "out": list(config.out), "out_type": config.out_type, "started": started}


def stats_key(config) -> tuple:
    """The settings the running stats helper was started with: a HUP changing
    -out or -outType restarts it (its page shows them; the chart starts over)."""
    return (config.expvar_addr, config.out_type, tuple(config.out))


RESOLVER = "resolver"


def resolver_key(config) -> tuple:
    """The settings the running resolver helper was started with."""
    return (config.out, config.out_type, config.resolver, config.out_resolve_interval,
            config.out_max_addrs, config.log_format)


def resolver_main(stats, config) -> Callable[[], int]:
    """What the resolver helper child runs (httptp.discovery.run_helper)."""
    def main() -> int:
        from httptp.discovery import run_helper
        from httptp.logs import error_logger
        signal.signal(signal.SIGTERM, _exit_now)   # stop between (or in) lookups: status 0
        return run_helper(stats, config, error_logger("resolver", config.log_format))
    return main


def make_cache_dir(path: str) -> None:
    """Create the autocert cache directory 0700 before any fork (workers write
    requests into it before the helper may have started).  Raises ListenError."""
    from httptp.supervisor.sockets import ListenError
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)
    except OSError as err:
        raise ListenError(f"-autocertCacheDir: cannot create {path}: "
                          f"{err.strerror or err}") from None


def acme_main(config, http_sock) -> Callable[[], int]:
    """What the ACME helper child runs (imports the ACME code in the child only)."""
    def main() -> int:
        from httptp.acme import helper_main
        return helper_main(config, http_sock)
    return main


# -- small things --------------------------------------------------------------------------

def _exit_now(signum, frame):
    raise SystemExit(0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
