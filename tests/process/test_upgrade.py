"""USR2 through the real `httptp` command: a new master from the code on disk
takes the listening sockets over, and the old one drains and exits.

Two generations of code are two copies of the source tree, laid out as the
installed package (``httptp/``, ``httptp/workers``, ``httptp/supervisor``)
with their own ``__version__``, put first on PYTHONPATH through a symlink that
is switched between them, as a deployment (or ``pip install -U``) replaces
the files under a running master.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import HttpTp, UnixHTTPConnection, Upstream, get, load, wait_until

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
NEW_MASTER_RE = re.compile(
    r"^httptp: version (\S+) \(Python [^)]*\) pid=(\d+), sockets inherited from pid (\d+)$")


def code_tree(dst: Path, version: str, break_workers: bool = False) -> Path:
    """A copy of the code, as installed, whose ``__version__`` is ``version``."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "httptp", dst / "httptp", ignore=ignore)
    shutil.copytree(REPO / "workers", dst / "httptp" / "workers", ignore=ignore)
    shutil.copytree(REPO / "supervisor", dst / "httptp" / "supervisor", ignore=ignore)
    init = dst / "httptp" / "__init__.py"
    text, n = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    assert n == 1
    init.write_text(text)
    if break_workers:   # a broken release: the worker module does not import
        worker = dst / "httptp" / "workers" / "worker.py"
        worker.write_text(worker.read_text() + "\nraise ImportError('this release is broken')\n")
    return dst


def deploy(link: Path, tree: Path) -> None:
    """Point ``link`` at ``tree`` atomically (rename over the old link)."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(tree)
    os.replace(tmp, link)


def new_master(p: HttpTp, timeout=30.0) -> tuple[int, str]:
    """(pid, version) of the master that took over p's sockets."""
    def find():
        for line in list(p.lines):
            m = NEW_MASTER_RE.search(line)
            if m and int(m.group(3)) == p.proc.pid:
                return int(m.group(2)), m.group(1)
        return None
    found = wait_until(find, timeout)
    assert found, p.output
    return found


def gone(pid: int) -> bool:
    """Exited (a zombie of a parent that does not reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def stop_new_master(p: HttpTp, pid: int) -> None:
    """TERM the new master (not our child: polled), then SIGKILL the whole group."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    wait_until(lambda: gone(pid), 20)
    try:
        os.killpg(p.proc.pid, signal.SIGKILL)   # the session's group: anything left over
    except ProcessLookupError:
        pass


@pytest.fixture
def code(tmp_path):
    link = tmp_path / "current"
    deploy(link, code_tree(tmp_path / "gen1", "9.0.1"))
    return link


def test_usr2_swaps_the_code_under_load_with_no_failed_request(tmp_path, code):
    up = Upstream(delay=0.002)
    name = f"httptp-upgrade-{os.getpid()}-{time.monotonic_ns()}"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind("\0" + name)
    new_pid = None
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", workers=2,
                    env={"PYTHONPATH": str(code), "NOTIFY_SOCKET": "@" + name}) as p:
            assert "httptp: version 9.0.1 (Python" in p.output, p.output
            old_workers = set(p.worker_pids())
            deploy(code, code_tree(tmp_path / "gen2", "9.0.2"))
            box = {}
            t = threading.Thread(target=lambda: box.setdefault(
                "r", load(p.host, p.port, threads=8, duration=6.0, max_requests=40000)))
            t.start()
            time.sleep(1.0)
            p.signal(signal.SIGUSR2)
            assert wait_until(lambda: "USR2: started a new master" in p.output), p.output
            p.signal(signal.SIGUSR2)          # a second one while the first is in progress
            assert wait_until(lambda: "USR2 refused: an upgrade is in progress" in p.output), \
                p.output
            new_pid, version = new_master(p)
            assert version == "9.0.2"
            assert wait_until(lambda: f"upgrade: the new master (pid {new_pid}) is ready"
                              in p.output, 30), p.output
            assert p.proc.wait(30) == 0       # the old master drained and exited
            t.join(60)
            res = box["r"]
            assert res.failed == 0, (res.statuses, res.errors[:5])
            assert res.ok > 100
            assert all(gone(pid) for pid in old_workers)
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 200           # the new master's workers serve
            c.close()
            assert not gone(new_pid)
            systemd.settimeout(10)
            messages = []
            while len([m for m in messages if f"MAINPID={new_pid}" in m]) < 2:
                messages.append(systemd.recv(4096).decode())   # socket.timeout: failed
            # the old master's (it is the main pid), then the new one's once the old exited
            takeover = [m.splitlines() for m in messages if f"MAINPID={new_pid}" in m]
            assert "READY=1" in takeover[0] and "READY=1" in takeover[1], messages
            assert any(line.startswith("STATUS=2 workers on ") for line in takeover[1]), messages
            assert not [m for m in messages if "STOPPING=1" in m], messages
    finally:
        if new_pid is not None:
            stop_new_master(p, new_pid)
        systemd.close()
        up.close()


