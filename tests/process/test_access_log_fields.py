"""The access log's fields, request ids and passive health lines, through the
real httptp: http and https listeners, and a teleport chain the id crosses.

    client ──http/https──▶ httptp ──http──▶ upstream
    client ──http──▶ A ──teleport──▶ B ──http──▶ upstream
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time

import pytest

from tests.helpers import HttpTp, Reply, Upstream, get

pytestmark = pytest.mark.timeout(60)

FIELDS = re.compile(r'^\S+ - - \[[^\]]+\] "[^"]*" \d{3} \d+ "[^"]*" "[^"]*" (.*)$')


def _lines(path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _wait_lines(path, n, timeout=10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(_lines(path)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return _lines(path)


def fields(line: str) -> dict:
    """Our key=value fields after nginx's combined part of a text line."""
    m = FIELDS.match(line)
    assert m, line
    return dict(part.split("=", 1) for part in m.group(1).split(" "))


def recording_upstream(seen: list, status: int = 200) -> Upstream:
    """An upstream that keeps each request's X-Request-Id (None without one)."""
    def handler(method, path, headers, body):
        seen.append((path, headers.get(b"x-request-id")))
        code = 503 if path.startswith(b"/fail") else status
        return Reply(status=code, body=b"answer")
    return Upstream(handler=handler)


def test_http_fields_and_request_ids(tmp_path):
    seen: list = []
    up = recording_upstream(seen)
    log = tmp_path / "access.log"
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", f"-accessLog={log}", workers=1) as p:
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c, "/gen", headers={"Host": "h.example"})[0] == 200
            assert get(c, "/kept", method="POST", body=b"hello",
                       headers={"X-Request-Id": "client-1"})[0] == 200
            assert get(c, "/bad", headers={"X-Request-Id": "has space"})[0] == 200
            assert get(c, "/fail")[0] == 503
            lines = _wait_lines(log, 4)
    finally:
        up.close()
    assert len(lines) == 4, lines
    gen, kept, bad, fail = (fields(line) for line in lines)
    ids = dict(seen)
    generated = ids[b"/gen"].decode()
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", generated)
    assert gen["request_id"] == generated and gen["host"] == '"h.example"'
    assert gen["upstream_status"] == "200" and gen["tries"] == "1"
    assert gen["bytes_received"] == "0" and gen["tls"] == "-" and gen["sni"] == "-"
    assert float(gen["request_time"]) >= float(gen["upstream_time"])
    assert ids[b"/kept"] == b"client-1" and kept["request_id"] == "client-1"
    assert kept["bytes_received"] == "5"
    replaced = ids[b"/bad"].decode()
    assert replaced != "has space" and bad["request_id"] == replaced
    assert replaced.rsplit("-", 1)[0] == generated.rsplit("-", 1)[0]     # one worker's prefix
    assert lines[3].split('"')[2].split()[0] == "503" and fail["upstream_status"] == "503"


def test_json_fields_and_ids_turned_off(tmp_path):
    seen: list = []
    up = recording_upstream(seen)
    log = tmp_path / "access.log"
    try:
        with HttpTp(f"-out={up.addr}", "-outType=http", f"-accessLog={log}", "-logFormat=json",
                    "-requestIDHeader=", workers=1) as p:
            c = http.client.HTTPConnection(p.host, p.port, timeout=5)
            assert get(c, "/j", method="PUT", body=b"abc", headers={"Host": "j.example"})[0] == 200
            lines = _wait_lines(log, 1)
            errors = [json.loads(line) for line in p.lines if line.startswith("{")]
    finally:
        up.close()
    listening = next(e for e in errors if e["msg"].startswith("listening on "))
    assert listening["level"] == "info" and listening["who"] == "master"
    assert all(e["level"] in ("info", "warning", "error") for e in errors)
    record = json.loads(lines[0])
    assert seen == [(b"/j", None)] and record["request_id"] is None
    assert record["host"] == "j.example" and record["bytes_received"] == 3
    assert record["upstream_status"] == 200 and record["tries"] == 1
    assert record["duration"] == record["request_time"] >= 0
    assert record["tls_version"] is None and record["sni"] is None


