"""Workers that cannot boot, with the real `httptp`: the master stops (exit 3)
instead of respawning a configuration that never booted, keeps the old
workers when a reload cannot boot, and respawns with back-off a configuration
that booted before.

The boot failures are real ones caused from outside: a module that cannot be
imported (an ``httptools`` that raises ImportError, first on PYTHONPATH, as a
half-upgraded install would; the master never imports it, the worker does
for ``-httpParser=httptools``), and an access log whose directory was removed
after the master checked it.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal

import pytest

from tests.helpers import HttpTp, Upstream, get, wait_until

pytestmark = pytest.mark.timeout(60)

BOOT_LINE = re.compile(r"^httptp: worker (\d+): cannot boot: ImportError: httptools is broken "
                       r"\(a test\) \(pid \d+, gen (\d+)\)$")


@pytest.fixture
def broken_httptools(tmp_path):
    """PYTHONPATH under which ``import httptools`` fails."""
    path = tmp_path / "shadow"
    path.mkdir()
    (path / "httptools.py").write_text('raise ImportError("httptools is broken (a test)")\n')
    return {"PYTHONPATH": str(path)}


def test_a_fresh_start_whose_workers_cannot_boot_exits_3_with_the_cause(broken_httptools):
    up = Upstream()
    try:
        p = HttpTp(f"-out={up.addr}", "-outType=http", "-httpParser=httptools",
                   "-expvarAddr=127.0.0.1:0", workers=2, env=broken_httptools, wait=False)
        try:
            assert p.wait(15) == 3, p.output
        finally:
            p.kill()
        assert wait_until(lambda: any(l.startswith("httptp: stopped:") for l in p.lines)), p.output
        boot = [m for m in map(BOOT_LINE.match, p.lines) if m]
        assert boot, p.output
        halts = [l for l in p.lines if "no worker of this configuration has booted" in l]
        assert len(halts) == 1, p.output
        assert re.match(r"httptp: worker \d \(pid \d+, gen 0\) could not boot \(exit status 3\), "
                        r"and no worker of this configuration has booted; stopping with exit status 3$",
                        halts[0]), halts
        assert "respawning" not in p.output and "Traceback" not in p.output, p.output
    finally:
        up.close()


def test_a_reload_that_cannot_boot_keeps_the_old_workers(tmp_path, broken_httptools):
    up = Upstream()
    conf = tmp_path / "httptp.conf"
    conf.write_text(f"out = {up.addr}\noutType = http\nhttpParser = h11\n")
    try:
        with HttpTp(f"-config={conf}", workers=2, env=broken_httptools) as p:
            old = set(p.worker_pids())
            conf.write_text(f"out = {up.addr}\noutType = http\nhttpParser = httptools\n")
            p.signal(signal.SIGHUP)
            assert wait_until(lambda: "reload aborted, keeping the running workers" in p.output), \
                p.output
            assert re.search(r"reload aborted, keeping the running workers: the new worker \d "
                             r"\(pid \d+, gen 1\) could not boot \(exit status 3\)", p.output), p.output
            assert [m.group(2) for m in map(BOOT_LINE.match, p.lines) if m] == ["1"], p.output
            assert set(p.worker_pids()) == old
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 200
            c.close()
            # respawns use the old configuration, not the broken one: no new boot error
            os.kill(min(old), signal.SIGKILL)
            assert wait_until(lambda: len(p.worker_pids()) == 2 and min(old) not in p.worker_pids())
            assert wait_until(lambda: re.search(r"worker \d \(pid \d+, gen 2\) ready after", p.output)), \
                p.output
            assert sum(bool(BOOT_LINE.match(l)) for l in p.lines) == 1, p.output
            assert p.proc.poll() is None
        assert "Traceback" not in p.output
    finally:
        up.close()


def test_a_configuration_that_booted_is_respawned_when_a_worker_later_cannot_boot(tmp_path):
    up = Upstream()
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", f"-accessLog={logs}/access.log",
                    workers=1) as p:
            (pid,) = p.worker_pids()
            shutil.rmtree(logs)                     # the replacement cannot open the access log
            os.kill(pid, signal.SIGKILL)
            boot = r"worker 0: cannot boot: FileNotFoundError: .*access\.log"
            assert wait_until(lambda: len(re.findall(boot, p.output)) >= 2), p.output
            assert re.search(r"worker 0 \(pid \d+, gen 0\) could not boot \(exit status 3\) "
                             r"after \S+ s; respawning in ", p.output), p.output
            assert p.proc.poll() is None, p.output
            logs.mkdir()                            # put back: the next respawn boots
            assert wait_until(lambda: re.search(r"worker 0 \(pid \d+, gen 0\) ready after",
                                                p.output.split("cannot boot")[-1]), timeout=20), \
                p.output
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c)[0] == 200
            c.close()
        assert "Traceback" not in p.output
    finally:
        up.close()
