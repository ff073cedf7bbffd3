"""The master (httptp.supervisor.arbiter) with real forks, sockets and signals.

Workers are the blocking stand-in of ``stub_worker.py`` (no gevent), so these
tests pin the master's behaviour on their own.  Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

STUB = os.path.join(os.path.dirname(__file__), "stub_worker.py")
LISTEN_RE = re.compile(r"^httptp: listening on (\S+) pid=(\d+)$")


class Master:
    """``stub_worker.py`` (an Arbiter with stub workers) in a subprocess."""

    def __init__(self, tmp_path, *flags, workers=2, env=None, wait=True):
        self.reload_file = tmp_path / "reload.flags"
        self.reload_file.write_text("")
        if not any(f.startswith("-in=") for f in flags):
            flags += ("-in=127.0.0.1:0",)
        e = dict(os.environ, STUB_RELOAD_FILE=str(self.reload_file), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, STUB, f"-workers={workers}", "-out=127.0.0.1:1",
             "-gracefulTimeout=5s", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=e, start_new_session=True)
        self.lines: list[str] = []
        self.addr = None
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            assert self.wait_for("listening on"), self.output
            assert self.wait_count(" ready after ", workers), self.output

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            m = LISTEN_RE.match(line)
            if m:
                self.addr = m.group(1)
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text, timeout=10.0) -> bool:
        return wait_until(lambda: text in self.output, timeout)

    def wait_count(self, text, n, timeout=10.0) -> bool:
        return wait_until(lambda: sum(text in line for line in self.lines) >= n, timeout)

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def children(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return {int(x) for x in out.stdout.split()}

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def connect(self) -> socket.socket:
        if self.addr.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(self.addr)
        else:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def get(self, path="/") -> tuple[int, int]:
        """(worker pid, generation) that answered."""
        with self.connect() as sock:
            return send_request(sock, path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def send_request(sock: socket.socket, path="/") -> tuple[int, int]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    pid, generation = body.split()
    return int(pid), int(generation)


def test_workers_start_and_each_slot_serves(tmp_path):
    with Master(tmp_path, workers=3) as m:
        assert any(LISTEN_RE.match(l) for l in m.lines), m.output
        assert f"pid={m.proc.pid}" in m.output
        workers = m.children()
        assert len(workers) == 3
        seen = {m.get()[0] for _ in range(60)}
        assert seen <= workers and len(seen) >= 2     # the kernel spreads over the slot sockets
        assert "Traceback" not in m.output


def test_kill9_worker_is_respawned_and_serves_what_queued_meanwhile(tmp_path):
    with Master(tmp_path, workers=1, env={"STUB_BOOT_DELAY": "1.0"}) as m:
        (old,) = m.children()
        os.kill(old, signal.SIGKILL)
        assert m.wait_for("was killed by signal 9 (SIGKILL)"), m.output
        # No worker accepts now (the replacement sleeps 1 s first): this connection
        # waits on the slot socket the master kept open.
        with m.connect() as sock:
            pid, _ = send_request(sock)
        assert pid != old and pid in m.children()
        assert re.search(r"worker 0 \(pid %d, gen 0\) was killed by signal 9 \(SIGKILL\) "
                         r"after \S+ s; respawning (now|in 0.1 s)" % old, m.output), m.output


def test_term_lets_the_inflight_request_finish_then_exits_0(tmp_path):
    with Master(tmp_path, workers=2) as m:
        box = {}
        client = threading.Thread(target=lambda: box.setdefault("r", m.get("/slow")))
        client.start()
        time.sleep(0.4)
        t0 = time.monotonic()
        m.signal(signal.SIGTERM)
        client.join(10)
        assert box["r"][0] > 0
        assert m.proc.wait(10) == 0, m.output
        assert time.monotonic() - t0 > 0.8        # it waited for the slow request
        assert "graceful stop: SIGTERM to 2 workers" in m.output
        assert "Traceback" not in m.output


def test_quit_is_fast_even_with_a_request_in_flight(tmp_path):
    with Master(tmp_path, workers=2) as m:
        threading.Thread(target=lambda: _ignore_errors(m.get, "/hang"), daemon=True).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        m.signal(signal.SIGQUIT)
        assert m.proc.wait(5) == 0, m.output
        assert time.monotonic() - t0 < 3
        assert "fast stop: SIGQUIT" in m.output


def test_second_int_escalates_a_graceful_stop(tmp_path):
    with Master(tmp_path, workers=1) as m:
        threading.Thread(target=lambda: _ignore_errors(m.get, "/hang"), daemon=True).start()
        time.sleep(0.3)
        m.signal(signal.SIGINT)
        assert m.wait_for("graceful stop: SIGTERM"), m.output
        m.signal(signal.SIGINT)
        assert m.proc.wait(5) == 0, m.output
        assert "fast stop: SIGQUIT" in m.output


def test_hup_replaces_every_worker_without_a_refused_connection(tmp_path):
    with Master(tmp_path, workers=2) as m:
        old = m.children()
        failures, answers, stop = [], [], threading.Event()

        def client_loop():
            while not stop.is_set():
                try:
                    answers.append(m.get())
                except Exception as err:       # noqa: BLE001 - counted, then asserted
                    failures.append(repr(err))

        client = threading.Thread(target=client_loop)
        client.start()
        time.sleep(0.3)
        m.reload_file.write_text("-out=127.0.0.1:2")
        m.signal(signal.SIGHUP)
        done = m.wait_for("reloaded: 2 workers run generation 1")
        time.sleep(0.3)
        stop.set()
        client.join(10)
        assert done, m.output
        assert failures == []
        assert wait_until(lambda: len(m.children()) == 2 and not m.children() & old), m.output
        assert {g for _, g in answers[-5:]} == {1}
        assert len(answers) > 20


def test_hup_with_a_failing_reload_keeps_the_workers(tmp_path):
    with Master(tmp_path, workers=2) as m:
        old = m.children()
        m.reload_file.write_text("fail: boom")
        m.signal(signal.SIGHUP)
        assert m.wait_for("httptp: error: reload failed, keeping the running configuration: boom")
        m.reload_file.write_text("-in=127.0.0.1:1")
        m.signal(signal.SIGHUP)
        assert m.wait_for("httptp: error: reload failed, keeping the running configuration: "
                          "changing -in needs a restart"), m.output
        time.sleep(0.2)
        assert m.children() == old
        assert m.get()[1] == 0
        assert "Traceback" not in m.output


def test_hup_is_aborted_when_a_new_worker_dies_before_ready(tmp_path):
    with Master(tmp_path, workers=2) as m:
        old = m.children()
        m.reload_file.write_text("-out=127.0.0.1:9")   # the stub crashes
        m.signal(signal.SIGHUP)
        assert m.wait_for("reload aborted, keeping the running workers"), m.output
        assert "crashed: RuntimeError: stub told to crash at stub_worker.py:" in m.output
        assert "Traceback" not in m.output
        time.sleep(0.2)
        assert m.children() == old
        assert m.get()[0] in old


def test_ttin_adds_and_ttou_removes_a_worker(tmp_path):
    with Master(tmp_path, workers=1) as m:
        m.signal(signal.SIGTTIN)
        assert m.wait_for("TTIN: now 2 workers"), m.output
        assert wait_until(lambda: len(m.children()) == 2)
        assert m.wait_count(" ready after ", 2)
        m.signal(signal.SIGUSR1)
        assert m.wait_count(" USR1", 2), m.output
        m.signal(signal.SIGTTOU)
        assert m.wait_for("TTOU: now 1 workers"), m.output
        assert wait_until(lambda: len(m.children()) == 1), m.output
        for _ in range(20):
            m.get()
        m.signal(signal.SIGTTOU)
        assert m.wait_for("TTOU ignored: one worker is the least")


def test_a_silent_worker_is_killed_and_replaced(tmp_path):
    with Master(tmp_path, workers=1, env={"STUB_HEARTBEAT_TIMEOUT": "1"}) as m:
        (old,) = m.children()
        threading.Thread(target=lambda: _ignore_errors(m.get, "/hang"), daemon=True).start()
        assert m.wait_for("sent no heartbeat for"), m.output
        assert m.wait_for("was killed by signal 9 (SIGKILL)"), m.output
        assert m.get()[0] != old


@pytest.mark.parametrize("holder_reuseport", [False, True])
def test_port_in_use_is_one_line_and_exit_1(tmp_path, holder_reuseport):
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(holder_reuseport))
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with Master(tmp_path, f"-in=127.0.0.1:{port}", wait=False) as m:
            assert m.proc.wait(10) == 1
            assert wait_until(lambda: m.lines)
            time.sleep(0.1)
            assert m.lines == [f"httptp: -in: cannot listen on 127.0.0.1:{port}: "
                               "[Errno 98] Address already in use"]
    finally:
        holder.close()


def test_unix_socket_serves_and_is_removed_at_exit(tmp_path):
    path = str(tmp_path / "in.sock")
    with Master(tmp_path, f"-in={path}", "-inType=unix", workers=2) as m:
        assert m.addr == path
        assert m.get()[0] in m.children()
        m.signal(signal.SIGTERM)
        assert m.proc.wait(10) == 0, m.output
    assert not os.path.exists(path)


def test_unix_path_that_is_not_a_socket_is_refused(tmp_path):
    path = tmp_path / "in.sock"
    path.write_text("precious")
    with Master(tmp_path, f"-in={path}", "-inType=unix", wait=False) as m:
        assert m.proc.wait(10) == 1
        assert wait_until(lambda: m.lines)
        assert m.lines == [f"httptp: -in: cannot listen on {path}: exists and is not a socket"]
    assert path.read_text() == "precious"


def test_sd_notify_ready_reloading_stopping_on_an_abstract_socket(tmp_path):
    name = f"httptp-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + name)
        systemd.settimeout(10)
        with Master(tmp_path, workers=2, env={"NOTIFY_SOCKET": "@" + name}) as m:
            assert systemd.recv(4096).decode().splitlines()[0] == "READY=1"
            m.reload_file.write_text("-out=127.0.0.1:2")
            m.signal(signal.SIGHUP)
            reloading = systemd.recv(4096).decode().splitlines()
            assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
            ready = systemd.recv(4096).decode().splitlines()
            assert ready[0] == "READY=1" and "generation 1" in ready[1]
            m.signal(signal.SIGTERM)
            assert systemd.recv(4096).decode().splitlines()[0] == "STOPPING=1"
            assert m.proc.wait(10) == 0


def test_importing_the_arbiter_pulls_in_neither_gevent_nor_threads():
    code = ("import sys, threading, httptp.supervisor.arbiter; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'gevent'], 'gevent'; "
            "assert threading.active_count() == 1")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:   # noqa: BLE001 - the worker is killed under this request on purpose
        pass