def test_usr2_whose_new_master_has_a_bad_config_leaves_the_old_one_serving(tmp_path, code):
    up = Upstream()
    conf = tmp_path / "httptp.conf"
    conf.write_text(f"out = {up.addr}\noutType = http\n")
    new_pid = None
    try:
        with HttpTp(f"-config={conf}", workers=1, env={"PYTHONPATH": str(code)}) as p:
            workers = p.worker_pids()
            conf.write_text("outType = nonsense\n")
            p.signal(signal.SIGUSR2)
            assert wait_until(lambda: "upgrade failed: the new master" in p.output, 30), p.output
            failed = next(line for line in p.lines if "upgrade failed" in line)
            assert "exited with status 2 before it was ready" in failed
            assert "keeps serving" in failed
            assert any(line.startswith("httptp: -outType: ") for line in p.lines), p.output
            assert p.proc.poll() is None and p.worker_pids() == workers
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 200
            c.close()
            # fixed: the next USR2 goes through
            conf.write_text(f"out = {up.addr}\noutType = http\n")
            p.signal(signal.SIGUSR2)
            new_pid, _ = new_master(p)
            assert p.proc.wait(30) == 0
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 200
            c.close()
    finally:
        if new_pid is not None:
            stop_new_master(p, new_pid)
        up.close()


def test_usr2_whose_new_workers_cannot_boot_leaves_the_old_one_serving(tmp_path, code):
    up = Upstream()
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", workers=2,
                    env={"PYTHONPATH": str(code)}) as p:
            workers = sorted(p.worker_pids())
            deploy(code, code_tree(tmp_path / "broken", "9.0.3", break_workers=True))
            p.signal(signal.SIGUSR2)
            assert wait_until(lambda: "upgrade failed: the new master" in p.output, 30), p.output
            assert "exited with status 3 before it was ready" in p.output
            assert "this release is broken" in p.output
            assert p.proc.poll() is None and sorted(p.worker_pids()) == workers
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 200
            c.close()
    finally:
        up.close()


def test_usr2_on_a_unix_socket_keeps_the_path_for_the_new_master(tmp_path, code):
    up = Upstream()
    path = str(tmp_path / "in.sock")
    new_pid = None
    try:
        with HttpTp(f"-in={path}", "-inType=unix", f"-out={up.addr}", "-outType=http",
                    "-expvarAddr=127.0.0.1:0", workers=1, env={"PYTHONPATH": str(code)}) as p:
            assert wait_until(lambda: "stats on http://" in p.output), p.output
            stats_port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))
            deploy(code, code_tree(tmp_path / "gen2", "9.0.2"))
            p.signal(signal.SIGUSR2)
            new_pid, _ = new_master(p)
            assert p.proc.wait(30) == 0
            assert os.path.exists(path)       # the old master left it to the new one
            c = UnixHTTPConnection(path)
            assert get(c)[0] == 200
            c.close()
            # the stats port too: same socket, now answered by the new code
            c = http.client.HTTPConnection("127.0.0.1", stats_port, timeout=5)
            c.request("GET", "/healthz")
            r = c.getresponse()
            r.read()
            assert r.status == 200 and r.getheader("Server") == "httptp/9.0.2"
            c.close()
            os.kill(new_pid, signal.SIGTERM)
            assert wait_until(lambda: gone(new_pid), 20)
            assert not os.path.exists(path)   # and the new one removed it at its stop
    finally:
        if new_pid is not None:
            stop_new_master(p, new_pid)
        up.close()


def test_term_to_the_old_master_before_the_new_one_is_ready_stops_both(code):
    up = Upstream()
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", workers=1,
                    env={"PYTHONPATH": str(code)}) as p:
            p.signal(signal.SIGUSR2)
            assert wait_until(lambda: "USR2: started a new master" in p.output), p.output
            new_pid = int(re.search(r"USR2: started a new master \(pid (\d+)\)", p.output).group(1))
            p.signal(signal.SIGTERM)        # the new master needs far longer to be ready
            assert p.proc.wait(30) == 0
            assert f"stopping the new master (pid {new_pid}) too: it was not ready yet" in p.output
            assert wait_until(lambda: gone(new_pid), 20), p.output
            assert "upgrade: the new master" not in p.output
    finally:
        up.close()


def test_a_new_master_not_ready_in_time_is_stopped_and_the_old_one_keeps_serving(tmp_path):
    """The stub arbiter of test_arbiter.py: workers that take 2 s to be ready,
    a master that gives a new master 0.5 s."""
    from tests.process.test_arbiter import Master
    env = {"STUB_BOOT_DELAY": "2", "STUB_UPGRADE_TIMEOUT": "0.5"}
    with Master(tmp_path, workers=1, env=env) as m:
        pid, _ = m.get()
        m.signal(signal.SIGUSR2)
        assert m.wait_for("was not ready 0.5 s after USR2; stopping it, this one keeps "
                          "serving", 20), m.output
        new_pid = int(re.search(r"the new master \(pid (\d+)\) was not ready", m.output).group(1))
        # TERM during its start (still importing) kills it, later it stops: either way, reaped
        reaped = re.compile(rf"the new master \(pid {new_pid}\) (exited|was killed)")
        assert wait_until(lambda: reaped.search(m.output), 20), m.output
        assert m.proc.poll() is None and m.get()[0] == pid
        m.signal(signal.SIGUSR2)           # and the next USR2 is not refused
        assert m.wait_count("USR2: started a new master", 2), m.output
        assert "USR2 refused" not in m.output