def server_cert(tmp_path):
    """A CA (trustme) and a certificate for localhost: (ca, cert file, key file)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca, cert_file, key_file


def test_https_listener_logs_tls_version_and_sni(tmp_path):
    ca, cert_file, key_file = server_cert(tmp_path)
    seen: list = []
    up = recording_upstream(seen)
    log = tmp_path / "access.log"
    try:
        with HttpTp("-inType=https", f"-inTLSCert={cert_file}", f"-inTLSKey={key_file}",
                    f"-out={up.addr}", "-outType=http", f"-accessLog={log}", workers=1) as p:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            c = http.client.HTTPSConnection("localhost", p.port, context=ctx, timeout=5)
            assert get(c, "/tls")[0] == 200
            raw = socket.create_connection((p.host, p.port), timeout=5)   # no SNI at all
            ctx2 = ssl.create_default_context()
            ca.configure_trust(ctx2)
            ctx2.check_hostname = False
            t = ctx2.wrap_socket(raw)
            t.sendall(b"GET /nosni HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert t.recv(100).startswith(b"HTTP/1.1 200 ")
            t.close()
            lines = _wait_lines(log, 2)
    finally:
        up.close()
    by_path = {("/tls" if "/tls " in line else "/nosni"): fields(line) for line in lines}
    assert by_path["/tls"]["tls"] in ("TLSv1.2", "TLSv1.3")
    assert by_path["/tls"]["sni"] == "localhost"
    assert by_path["/nosni"]["tls"].startswith("TLSv1.") and by_path["/nosni"]["sni"] == "-"
    assert by_path["/tls"]["request_id"] == dict(seen)[b"/tls"].decode()


@pytest.mark.parametrize("kind", ["teleport", "teleports"])
def test_request_id_crosses_a_teleport_link(tmp_path, kind):
    seen: list = []
    up = recording_upstream(seen)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    b_tls, a_tls = [], []
    if kind == "teleports":
        ca, cert_file, key_file = server_cert(tmp_path)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        b_tls = [f"-inTLSCert={cert_file}", f"-inTLSKey={key_file}"]
        a_tls = [f"-outTLSCA={tmp_path / 'ca.pem'}"]
    try:
        with HttpTp(f"-inType={kind}", *b_tls, "-outType=http", f"-out={up.addr}",
                    f"-accessLog={b_log}", workers=1) as b, \
                HttpTp(f"-outType={kind}", *a_tls, f"-out=localhost:{b.port}",
                       f"-accessLog={a_log}", workers=1) as a:
            c = http.client.HTTPConnection(a.host, a.port, timeout=10)
            assert get(c, "/tp", headers={"Host": "t.example"})[0] == 200
            assert get(c, "/tp-kept", headers={"X-Request-Id": "outer-7"})[0] == 200
            # refused by A itself (a GET with a body cannot cross): logged too
            assert get(c, "/tp-body", body=b"abc")[0] == 400
            a_lines, b_lines = _wait_lines(a_log, 3), _wait_lines(b_log, 2)
    finally:
        up.close()
    ids = dict(seen)
    generated = ids[b"/tp"].decode()
    assert [fields(line)["request_id"] for line in a_lines] == [generated, "outer-7", "-"]
    assert '"GET /tp-body HTTP/1.1" 400 ' in a_lines[2] and len(b_lines) == 2
    assert [fields(line)["request_id"] for line in b_lines] == [generated, "outer-7"]
    assert ids[b"/tp-kept"] == b"outer-7"
    assert fields(b_lines[0])["host"] == '"t.example"'
    assert fields(a_lines[0])["upstream_status"] == "200"
    b_fields = fields(b_lines[0])
    if kind == "teleports":      # the link's TLS, as B saw it
        assert b_fields["tls"].startswith("TLSv1.") and b_fields["sni"] == "localhost"
    else:
        assert b_fields["tls"] == "-" and b_fields["sni"] == "-"


def test_passive_health_events_are_logged_once_without_log_all_errors(tmp_path):
    """-outMaxFails=1: at low load the penalty steers every request away after
    one failure, so more would seldom come in a row."""
    good, bad = Upstream(name="good"), Upstream(name="bad")
    log = tmp_path / "access.log"
    down = f"upstream {bad.addr} is down: "
    back = f"upstream {bad.addr} is up again: the trial request succeeded"
    try:
        with HttpTp(f"-out={good.addr},{bad.addr}", "-outType=http", "-outMaxFails=1",
                    "-outFailTimeout=1s", f"-accessLog={log}", workers=2) as p:
            bad.kill()                      # accepts, then resets: each request fails

            def requests_until(text, most=400, seconds=20.0):
                deadline = time.monotonic() + seconds
                for _ in range(most):
                    if text in p.output or time.monotonic() > deadline:
                        break
                    c = http.client.HTTPConnection(p.host, p.port, timeout=5)
                    assert get(c, "/")[0] == 200    # GET: retried on the good one
                    c.close()
                    time.sleep(0.01)
                return text in p.output
            assert requests_until(down), p.output
            bad.revive()
            assert requests_until(back), p.output
            time.sleep(0.2)
            output = p.output
            lines = _wait_lines(log, 1)
    finally:
        good.close()
        bad.close()
    assert output.count(down) == 1, output
    line = next(l for l in output.splitlines() if down in l)
    assert "failed once (-outMaxFails=1)" in line and "-outFailTimeout" in line
    assert re.search(r"httptp: worker \d: upstream", line)
    assert f"upstream {bad.addr}: " not in output       # single failures: -logAllErrors only
    assert any(int(fields(l)["tries"]) >= 2 for l in lines), lines
