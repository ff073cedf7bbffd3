"""httptp under systemd, without systemd: its notify socket and sandbox, for real.

- sd_notify: the test binds the datagram socket systemd would
  (``NOTIFY_SOCKET``) and reads what the master sends on a refused reload and
  for the watchdog (``WATCHDOG_USEC``, as systemd sets it for ``WatchdogSec=``).
- ``MemoryDenyWriteExecute=yes``: systemd (256 and later) applies it with the
  kernel's ``prctl(PR_SET_MDWE)`` when the kernel has it (Linux 6.3), else
  with a seccomp filter.  The wrapper here sets the same prctl and execs
  httptp, which must then serve https with a session ticket key (ctypes).
  systemd-run cannot start units in this sandbox (no systemd as PID 1).

The unit file itself is checked by systemd-analyze in tests/unit/test_deploy.py.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from tests.helpers import HttpTp, Upstream, wait_until
from tests.process.test_arbiter import Master

pytestmark = pytest.mark.timeout(90)


class NotifySocket:
    """The datagram socket systemd listens on, abstract (``@name``)."""

    def __init__(self):
        self.name = f"httptp-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(10)

    @property
    def env(self) -> dict:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def next(self, skip_watchdog=True) -> list[str]:
        """The lines of the next message (WATCHDOG=1 pings skipped); bounded."""
        for _ in range(200):
            lines = self.sock.recv(4096).decode().splitlines()
            if not (skip_watchdog and lines == ["WATCHDOG=1"]):
                return lines
        raise AssertionError("only WATCHDOG=1 messages")

    def drain(self) -> list[list[str]]:
        got = []
        self.sock.setblocking(False)
        try:
            for _ in range(10000):
                got.append(self.sock.recv(4096).decode().splitlines())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(10)
        return got

    def close(self):
        self.sock.close()


@pytest.fixture
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


def _refused_status(notify: NotifySocket) -> str:
    """RELOADING=1, then READY=1: the STATUS= text of the READY=1."""
    reloading = notify.next()
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC="), reloading
    ready = notify.next()
    assert ready[0] == "READY=1", ready
    (status,) = [line for line in ready if line.startswith("STATUS=")]
    return status[len("STATUS="):]


# ------------------------------------------------------------- refused reloads

def test_a_refused_reload_is_told_to_systemd(tmp_path, notify):
    """The real httptp: a bad value in the -config file on HUP."""
    up = Upstream()
    conf = tmp_path / "httptp.conf"
    conf.write_text(f"outType = http\nout = {up.addr}\n")
    try:
        with HttpTp(f"-config={conf}", workers=1, env=notify.env) as p:
            assert notify.next()[0] == "READY=1"
            conf.write_text(f"outType = http\nout = {up.addr}\noutTimeout = soon\n")
            p.signal(signal.SIGHUP)
            status = _refused_status(notify)
            assert status.startswith("reload refused, keeping the running configuration: "), status
            assert "outTimeout" in status and "generation 0" in status, status
            assert wait_until(lambda: "reload failed, keeping the running configuration" in p.output)
            # a good reload afterwards says nothing of the refusal
            conf.write_text(f"outType = http\nout = {up.addr}\noutTimeout = 5s\n")
            p.signal(signal.SIGHUP)
            assert notify.next()[0] == "RELOADING=1"
            ready = notify.next()
            assert ready[0] == "READY=1" and "refused" not in ready[1] and "generation 1" in ready[1]
    finally:
        up.close()


def test_a_change_that_needs_a_restart_is_a_refused_reload(tmp_path, notify):
    with Master(tmp_path, workers=1, env=notify.env) as m:
        assert notify.next()[0] == "READY=1"
        m.reload_file.write_text("-in=127.0.0.1:1")
        m.signal(signal.SIGHUP)
        status = _refused_status(notify)
        assert "changing -in needs a restart" in status, status


def test_an_aborted_reload_says_so_in_the_status(tmp_path, notify):
    """A new worker that cannot boot: the reload is aborted, old workers serve."""
    with Master(tmp_path, workers=1, env=notify.env) as m:
        assert notify.next()[0] == "READY=1"
        m.reload_file.write_text("-out=127.0.0.1:9")       # the stub's boot crash
        m.signal(signal.SIGHUP)
        assert notify.next()[0] == "RELOADING=1"
        ready = notify.next()
        assert ready[0] == "READY=1" and ready[1].startswith(
            "STATUS=reload aborted, keeping the running workers: "), ready


# ------------------------------------------------------------------- watchdog

def test_watchdog_pings_while_heartbeats_are_fresh(tmp_path, notify):
    """WatchdogSec=1s: WATCHDOG=1 goes out while the workers beat; all of them
    stopped (SIGSTOP: a wedged hub) stops it, and it resumes when they beat again."""
    env = dict(notify.env, WATCHDOG_USEC="1000000")
    with Master(tmp_path, workers=2, env=env) as m:
        assert notify.next()[0] == "READY=1"
        assert notify.next(skip_watchdog=False) == ["WATCHDOG=1"]
        assert notify.next(skip_watchdog=False) == ["WATCHDOG=1"]
        workers = sorted(m.children())
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert m.wait_for("error: watchdog: no worker has sent a heartbeat for 3 s", 20), \
                m.output
            notify.drain()
            time.sleep(1.5)           # several of the master's checks (every 0.25 s)
            assert notify.drain() == [], "WATCHDOG=1 sent with every worker stopped"
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        assert m.wait_for("worker heartbeats are fresh again", 20), m.output
        assert notify.next(skip_watchdog=False) == ["WATCHDOG=1"]
        assert not any("killing it" in line for line in m.lines), m.output


def test_watchdog_with_the_real_workers(notify):
    """The real httptp (gevent workers, one heartbeat a second), WatchdogSec=2s."""
    env = dict(notify.env, WATCHDOG_USEC="2000000")
    with HttpTp("-outType=http", "-out=127.0.0.1:1", workers=2, env=env) as p:
        assert notify.next()[0] == "READY=1"
        for _ in range(3):
            assert notify.next(skip_watchdog=False) == ["WATCHDOG=1"]
        assert "watchdog" not in p.output, p.output


def test_watchdog_of_another_process_is_not_ours(tmp_path, notify):
    """WATCHDOG_PID names the process systemd watches; a child that inherited
    the variables must not ping for it."""
    env = dict(notify.env, WATCHDOG_USEC="1000000", WATCHDOG_PID="1")
    with Master(tmp_path, workers=1, env=env) as m:
        assert notify.next(skip_watchdog=False)[0] == "READY=1"
        m.get()
        time.sleep(1.5)
        assert ["WATCHDOG=1"] not in notify.drain()


# ------------------------------------------------- MemoryDenyWriteExecute=yes

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
MDWE_EXEC = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
             f"rc = libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0); "
             "rc == 0 or sys.exit(f'prctl(PR_SET_MDWE): errno {ctypes.get_errno()}'); "
             "os.execv(sys.argv[1], sys.argv[1:])")


def _mdwe_available() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


@pytest.mark.skipif(not _mdwe_available(), reason="the kernel has no PR_SET_MDWE (Linux < 6.3)")
def test_https_with_ticket_keys_under_memory_deny_write_execute(tmp_path):
    trustme = pytest.importorskip("trustme")
    wrap = [sys.executable, "-c", MDWE_EXEC]
    probe = subprocess.run(
        [*wrap, sys.executable, "-c",
         f"import ctypes; print(ctypes.CDLL(None).prctl({PR_GET_MDWE}, 0, 0, 0, 0))"],
        capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == str(PR_MDWE_REFUSE_EXEC_GAIN), probe   # kept across exec
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "site.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    up = Upstream()
    try:
        with HttpTp("-inType=https", f"-inTLSCert={tmp_path / 'site.pem'}",
                    f"-inTLSKey={tmp_path / 'site.key'}", "-inTLSSessionTicketKey=mdwe test",
                    "-outType=http", f"-out={up.addr}", workers=1, wrap=wrap) as p:
            first, session, _ = _https_get(p.port, ctx)
            assert first.startswith(b"HTTP/1.1 200"), first
            again, _, reused = _https_get(p.port, ctx, session)
            assert again.startswith(b"HTTP/1.1 200") and reused
            assert "Traceback" not in p.output, p.output
    finally:
        up.close()


def _https_get(port, ctx, session=None):
    """One request on a new TLS connection: (response, session, session_reused)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t = ctx.wrap_socket(s, server_hostname="localhost", session=session)
    try:
        t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(1000):
            chunk = t.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, t.session, t.session_reused
    finally:
        t.close()
