"""docs/scenarios.md and docs/metrics.md, run for real.

Scenarios: every fenced ``sh`` block of docs/scenarios.md whose first line is
``# scenario: NAME`` (optionally ``(skip: reason)``) is one test.  Inside it:

- ``\\`` continues a line; ``#`` comment lines are ignored;
- a line ending in ``&`` is a background process: ``httptp ...`` runs the real
  command (``-expvarAddr=`` is added when the line has none; the test waits
  for "listening on"), ``python3 -m http.server PORT ...`` runs with this
  interpreter (the test waits until PORT accepts);
- any other line runs in bash and must exit 0, or, when it ends with
  ``# → TEXT``, print TEXT as its last line.

Before running, every port of ``127.0.0.1:PORT``, ``localhost:PORT`` and
``http.server PORT`` is replaced by a free port (the same doc port → the
same free port within a scenario), ``/tmp/httptp-`` by a temporary directory,
and ``/etc/httptp/certs/NAME.pem|.key`` by certificates made with trustme
(``ca.pem`` is the CA; any other NAME gets a certificate for localhost and
127.0.0.1 signed by it).  Every wait is bounded; every process is killed.

Metrics: every metric name documented in docs/metrics.md must appear in the
live /prometheus output of a real httptp, and every live ``httptp_*`` family
and compatibility name must be documented.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import HttpTp, Upstream

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS_MD = ROOT / "docs" / "scenarios.md"
METRICS_MD = ROOT / "docs" / "metrics.md"

# The scenarios the docs must keep (a scenario dropped from the page fails here).
EXPECTED = {"rtb", "unix-app", "unix-both", "teleports", "teleports-mtls", "batching", "codecs",
            "access", "balancing", "https", "acme"}


# --------------------------------------------------------------------------- parsing

@dataclass
class Scenario:
    name: str
    skip: str | None
    lines: list[str] = field(default_factory=list)


_HEAD = re.compile(r"#\s*scenario:\s*([\w-]+)\s*(?:\(skip:\s*(.*)\))?\s*$")


def parse_scenarios(text: str) -> list[Scenario]:
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
        raw = block.splitlines()
        m = _HEAD.match(raw[0]) if raw else None
        if not m:
            continue
        sc = Scenario(m.group(1), m.group(2))
        joined, buf = [], ""
        for line in raw[1:]:
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            joined.append(buf + line)
            buf = ""
        sc.lines = [l.strip() for l in joined if l.strip() and not l.strip().startswith("#")]
        out.append(sc)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PORT = re.compile(r"((?:127\.0\.0\.1|localhost):|http\.server )(\d{2,5})\b")
_CERT = re.compile(r"/etc/httptp/certs/([\w-]+)\.(pem|key)")


class Rewriter:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ports: dict[str, int] = {}
        self.certs = tmp / "certs"
        self._ca = None

    def __call__(self, line: str) -> str:
        line = line.replace("/tmp/httptp-", f"{self.tmp}/")
        line = _PORT.sub(lambda m: m.group(1) + str(self._port(m.group(2))), line)
        return _CERT.sub(lambda m: self._cert(m.group(1), m.group(2)), line)

    def _port(self, doc_port: str) -> int:
        if doc_port not in self.ports:
            self.ports[doc_port] = free_port()
        return self.ports[doc_port]

    def _cert(self, name: str, ext: str) -> str:
        trustme = pytest.importorskip("trustme")
        self.certs.mkdir(exist_ok=True)
        if self._ca is None:
            self._ca = trustme.CA()
            self._ca.cert_pem.write_to_path(str(self.certs / "ca.pem"))
        path = self.certs / f"{name}.{ext}"
        if name != "ca" and not path.exists():
            cert = self._ca.issue_cert("localhost", "127.0.0.1")
            with open(self.certs / f"{name}.pem", "wb") as f:
                for pem in cert.cert_chain_pems:
                    f.write(pem.bytes())
            cert.private_key_pem.write_to_path(str(self.certs / f"{name}.key"))
        return str(path)


# --------------------------------------------------------------------------- running

def wait_port(port: int, proc: subprocess.Popen, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{proc.args}: port {port} did not open in {timeout} s")


class Runner:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.httptps: list[HttpTp] = []
        self.others: list[subprocess.Popen] = []

    def background(self, line: str) -> None:
        argv = shlex.split(line, comments=True)[:-1]      # without the "&"
        if argv[0] == "httptp":
            args = argv[1:]
            if not any(a.startswith("-expvarAddr") for a in args):
                args.append("-expvarAddr=")
            self.httptps.append(HttpTp(*args, workers=1))     # a -workers in the docs wins
        elif argv[:3] == ["python3", "-m", "http.server"]:
            proc = subprocess.Popen([sys.executable, *argv[1:]], cwd=self.tmp,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            self.others.append(proc)
            wait_port(int(argv[3]), proc)
        else:
            raise AssertionError(f"unknown background command in docs/scenarios.md: {line}")

    def foreground(self, line: str) -> None:
        expect = None
        m = re.search(r"#\s*→\s*(\S+)\s*$", line)
        if m:
            expect = m.group(1)
        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60,
                           cwd=self.tmp, stdin=subprocess.DEVNULL)
        where = f"{line}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{self.logs()}"
        if expect is None:
            assert r.returncode == 0, f"exit {r.returncode}: {where}"
        else:
            last = (r.stdout.strip().splitlines() or [""])[-1].strip()
            assert last == expect, f"want {expect!r}, got {last!r}: {where}"

    def logs(self) -> str:
        return "\n".join(f"--- {' '.join(p.args)}\n{p.output}" for p in self.httptps)

    def close(self) -> None:
        for p in reversed(self.httptps):
            p.__exit__(None, None, None)
        for proc in self.others:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def is_background(line: str) -> bool:
    """Ends with a lone ``&`` (a comment may follow)."""
    return re.search(r"(?<!&)&\s*(#.*)?$", line) is not None


SCENARIOS = parse_scenarios(SCENARIOS_MD.read_text())


def test_the_page_keeps_every_scenario():
    assert {s.name for s in SCENARIOS} == EXPECTED


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(sc: Scenario):
    if sc.skip:
        pytest.skip(sc.skip)
    tmp = Path(tempfile.mkdtemp(prefix="hsc-"))      # short: unix socket paths
    rewrite, runner = Rewriter(tmp), Runner(tmp)
    try:
        assert any(l.startswith("httptp ") for l in sc.lines), "a scenario runs httptp"
        assert not all(map(is_background, sc.lines)), "a scenario sends a request"
        for line in sc.lines:
            line = rewrite(line)
            if is_background(line):
                runner.background(line)
            else:
                runner.foreground(line)
        for p in runner.httptps:
            assert "Traceback" not in p.output, p.output
    finally:
        runner.close()
        subprocess.run(["rm", "-rf", str(tmp)], timeout=10)


# --------------------------------------------------------------------------- metrics drift

def _split_names(names) -> tuple[set[str], set[str]]:
    """(compatibility names, httptp_* names)."""
    compat, ours = set(), set()
    for name in names:
        (ours if name.startswith("httptp_") else compat).add(name)
    return compat, ours


def documented_metrics(text: str) -> tuple[set[str], set[str]]:
    """(compatibility names, httptp_* names) from the first column of the tables."""
    return _split_names(re.findall(r"^\|\s*`([A-Za-z0-9_]+)`", text, flags=re.M))


def live_metrics(body: str) -> tuple[set[str], set[str]]:
    return _split_names(re.findall(r"^# TYPE (\S+) \S+$", body, flags=re.M))


def test_metrics_doc_matches_live_prometheus():
    up = Upstream(name="u")
    port = free_port()
    try:
        with HttpTp("-outType=http", f"-out={up.addr},127.0.0.1:{free_port()}",
                    f"-expvarAddr=127.0.0.1:{port}", workers=2) as p:
            for i in range(10):
                urllib.request.urlopen(f"http://{p.addr}/m{i}", timeout=10).read()
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/prometheus",
                                          timeout=10).read().decode()
            expvar = urllib.request.urlopen(f"http://127.0.0.1:{port}/expvar",
                                            timeout=10).read().decode()
    finally:
        up.close()
    doc_compat, doc_ours = documented_metrics(METRICS_MD.read_text())
    live_compat, live_ours = live_metrics(body)
    assert doc_compat - {"cmdline"} == live_compat, (
        f"in docs only: {sorted(doc_compat - {'cmdline'} - live_compat)}; "
        f"live only: {sorted(live_compat - doc_compat)}")
    assert '"cmdline"' in expvar
    assert doc_ours == live_ours, (
        f"in docs only: {sorted(doc_ours - live_ours)}; live only: {sorted(live_ours - doc_ours)}")
