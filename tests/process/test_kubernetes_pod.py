"""The two ConfigMaps of deploy/kubernetes/ served by the real httptp, under the
constraints of their pods.

deployment.yaml runs httptp as uid and gid 10001 (the Dockerfile's USER), with no
capability, no privilege escalation (no_new_privs) and a read-only root file
system.  Here each httptp runs the same way: setpriv drops to 10001 with empty
capability sets and no_new_privs, inside a private mount namespace where / is
remounted read-only.  That is stricter than the pod: even /tmp (an emptyDir in
the pod) is read-only.  The two scenarios form the chain they form in
production:

    client → teleport-out (HTTP in, teleports out) → teleport-in (teleports in, HTTP out) → upstream

Only the addresses and the certificate paths differ from the ConfigMaps.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import HTTPTP, HttpTp, Upstream, get

pytestmark = pytest.mark.timeout(120)

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
POD_UID = 10001     # deployment.yaml's runAsUser, the Dockerfile's USER (tests/unit/test_kubernetes.py)


def _pod_wrap() -> list[str]:
    """A command prefix that execs its arguments as the pod would run them."""
    script = ("mount --make-rprivate / && mount -o remount,bind,ro / && "
              f"exec setpriv --reuid={POD_UID} --regid={POD_UID} --clear-groups "
              '--no-new-privs --bounding-set=-all --inh-caps=-all "$@"')
    return ["unshare", "--mount", "sh", "-c", script, "pod"]


@pytest.fixture(scope="module")
def pod_wrap() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a mount namespace and drop to uid 10001")
    for tool in ("unshare", "setpriv"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} (util-linux) is not installed")
    probe = subprocess.run(
        [*_pod_wrap(), "sh", "-c", "awk '$5 == \"/\" {print $6}' /proc/self/mountinfo; id -u"],
        capture_output=True, text=True, timeout=20)
    lines = probe.stdout.split()
    if probe.returncode != 0 or len(lines) != 2 or lines[1] != str(POD_UID):
        pytest.skip(f"cannot run as uid {POD_UID} in a mount namespace here: "
                    f"{probe.stderr.strip() or probe.stdout.strip()}")
    assert lines[0].split(",")[0] == "ro", f"the root is not read-only in the namespace: {lines[0]}"
    # This installation must be readable by that user (a Python under /root is not).
    check = subprocess.run([*_pod_wrap(), HTTPTP, "-checkConfig", "-outType=http", "-out=127.0.0.1:1"],
                           capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        pytest.skip(f"uid {POD_UID} cannot run this installation of httptp: "
                    f"{(check.stderr.strip().splitlines() or ['?'])[-1]}")
    return _pod_wrap()


@pytest.fixture
def pod_dir():
    """Files the pod's user can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="httptp-pod-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _configmap(scenario: str, into: Path) -> Path:
    (doc,) = [d for d in yaml.safe_load_all((KUBE / scenario / "configmap.yaml").read_text()) if d]
    path = into / f"{scenario}.conf"
    path.write_text(doc["data"]["httptp.conf"])
    path.chmod(0o644)
    return path


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _stats_port(p: HttpTp) -> int:
    m = re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output)
    assert m, p.output
    return int(m.group(1))


def _healthz(p: HttpTp) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", _stats_port(p), timeout=10)
    try:
        return get(conn, "/healthz")[0]
    finally:
        conn.close()


def _assert_runs_as_the_pod(p: HttpTp) -> None:
    for pid in [p.proc.pid, *p.worker_pids()]:
        status = _status(pid)
        assert status["Uid"].split() == [str(POD_UID)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(POD_UID)] * 4, status["Gid"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1"


def test_the_two_configmaps_serve_as_their_pods_run_them(pod_wrap, pod_dir):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    files = {"tls.crt": cert.cert_chain_pems[0], "tls.key": cert.private_key_pem, "ca.pem": ca.cert_pem}
    for name, blob in files.items():
        blob.write_to_path(pod_dir / name)
        (pod_dir / name).chmod(0o644)
    up = Upstream(name="app")
    try:
        with HttpTp(f"-config={_configmap('teleport-in', pod_dir)}", "-in=127.0.0.1:0",
                    f"-out={up.addr}", f"-inTLSCert={pod_dir / 'tls.crt'}",
                    f"-inTLSKey={pod_dir / 'tls.key'}", "-expvarAddr=127.0.0.1:0",
                    workers=2, wrap=pod_wrap) as listener, \
             HttpTp(f"-config={_configmap('teleport-out', pod_dir)}", "-in=127.0.0.1:0",
                    f"-out=127.0.0.1:{listener.port}", f"-outTLSCA={pod_dir / 'ca.pem'}",
                    "-outTLSServerName=localhost", "-expvarAddr=127.0.0.1:0",
                    workers=2, wrap=pod_wrap) as partner:
            for p in (listener, partner):
                _assert_runs_as_the_pod(p)
            conn = http.client.HTTPConnection("127.0.0.1", partner.port, timeout=10)
            try:
                for i in range(5):
                    status, _, body = get(conn, f"/bid?id={i}")
                    assert (status, body) == (200, b"app"), (partner.output, listener.output)
            finally:
                conn.close()
            assert up.requests == 5
            assert _healthz(partner) == 200 and _healthz(listener) == 200
            for p in (partner, listener):
                p.signal(signal.SIGTERM)
                assert p.wait(40) == 0, p.output
    finally:
        up.close()
    for p in (partner, listener):
        assert p.lines, "no log line"
        for line in p.lines:     # logFormat = json: every line a JSON object
            assert isinstance(json.loads(line), dict), line
        assert "Read-only file system" not in p.output and "Permission denied" not in p.output
