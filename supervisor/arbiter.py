"""The master process (arbiter): owns the listeners, the shared stats memory
and the worker processes.  It proxies nothing.

Theory of operation
-------------------
``run()`` binds every listener and creates the stats map, forks one worker per
slot, then loops: wait on the signal pipe (at most a second), dispatch each
signal to ``handle_<name>`` (see ``signals.SIGNALS``), reap dead children,
then ``tick()``: notice workers that became ready, kill stuck ones, respawn
slots whose back-off expired, advance a rolling reload or a stop.

The master is synchronous and single-threaded, and never imports gevent: a hub
or a thread in the master would be inherited by every worker (DESIGN §2,
STYLE §8).  Signal handlers do nothing; the loop reads the signal numbers
from a wakeup pipe.

A *slot* is a place for one serving worker and (TCP) its own SO_REUSEPORT
socket.  ``Slot.pid`` is the worker serving it.  Other live workers are
either the one new worker of a rolling reload (``self.pending``) or old ones
that were told to stop and have a kill deadline.  Every process gets its own
stats block, claimed before the fork and released when it is reaped.

USR2 replaces the master itself (``handle_usr2``, supervisor/upgrade.py): a
new master exec'd from the code on disk inherits the listening sockets, and
this one drains and exits once the new one's workers are all ready.

A worker that cannot boot exits with ``WORKER_BOOT_ERROR`` (3).  If no worker
of the configuration it was given has ever been ready (``self.booted``), that
configuration cannot serve: at start (or in a TTIN or respawn before any
worker was ready) the master stops and exits 3; during a reload it aborts the
reload and keeps the old configuration.  A configuration that has booted is
respawned with back-off as after any death (the cause may pass: a full disk,
a missing directory put back).

Time is ``time.monotonic()`` throughout, the same clock the workers write
their heartbeats with (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import math
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from httptp import __version__
from httptp.errors import ConfigError
from httptp.logs import error_logger
from httptp.stats import STATE_READY, Stats
from httptp.supervisor import proctitle, systemd
from httptp.supervisor.procs import (WORKER_BOOT_ERROR, Backoff, die_with_parent,
                                     flush_std as _flush_std, kill as _kill, raise_open_files,
                                     report_boot_error)
from httptp.supervisor.signals import SIGNALS, SignalQueue
from httptp.supervisor import helpers as helper_procs
from httptp.supervisor import upgrade
from httptp.supervisor.sockets import ListenError, open_listeners

STABLE_AFTER = 5.0         # a worker that lived this long is respawned at once
BACKOFF_FIRST = 0.1        # then 0.2, 0.4 ... for workers dying young, per slot
BACKOFF_MAX = 10.0
QUIT_GRACE = 1.0           # QUIT: how long workers get before SIGKILL
REAP_GRACE = 5.0           # after the last SIGKILL, how long we wait to reap
WATCHDOG_MIN_STALE = 3.0   # a heartbeat older than max(this, WatchdogSec=) is stale


_log = error_logger("", "text")


def log(message: str, level: str = "") -> None:
    """One line on stderr, where supervisord and journald collect it (-logFormat);
    ``level`` (JSON only): info, or warning / error for a line that starts
    "warning:" / "error:"."""
    if not level:
        level = ("warning" if message.startswith("warning:") else
                 "error" if message.startswith("error:") else "info")
    _log(message, level)


def set_log_format(fmt: str) -> None:
    global _log
    _log = error_logger("master" if fmt == "json" else "", fmt)


@dataclass
class Worker:
    pid: int
    slot: int
    block: int
    generation: int
    started: float
    ready_at: float | None = None
    deadline: float = math.inf     # SIGKILL after this: set when told to stop
    killed: bool = False

    @property
    def label(self) -> str:
        return f"worker {self.slot} (pid {self.pid}, gen {self.generation})"


@dataclass
class Slot:
    index: int
    pid: int | None = None         # the worker serving this slot
    respawn_at: float | None = None
    backoff: Backoff = field(
        default_factory=lambda: Backoff(STABLE_AFTER, BACKOFF_FIRST, BACKOFF_MAX))


class Arbiter:
    """``Arbiter(config, reload_config).run()`` is the whole master.

    ``reload_config()`` returns a fresh Config on HUP (or raises).
    ``worker_main`` is called in each forked child as ``worker_main(config,
    listener, stats, block, slot, generation, upstream_ids) -> exit code``,
    plus ``tls=`` (an ``httptp.tls.TLS``) when the configuration uses TLS;
    by default ``httptp.workers.worker.run``, imported in the child.
    ``tls`` is what ``httptp.tls.build(config)`` returned (built before binding,
    so certificate errors stop the start); a HUP rebuilds it from the new config.
    ``stats`` is an existing ``httptp.stats.Stats`` to use instead of a new map.
    ``resolved`` is what ``httptp.discovery.resolve_start`` returned for the
    -out names (the cli resolves them before anything binds); None: resolve
    them at start.
    """

    heartbeat_timeout = 30.0   # a ready worker silent this long is killed
    boot_timeout = 30.0        # a worker not ready this long after fork is killed
    ready_timeout = 10.0       # READY=1 to systemd after this even if not all are ready

    def __init__(self, config, reload_config: Callable[[], object],
                 worker_main: Callable[..., int] | None = None, *, stats=None,
                 tls=None, resolved=None) -> None:
        self.config = config
        self.resolved = resolved                  # -out names → their first addresses
        set_log_format(getattr(config, "log_format", "text"))
        self.tls = tls                            # httptp.tls.TLS or None: inherited by the fork
        self.reload_config = reload_config
        self.worker_main = worker_main
        self.stats = stats
        self.signals = SignalQueue()
        self.listeners = None
        self.workers: dict[int, Worker] = {}
        self.slots: dict[int, Slot] = {}
        self.max_slots = 1
        self.generation = 0
        # the generations that run self.config (an aborted reload gives the old
        # configuration a new number), and whether one of their workers was ready
        self.config_generations = {0}
        self.booted = False
        self.exit_status = 0                      # run()'s, after a stop
        self.upstream_ids: list[int] = []
        self.stopping: str | None = None          # None, "graceful" or "fast"
        self.stop_deadline = math.inf
        self.rolling = False                      # a HUP is replacing workers
        self.pending: int | None = None           # pid of the new worker it waits for
        self.previous = None                      # what reload() replaced, for abort_reload()
        self.reload_again = False
        self.ready_deadline: float | None = None  # until READY=1 was sent
        self.helpers = helper_procs.Helpers(log, in_child=self._helper_child,
                                            fork_guard=self.signals.blocked)
        self.autocert_sock = None                 # -autocertHTTPAddr, bound before any fork
        self.stats_sock = None                    # -expvarAddr, bound before any fork
        self.started_wall = time.time()           # the status page's uptime
        self.watchdog = systemd.Watchdog()        # WatchdogSec= of the unit, if any
        self.watchdog_stale = False               # logged once per stale spell
        self.upgrade: upgrade.Upgrade | None = None   # USR2: the new master we started
        # USR2, in the new master: what the old one handed over, until we took over
        self.inherited = upgrade.take_inherited(log)
        self.old_master: int | None = None        # ... and, once we took over, until it exited

    # -- main loop ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; 0 after a stop, 1 if the listeners cannot be
        opened, ``WORKER_BOOT_ERROR`` (3) if the configuration cannot boot a worker."""
        try:
            self.start()
            self.loop()
            self.log_summary()
        except (ListenError, ConfigError) as err:
            log(str(err))
            return 1
        finally:
            self.shutdown()
        return self.exit_status

    def start(self) -> None:
        """Install signals, bind, create the stats map, fork the first workers."""
        self.signals.install()
        config = self.config
        self.listeners = self._open_listeners(config)
        if self.stats is None:
            self.stats = Stats.create(max_blocks=max(64, 4 * config.workers + 2),
                                      max_upstreams=getattr(config, "out_max_addrs", 64))
        self.max_slots = max(1, (self.stats.max_blocks - 1) // 2)
        self.upstream_ids = self._assign_upstreams(config, self.resolved)
        log(f"listening on {self.listeners.name} pid={os.getpid()}")
        log(self._version_note())
        warning = raise_open_files(config.concurrency, config.workers)
        if warning:
            log(f"warning: {warning}")
        self.sync_helpers()
        upgrade.close_unused(self.inherited)
        self._set_title()
        for index in range(config.workers):
            self.slots[index] = Slot(index)
            self.respawn(self.slots[index])
        self.ready_deadline = time.monotonic() + self.ready_timeout

    def loop(self) -> None:
        while not (self.stopping and not self.workers and not self.helpers.alive()):
            for signum in self.signals.wait(self._timeout()):
                self.dispatch(signum)
            self.reap()
            now = time.monotonic()
            if self.stopping and now > self.stop_deadline + REAP_GRACE:
                log(f"gave up waiting for {len(self.workers)} killed workers to exit")
                return
            self.tick(now)

    def _timeout(self) -> float:
        busy = (self.stopping or self.rolling or self.ready_deadline is not None
                or self._upgrade_starting()
                or any(s.respawn_at is not None for s in self.slots.values())
                or self.helpers.busy())
        return min(0.05 if busy else 1.0, self.watchdog.due_in(time.monotonic()))

    def dispatch(self, signum: int) -> None:
        entry = SIGNALS.get(signum)
        if entry is not None:
            getattr(self, "handle_" + entry[0])()

    def tick(self, now: float) -> None:
        """Periodic work, after signals and reaping."""
        self.check_workers(now)
        self.helpers.tick(now)
        if not self.stopping:
            for slot in list(self.slots.values()):
                if slot.respawn_at is not None and now >= slot.respawn_at:
                    self.respawn(slot)
        if self.rolling:
            self.roll()
        self.upgrade_tick(now)
        self.notify_ready(now)
        self.notify_watchdog(now)

    def log_summary(self) -> None:
        """One line at exit: requests served in all, and by each worker block.

        Read from the shared memory, so it is also what the stats server will
        sum; a block keeps its counters across the processes that used it."""
        stats = self.stats
        per_block = []
        for block in range(stats.max_blocks):
            served = stats.block_counters(block)["inRequestSuccess"]
            if served:
                per_block.append(f"{block}={served}")
        totals = stats.totals()
        log(f"stopped: {totals['inRequestSuccess']} requests served, "
            f"{totals['inRequestStart']} started, "
            f"{totals['inRequestTimeoutError'] + totals['inRequestOtherError']} upstream errors; "
            f"per worker block: {' '.join(per_block) or 'none'}")

    def shutdown(self) -> None:
        """Close what the master owns; runs once, whatever way ``run()`` ends."""
        for worker in self.workers.values():   # only after a bug or "gave up"
            _kill(worker.pid, signal.SIGKILL)
        self.helpers.kill_all()
        for sock in (self.autocert_sock, self.stats_sock):
            if sock is not None:
                sock.close()
        if self.listeners is not None:
            self.listeners.close()
        self.signals.close()

    # -- signal handlers (called from the loop, never from a signal handler) ----

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        """Graceful like TERM; a second INT during the drain makes it fast."""
        self.stop(graceful=self.stopping is None)

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_hup(self) -> None:
        if self.stopping:
            log("HUP ignored: stopping")
        elif self.rolling:
            self.reload_again = True
            log("HUP: a reload is in progress; reloading again when it is done")
        else:
            self.reload()

    def handle_ttin(self) -> None:
        if self.stopping:
            return
        count = len(self.slots) + 1
        if count > self.max_slots:
            log(f"TTIN ignored: {self.max_slots} workers is the most this master can run")
        elif self.add_slot() is not None:
            log(f"TTIN: now {count} workers")

    def handle_ttou(self) -> None:
        if self.stopping:
            return
        if len(self.slots) <= 1:
            log("TTOU ignored: one worker is the least")
            return
        self.remove_slot(max(self.slots))
        log(f"TTOU: now {len(self.slots)} workers")

    def handle_usr1(self) -> None:
        for pid in self.workers:
            _kill(pid, signal.SIGUSR1)
        log(f"USR1: asked {len(self.workers)} workers to reopen their log files")

    def handle_chld(self) -> None:
        self.reap()

    # -- workers -------------------------------------------------------------------

    def spawn(self, index: int) -> Worker | None:
        """Fork a worker for slot ``index``; None (logged) if that failed."""
        try:
            block = self.stats.claim_block(0, index, self.generation)
        except RuntimeError as err:
            log(f"cannot start worker {index}: {err}", "error")
            return None
        listener = self.listeners.get(index)
        _flush_std()
        try:
            with self.signals.blocked():
                pid = os.fork()
                if pid == 0:
                    self._child(listener, block, index, self.generation)
        except OSError as err:
            self.stats.release_block(block)
            log(f"cannot start worker {index}: fork: {err}", "error")
            return None
        self.stats.set_block_pid(block, pid)
        worker = Worker(pid, index, block, self.generation, time.monotonic())
        self.workers[pid] = worker
        return worker

    def _child(self, listener, block: int, slot: int, generation: int) -> None:
        """In the new child: prepare, run the worker, and never return."""
        code = 1
        try:
            self.signals.reset_in_child()
            die_with_parent(signal.SIGTERM)
            self.listeners.keep_only(slot)
            for sock in (self.autocert_sock, self.stats_sock):   # the helpers', not a worker's
                if sock is not None:
                    sock.close()
            proctitle.set_title(f"httptp: worker {slot} gen {generation} [{self.config.in_addr}]")
            code = self._run_worker(listener, block, slot, generation)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            _report_crash(slot, exc)
            code = 1
        finally:
            _flush_std()
            os._exit(_exit_status(code))

    def _run_worker(self, listener, block: int, slot: int, generation: int) -> int:
        """In the child: the worker's exit status."""
        try:
            main = self.worker_main or _default_worker_main()
        except Exception as exc:     # its code does not import: it cannot boot either
            report_boot_error(slot, generation, exc, getattr(self.config, "log_format", "text"))
            return WORKER_BOOT_ERROR
        extra = {"tls": self.tls} if self.tls is not None else {}
        return main(self.config, listener, self.stats, block, slot, generation,
                    list(self.upstream_ids), **extra)

    def respawn(self, slot: Slot) -> None:
        """Give ``slot`` a serving worker now, or retry after the back-off."""
        slot.respawn_at = None
        worker = self.spawn(slot.index)
        if worker is None:
            slot.respawn_at = time.monotonic() + slot.backoff.next(0.0)
        else:
            slot.pid = worker.pid

    def reap(self) -> None:
        """Collect every exited child (non-blocking)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._notice_ready(worker, time.monotonic())   # before its block goes
                self.stats.release_block(worker.block)
                self.on_exit(worker, status)
            elif not self.upgrade_reaped(pid, status):
                self.helpers.reaped(pid, _describe_status(status))

    def on_exit(self, worker: Worker, status: int) -> None:
        """Log one line for a dead worker; replace it if its slot still needs it,
        unless it could not boot a configuration that never booted (``halt``,
        or ``abort_reload`` during a reload)."""
        boot_error = os.waitstatus_to_exitcode(status) == WORKER_BOOT_ERROR
        how = f"could not boot (exit status {WORKER_BOOT_ERROR})" if boot_error \
            else _describe_status(status)
        slot = self.slots.get(worker.slot)
        if worker.pid == self.pending:
            self.pending = None
            self.abort_reload(f"the new {worker.label} {how} before it was ready")
            return
        if slot is None or slot.pid != worker.pid:
            log(f"{worker.label} {how}")   # an old or removed worker we stopped
            return
        slot.pid = None
        if self.stopping:
            log(f"{worker.label} {how}")
            return
        if boot_error and not self._config_booted(worker):
            if not self.rolling:
                self.halt(worker, how)
                return
            self.abort_reload(f"the new {worker.label} {how}")   # the slot gets the old config
        if self._promote_pending(slot):
            log(f"{worker.label} {how}; its replacement is already starting")
            return
        lived = time.monotonic() - worker.started
        delay = slot.backoff.next(lived)
        self.stats.incr_restarts()
        when = "now" if delay == 0 else f"in {delay:g} s"
        log(f"{worker.label} {how} after {lived:.1f} s; respawning {when}", "warning")
        slot.respawn_at = time.monotonic() + delay

    def halt(self, worker: Worker, how: str) -> None:
        """A worker of a configuration that never booted could not boot: stop
        now, exit ``WORKER_BOOT_ERROR``, instead of respawning it for ever.
        Fast: no worker of this configuration is serving anything."""
        log(f"{worker.label} {how}, and no worker of this configuration has booted; "
            f"stopping with exit status {WORKER_BOOT_ERROR}", "error")
        self.exit_status = WORKER_BOOT_ERROR
        self.stop(graceful=False)

    def _config_booted(self, worker: Worker) -> bool:
        """Was a worker of ``worker``'s configuration ever ready?  True for an
        older configuration.  Looks at the live workers too: one may have
        become ready since the last tick."""
        if worker.generation not in self.config_generations or self.booted:
            return True
        now = time.monotonic()
        for other in list(self.workers.values()):
            self._notice_ready(other, now)
        return self.booted

    def _notice_ready(self, worker: Worker, now: float, info: dict | None = None) -> None:
        if worker.ready_at is not None:
            return
        if info is None:
            info = self.stats.block_info(worker.block)
        if info["state"] != STATE_READY:
            return
        worker.ready_at = now
        if worker.generation in self.config_generations:
            self.booted = True
        log(f"{worker.label} ready after {now - worker.started:.2f} s")

    def check_workers(self, now: float) -> None:
        """Notice readiness from the stats blocks; SIGKILL stuck workers."""
        for worker in list(self.workers.values()):
            info = self.stats.block_info(worker.block)
            self._notice_ready(worker, now, info)
            reason = self._kill_reason(worker, info["heartbeat"], now)
            if reason and not worker.killed:
                log(f"{worker.label} {reason}; killing it")
                _kill(worker.pid, signal.SIGKILL)
                worker.killed = True

    def _kill_reason(self, worker: Worker, heartbeat: float, now: float) -> str | None:
        if now > worker.deadline:
            return "did not stop in time after it was told to"
        if worker.ready_at is None:
            if now - worker.started > self.boot_timeout:
                return f"was not ready {self.boot_timeout:g} s after it started"
            return None
        silent = now - max(heartbeat, worker.ready_at)
        if silent > self.heartbeat_timeout:
            return f"sent no heartbeat for {silent:.0f} s"
        return None

    def _tell(self, worker: Worker, signum: int, grace: float) -> None:
        """Send ``signum`` and SIGKILL the worker if still alive ``grace`` s later."""
        worker.deadline = min(worker.deadline, time.monotonic() + grace)
        _kill(worker.pid, signum)

    # -- slots (TTIN, TTOU, HUP with a new -workers) -------------------------------

    def add_slot(self) -> Slot | None:
        index = min(set(range(len(self.slots) + 1)) - set(self.slots))
        try:
            self.listeners.add(index)
        except ListenError as err:
            log(str(err))
            return None
        slot = self.slots[index] = Slot(index)
        self.respawn(slot)
        return slot

    def remove_slot(self, index: int) -> None:
        """Stop slot ``index``'s workers gracefully and drop the slot now.

        The master closes its copy of the slot's socket right away: the
        worker's copy keeps it open until that worker stops accepting, and
        connections queued on it then are reset (unless tcp_migrate_req=1).
        Keeping the master's copy until the worker exited would only queue
        more connections that nobody accepts.
        """
        slot = self.slots.pop(index)
        for pid in (slot.pid, self._pending_for(index)):
            if pid is not None:
                self._tell(self.workers[pid], signal.SIGTERM, self.config.graceful_timeout)
        if self._pending_for(index) is not None:
            self.pending = None
        self.listeners.remove(index)

    def resize(self, count: int) -> None:
        count = max(1, min(count, self.max_slots))
        while len(self.slots) < count and self.add_slot() is not None:
            pass
        while len(self.slots) > count:
            self.remove_slot(max(self.slots))

    # -- reload (HUP) -----------------------------------------------------------------

    def reload(self) -> None:
        """Apply ``reload_config()`` by replacing the workers one slot at a time."""
        try:
            new = self.reload_config()
            refused = _restart_needed(self.config, new)
            if refused:
                raise ValueError(f"changing {refused} needs a restart")
            tls = _build_tls(new)      # certificates read again: renewed files are picked up
            upstream_ids = self._reassign_upstreams(new)
        except (Exception, SystemExit) as err:
            log(f"error: reload failed, keeping the running configuration: {_one_line(err)}",
                "error")
            self.notify_reload_refused(_one_line(err))
            self.sync_helpers()        # the resolver helper, if _reassign_upstreams stopped it
            return
        systemd.reloading("reloading")
        self.previous = (self.config, self.upstream_ids, self.tls, self.config_generations,
                         self.booted)
        self.config, self.upstream_ids, self.tls = new, upstream_ids, tls
        self.generation += 1
        self.config_generations, self.booted = {self.generation}, False
        self._set_title()
        log(f"reloading: replacing the workers with generation {self.generation}")
        self.sync_helpers()
        self.rolling = True
        self.resize(new.workers)
        self.roll()

    def roll(self) -> None:
        """One step of the rolling reload: swap in a ready new worker, start the next."""
        if self.pending is not None:
            new = self.workers[self.pending]
            if new.ready_at is None:
                return
            self.pending = None
            self._promote(new)
        stale = [s for i, s in sorted(self.slots.items())
                 if s.pid is not None and self.workers[s.pid].generation < self.generation]
        if not stale:
            self.finish_reload()
            return
        new = self.spawn(stale[0].index)
        if new is None:
            self.abort_reload(f"cannot start a new worker {stale[0].index}")
        else:
            self.pending = new.pid

    def _promote(self, new: Worker) -> None:
        """``new`` serves its slot; the worker it replaces drains."""
        slot = self.slots[new.slot]
        old = self.workers.get(slot.pid) if slot.pid is not None else None
        slot.pid = new.pid
        if old is not None:
            self._tell(old, signal.SIGTERM, self.config.graceful_timeout)

    def _pending_for(self, index: int) -> int | None:
        if self.pending is not None and self.workers[self.pending].slot == index:
            return self.pending
        return None

    def _promote_pending(self, slot: Slot) -> bool:
        """The old worker of ``slot`` died mid-reload: its new one takes over at once."""
        pid = self._pending_for(slot.index)
        if pid is None:
            return False
        self.pending = None
        slot.pid = pid
        return True

    def finish_reload(self) -> None:
        self.rolling = False
        self.previous = None
        log(f"reloaded: {len(self.slots)} workers run generation {self.generation}")
        systemd.ready(self._status())
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def abort_reload(self, reason: str) -> None:
        """Keep serving with what runs; later respawns use the old configuration."""
        self.rolling = False
        self.reload_again = False
        if self.pending is not None:          # a new worker still booting: not wanted now
            self._tell(self.workers[self.pending], signal.SIGTERM, self.config.graceful_timeout)
            self.pending = None
        (self.config, self.upstream_ids, self.tls, self.config_generations,
         self.booted) = self.previous
        self.previous = None
        self.generation += 1   # the old configuration, respawned from now on, gets its own number
        self.config_generations.add(self.generation)
        self.sync_helpers()
        self._set_title()
        log(f"reload aborted, keeping the running workers: {reason}", "warning")
        systemd.ready(f"reload aborted, keeping the running workers: {reason}; {self._status()}")

    # -- helper processes (ACME) ------------------------------------------------------

    def sync_helpers(self) -> None:
        """Run the ACME helper iff autocert is on (-inType=https, no -inTLSCert).

        The -autocertHTTPAddr socket is bound here, before the first fork, and
        kept for the master's lifetime.  At start a bind error stops httptp
        (ListenError); on a HUP it is logged and HTTP-01 stays off.
        """
        if self.stopping:
            return
        config = self.config
        self._sync_stats_helper()
        self._sync_health_helper()
        self._sync_resolver_helper()
        if not helper_procs.autocert_enabled(config):
            self.helpers.remove(helper_procs.ACME)
            return
        try:
            helper_procs.make_cache_dir(config.autocert_cache_dir)
            if self.autocert_sock is None and config.autocert_http_addr:
                self.autocert_sock = (
                    self._inherited_socket("autocertHTTPAddr", config.autocert_http_addr)
                    or helper_procs.open_http_socket(config.autocert_http_addr))
        except ListenError as err:
            if not self.workers:
                raise
            log(f"{err}")
        self.helpers.ensure(helper_procs.ACME,
                            helper_procs.acme_main(config, self.autocert_sock),
                            key=helper_procs.acme_key(config))

    def _sync_stats_helper(self) -> None:
        """The stats server runs in a helper child iff -expvarAddr is set (a HUP
        cannot change it: restart_needed).  Bound before the first fork; a bind
        error stops the start with one line."""
        addr = getattr(self.config, "expvar_addr", "")
        if not addr:
            return
        if self.stats_sock is None:
            self.stats_sock = (self._inherited_socket("expvarAddr", addr)
                               or helper_procs.open_http_socket(addr, "-expvarAddr"))
            host, port = self.stats_sock.getsockname()[:2]
            log(f"stats on http://{host}:{port}/expvar and /prometheus, status page on /")
        self.helpers.ensure(helper_procs.STATS,
                            helper_procs.stats_main(self.stats, self.stats_sock, list(sys.argv),
                                                    self.config, self.started_wall,
                                                    getattr(self.listeners, "name", None)),
                            key=helper_procs.stats_key(self.config))

    def _sync_health_helper(self) -> None:
        """The active health checks run in a helper child iff -outHealthCheck is set;
        a HUP restarts it with the new settings (``health_key``)."""
        if not getattr(self.config, "out_health_check", ""):
            self.helpers.remove(helper_procs.HEALTH)
            return
        self.helpers.ensure(helper_procs.HEALTH,
                            helper_procs.health_main(self.config, self.stats, self.tls),
                            key=helper_procs.health_key(self.config, self.generation))

    def _sync_resolver_helper(self) -> None:
        """The resolver helper runs iff -out has names (httptp.discovery); it
        is the table's only writer while it runs."""
        if not _discovery(self.config):
            self.helpers.remove(helper_procs.RESOLVER)
            return
        self.helpers.ensure(helper_procs.RESOLVER,
                            helper_procs.resolver_main(self.stats, self.config),
                            key=helper_procs.resolver_key(self.config))

    def _assign_upstreams(self, config, resolved) -> list[int]:
        """List ``config``'s upstreams in the shared table (at start); their
        indexes (plain entries in -out order; with names, every listed one)."""
        if not _discovery(config):
            return self.stats.assign_upstreams(_upstream_names(config))
        from httptp import discovery
        if resolved is None:
            resolved = discovery.resolve_start(config, log=log)   # ConfigError: run() says it
        targets = discovery.current_set(config, resolved, self.stats.max_upstreams)
        discovery.publish(self.stats, targets)
        log(f"upstreams: {discovery.describe(targets)}")
        return [i for i, _, _, _ in self.stats.listed_upstreams()]

    def _reassign_upstreams(self, new) -> list[int]:
        """On HUP: stop the resolver helper (one writer at a time), keep the
        addresses of names still in -out, resolve new names now."""
        if not (_discovery(new) or _discovery(self.config)):
            return self.stats.assign_upstreams(_upstream_names(new))
        from httptp import discovery
        self.helpers.stop_now(helper_procs.RESOLVER)
        if not _discovery(new):                 # -out order: the workers' Balancer positions
            return self.stats.assign_upstreams(_upstream_names(new))
        known = discovery.known_targets(self.stats)
        resolved = discovery.resolve_start(new, known=known, log=log, wait=0.0)
        targets = discovery.current_set(new, resolved, self.stats.max_upstreams)
        if discovery.publish(self.stats, targets):
            log(f"upstreams now: {discovery.describe(targets)}")
        return [i for i, _, _, _ in self.stats.listed_upstreams()]

    def _helper_child(self, name: str) -> None:
        """First thing in a new helper child: worker signals, no proxy listeners."""
        self.signals.reset_in_child()
        die_with_parent(signal.SIGTERM)
        self.listeners.keep_only(-1)        # TCP: close every slot's copy; unix: nothing

    # -- stop (TERM, INT, QUIT) -------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        """Graceful: TERM, SIGKILL after -gracefulTimeout.  Fast: QUIT, SIGKILL after 1 s.

        The master closes its listener copies at once: each worker's copy keeps
        its socket open until that worker stops accepting, and a client then
        gets a refused connection (or, with -reusePort, another process of the
        group) instead of waiting in a queue nobody will accept.
        """
        if self.stopping == "fast" or (graceful and self.stopping):
            return
        if self.stopping is None and self._followed_by_systemd():
            systemd.stopping("stopping")
        if self.stopping is None:
            self._upgrade_on_stop()
        self.stopping = "graceful" if graceful else "fast"
        self.rolling = False
        grace = self.config.graceful_timeout if graceful else QUIT_GRACE
        signum = signal.SIGTERM if graceful else signal.SIGQUIT
        how = "graceful stop" if graceful else "fast stop"
        log(f"{how}: {signum.name} to {len(self.workers)} workers, SIGKILL after {grace:g} s")
        for worker in self.workers.values():
            self._tell(worker, signum, grace)
        self.helpers.stop(signum, grace)
        self.stop_deadline = min(self.stop_deadline, time.monotonic() + grace)
        self.listeners.close()

    # -- binary upgrade (USR2; supervisor/upgrade.py) ---------------------------------

    upgrade_timeout = 60.0   # a new master not ready this long after USR2 is stopped

    def handle_usr2(self) -> None:
        """Start a new master from the code on disk; it takes over when ready."""
        if self.stopping:
            log("USR2 ignored: stopping")
        elif self.upgrade is not None:
            log(f"USR2 refused: an upgrade is in progress (new master pid {self.upgrade.pid})")
        elif self.inherited is not None:
            log(f"USR2 refused: this master is still taking over from pid "
                f"{self.inherited.parent}")
        else:
            self.start_upgrade()

    def start_upgrade(self) -> None:
        sockets = {"expvarAddr": (getattr(self.config, "expvar_addr", ""), self.stats_sock),
                   "autocertHTTPAddr": (getattr(self.config, "autocert_http_addr", ""),
                                        self.autocert_sock)}
        description = upgrade.describe(self.config, self.listeners, sockets)
        try:
            self.upgrade = upgrade.spawn(description, timeout=self.upgrade_timeout,
                                         blocked=self.signals.blocked,
                                         in_child=self.signals.reset_in_child)
        except OSError as err:
            log(f"USR2: cannot start a new master: {err}; this one keeps serving")
            return
        log(f"USR2: started a new master (pid {self.upgrade.pid}) from the code on disk; "
            f"this one (pid {os.getpid()}, version {__version__}) serves until it is ready")

    def upgrade_tick(self, now: float) -> None:
        """Old master: hand over once the new one is ready; stop it if it takes too long.
        New master: tell systemd once the old one has exited."""
        if self.old_master is not None and os.getppid() != self.old_master:
            self.old_master = None
            # The old master made us the main pid already (only it could, under
            # NotifyAccess=main); saying it ourselves also covers a manager that
            # missed it, and our STATUS= replaces the old master's.
            systemd.notify(f"MAINPID={os.getpid()}", "READY=1", f"STATUS={self._status()}")
        up = self.upgrade
        if up is None or up.state != "starting":
            return
        if up.poll_ready():
            self._hand_over(up)
        elif now > up.deadline:
            up.state = "abandoned"
            log(f"upgrade failed: the new master (pid {up.pid}) was not ready "
                f"{self.upgrade_timeout:g} s after USR2; stopping it, this one keeps serving")
            _kill(up.pid, signal.SIGTERM)

    def _hand_over(self, up: upgrade.Upgrade) -> None:
        """The new master serves: systemd follows it, and this one drains and exits."""
        up.state = "ready"
        up.close()
        systemd.notify(f"MAINPID={up.pid}", "READY=1",
                       f"STATUS=upgraded: the new master is pid {up.pid}")
        self.listeners.forget_path()       # a unix socket's path is the new master's now
        proctitle.set_title(f"httptp: old master, draining [{self.config.in_addr}]")
        log(f"upgrade: the new master (pid {up.pid}) is ready; this one (pid {os.getpid()}, "
            f"version {__version__}) drains and exits")
        self.stop(graceful=True)

    def upgrade_reaped(self, pid: int, status: int) -> bool:
        """Old master: was ``pid`` the new master?  Logs how it ended."""
        up = self.upgrade
        if up is None or pid != up.pid:
            return False
        how = _describe_status(status)
        if up.state == "starting":
            log(f"upgrade failed: the new master (pid {pid}) {how} before it was ready "
                f"(its own lines above say why); this one keeps serving")
            systemd.status(self._status())
        else:
            log(f"the new master (pid {pid}) {how}")
        up.close()
        if up.state != "ready":
            self.upgrade = None            # another USR2 may try again
        return True

    def _upgrade_starting(self) -> bool:
        return self.upgrade is not None and self.upgrade.state == "starting"

    def _followed_by_systemd(self) -> bool:
        """False while a new master has not taken over from us (USR2), and in
        an old master once it has: STOPPING=1 from us would then be wrong."""
        handed_over = self.upgrade is not None and self.upgrade.state == "ready"
        return not handed_over and self.inherited is None

    def _upgrade_on_stop(self) -> None:
        """Stopping (TERM...) while a new master starts: it is not wanted either."""
        if self._upgrade_starting():
            self.upgrade.state = "abandoned"
            log(f"stopping the new master (pid {self.upgrade.pid}) too: it was not ready yet")
            _kill(self.upgrade.pid, signal.SIGTERM)

    def _take_over(self, now: float) -> None:
        """New master: once every worker is ready, tell the old master to drain.

        Unlike READY=1 at a plain start there is no ``ready_timeout``: the old
        master serves until we are fully ready (or its upgrade_timeout)."""
        serving = [self.workers[s.pid] for s in self.slots.values() if s.pid in self.workers]
        if len(serving) < len(self.slots) or not all(w.ready_at for w in serving):
            return
        inherited, self.inherited = self.inherited, None
        self.old_master = inherited.parent
        self.ready_deadline = None
        self.listeners.own_path()
        upgrade.report_ready(inherited, log)
        log(f"ready: {len(self.slots)} workers; the old master (pid {inherited.parent}) "
            "drains and exits")

    def _open_listeners(self, config):
        """Bind -in, or take the old master's sockets after a USR2."""
        adopted = upgrade.adopt_listeners(self.inherited, config, config.workers, log)
        if adopted is not None:
            return adopted
        return open_listeners(config.listen, config.workers, config.reuse_port)

    def _inherited_socket(self, flag: str, value: str):
        return upgrade.adopt_socket(self.inherited, flag, value, log)

    def _version_note(self) -> str:
        """The code this master runs (what USR2 changes), and whose sockets it took."""
        note = f"version {__version__} (Python {platform.python_version()}) pid={os.getpid()}"
        if self.inherited is not None:
            note += f", sockets inherited from pid {self.inherited.parent}"
        return note

    # -- systemd and titles --------------------------------------------------------------

    def notify_ready(self, now: float) -> None:
        """READY=1 once every slot's worker is ready, or after ``ready_timeout``."""
        if self.ready_deadline is None or self.stopping:
            return
        if self.inherited is not None:     # USR2: the old master waits for this one
            self._take_over(now)
            return
        serving = [self.workers[s.pid] for s in self.slots.values() if s.pid in self.workers]
        all_ready = len(serving) == len(self.slots) and all(w.ready_at for w in serving)
        if not all_ready and now < self.ready_deadline:
            return
        self.ready_deadline = None
        if all_ready:
            log(f"ready: {len(self.slots)} workers")
        else:
            log(f"warning: workers not ready after {self.ready_timeout:g} s; "
                "telling systemd we are ready anyway")
        systemd.ready(self._status())

    def _status(self) -> str:
        return f"{len(self.slots)} workers on {self.listeners.name}, generation {self.generation}"

    def notify_reload_refused(self, reason: str) -> None:
        """A HUP whose configuration was refused, told to systemd as a reload
        that ended on the old configuration: ``RELOADING=1``, then ``READY=1``
        with a ``STATUS=`` line that says why (``systemctl status`` shows it)."""
        systemd.reloading("reloading")
        systemd.ready(f"reload refused, keeping the running configuration: {reason}; "
                      f"{self._status()}")

    def notify_watchdog(self, now: float) -> None:
        """``WATCHDOG=1`` every half ``WatchdogSec=`` while the workers' heartbeats
        in the shared memory are fresh: the master's loop runs and some worker
        serves.  While starting (before ``READY=1``) and while stopping, the
        start and stop timeouts of the unit rule instead, so it pings regardless.
        One wedged worker of several is the master's to kill (``heartbeat_timeout``);
        none fresh for ``WatchdogSec=`` means the service serves nothing, and
        systemd restarts it."""
        if self.watchdog.due_in(now) > 0:
            return
        starting = self.ready_deadline is not None
        fresh = starting or self.stopping or self._heartbeats_fresh(now)
        if fresh:
            if self.watchdog_stale:
                log("watchdog: worker heartbeats are fresh again; WATCHDOG=1 to systemd resumes")
            self.watchdog_stale = False
            self.watchdog.ping(now)
            return
        self.watchdog.skip(now)
        if not self.watchdog_stale:
            self.watchdog_stale = True
            log(f"error: watchdog: no worker has sent a heartbeat for {self._stale_after():g} s; "
                "not sending WATCHDOG=1, systemd will restart httptp")

    def _stale_after(self) -> float:
        return max(WATCHDOG_MIN_STALE, self.watchdog.timeout or 0.0)

    def _heartbeats_fresh(self, now: float) -> bool:
        """Has some ready worker beaten within ``_stale_after()``?"""
        stale_after = self._stale_after()
        for worker in self.workers.values():
            if worker.ready_at is None or worker.killed:
                continue
            heartbeat = self.stats.block_info(worker.block)["heartbeat"]
            if now - max(heartbeat, worker.ready_at) <= stale_after:
                return True
        return False

    def _set_title(self) -> None:
        out = ",".join(_upstream_names(self.config))
        proctitle.set_title(f"httptp: master [{self.config.in_addr} -> {out}]")


# -- helpers --------------------------------------------------------------------------


def _default_worker_main():
    from httptp.workers.worker import run   # in the child only: it imports gevent
    return run


def _build_tls(config):
    """The TLS objects of ``config`` (None if it uses no TLS); raises ConfigError."""
    if getattr(config, "in_type", None) is None:
        return None
    from httptp.tls import build   # stdlib ssl and ctypes only: no gevent, no threads
    return build(config, log=log)


def _restart_needed(old, new) -> str:
    """The flags (``-in, -inType``) a HUP cannot change, "" if none."""
    from httptp.config import restart_needed
    return ", ".join(f"-{name}" for name in sorted(restart_needed(old, new)))


def _discovery(config) -> bool:
    from httptp.discovery import uses_discovery
    return uses_discovery(config)


def _upstream_names(config) -> list[str]:
    return [str(address) for address in config.upstreams]


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code}"


def _exit_status(code) -> int:
    """What ``os._exit`` gets for a worker's return value or SystemExit code."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def _one_line(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"exit status {err.code}"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _report_crash(slot: int, exc: BaseException) -> None:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    log(f"worker {slot} (pid {os.getpid()}) crashed: {type(exc).__name__}: {exc}{where}", "error")
