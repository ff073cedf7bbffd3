"""httptp under systemd, without systemd: its notify socket and sandbox, for real.

- sd_notify: the test binds the datagram socket systemd would
  (``NOTIFY_SOCKET``) and reads what the master sends on a refused reload and
  for the watchdog (``WATCHDOG_USEC``, as systemd sets it for ``WatchdogSec=``).
- ``MemoryDenyWriteExecute=yes``: systemd (256 and later) applies it with the
  kernel's ``prctl(PR_SET_MDWE)`` when the kernel has it (Linux 6.3), else
  with a seccomp filter.  The wrapper here sets the same prctl and execs
  httptp, which must then serve https with a session ticket key (ctypes).
- ``SystemCallFilter=``: the unit's filter, expanded by ``systemd-analyze
  syscall-filter``, loaded through libseccomp (with ``NoNewPrivileges``) before
  exec; httptp serves https, reloads, reopens its log and stops under it.

systemd-run cannot start units in this sandbox (no systemd as PID 1), so the
other settings of the unit (ProtectSystem=, DynamicUser=, the directories) are
checked by systemd-analyze only.

The unit file itself is checked by systemd-analyze in tests/unit/test_deploy.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

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
            assert wait_until(lambda: "httptp: error: reload failed, keeping the running configuration" in p.output)
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


# ------------------------------------------------ SystemCallFilter= of the unit

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNIT = Path(__file__).resolve().parents[2] / "deploy" / "httptp.service"
# NoNewPrivileges=yes, then the unit's SystemCallFilter= as an allow-list
# (SystemCallErrorNumber=EPERM for the rest) through libseccomp, as systemd
# loads it, and MemoryDenyWriteExecute=yes as the kernel's PR_SET_MDWE; then exec.
SANDBOX_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                    # PR_SET_NO_NEW_PRIVS
seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = seccomp.seccomp_init(0x00050000 | 1)                # SCMP_ACT_ERRNO(EPERM)
for name in sys.argv[1].split(","):
    nr = seccomp.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:                                           # < 0: not on this architecture
        assert seccomp.seccomp_rule_add(ctx, 0x7fff0000, nr, 0) == 0, name   # SCMP_ACT_ALLOW
assert seccomp.seccomp_load(ctx) == 0
if sys.argv[2] == "mdwe":
    assert libc.prctl(65, 1, 0, 0, 0) == 0                # PR_SET_MDWE, REFUSE_EXEC_GAIN
os.execv(sys.argv[3], sys.argv[3:])
"""


def _syscall_set(group: str, depth: int = 0) -> set[str]:
    """The system calls of ``@group``, nested groups expanded (systemd-analyze)."""
    assert depth < 10, group
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", "--no-pager", group],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not line.startswith(" ") or not item or item.startswith("#"):
            continue
        names |= _syscall_set(item, depth + 1) if item.startswith("@") else {item}
    return names


def _unit_allowed_syscalls() -> set[str]:
    """SystemCallFilter= lines of the unit, in order: an allow-list, then ~ removals."""
    allowed: set[str] | None = None
    for line in UNIT.read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _syscall_set(item) if item.startswith("@") else {item}
        assert allowed is not None or not deny, "the unit's first SystemCallFilter= allows"
        allowed = (allowed - names) if deny else ((allowed or set()) | names)
    assert allowed, "no SystemCallFilter= in the unit"
    return allowed


@pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                    reason="systemd-analyze not installed (make test-deps installs Debian's systemd)")
@pytest.mark.skipif(not os.path.exists("/usr/lib/x86_64-linux-gnu/libseccomp.so.2")
                    and ctypes.util.find_library("seccomp") is None,
                    reason="no libseccomp (Debian's libseccomp2, a dependency of systemd)")
def test_https_reload_and_reopen_under_the_units_syscall_filter(tmp_path):
    """httptp with the unit's SystemCallFilter= (and MDWE when the kernel has it):
    https with a ticket key and session resumption, a HUP (new workers, TLS
    rebuilt), a USR1, and a graceful stop, with no call refused on the way."""
    trustme = pytest.importorskip("trustme")
    allowed = _unit_allowed_syscalls()
    assert "setuid" not in allowed and "read" in allowed     # ~@privileged, @basic-io
    wrap = [sys.executable, "-c", SANDBOX_EXEC, ",".join(sorted(allowed)),
            "mdwe" if _mdwe_available() else "-"]
    probe = subprocess.run([*wrap, sys.executable, "-c", "import os; os.setuid(0)"],
                           capture_output=True, text=True, timeout=30)
    assert "PermissionError" in probe.stderr, probe        # the filter is in force
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "site.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    log = tmp_path / "access.log"
    up = Upstream()
    try:
        with HttpTp("-inType=https", f"-inTLSCert={tmp_path / 'site.pem'}",
                    f"-inTLSKey={tmp_path / 'site.key'}", "-inTLSSessionTicketKey=sandbox",
                    "-outType=http", f"-out={up.addr}", f"-accessLog={log}",
                    "-expvarAddr=127.0.0.1:0", workers=2, wrap=wrap) as p:
            first, session, _ = _https_get(p.port, ctx)
            assert first.startswith(b"HTTP/1.1 200"), first
            p.signal(signal.SIGHUP)
            assert wait_until(lambda: "reloaded: 2 workers run generation 1" in p.output, 30), \
                p.output
            again, _, reused = _https_get(p.port, ctx, session)
            assert again.startswith(b"HTTP/1.1 200") and reused
            log.rename(tmp_path / "access.log.1")
            p.signal(signal.SIGUSR1)
            assert wait_until(lambda: _https_get(p.port, ctx)[0].startswith(b"HTTP/1.1 200")
                              and log.exists(), 10)
            p.signal(signal.SIGTERM)
            assert p.wait(30) == 0, p.output
        for bad in ("Traceback", "Operation not permitted", "PermissionError", "crashed"):
            assert bad not in p.output, p.output
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
