"""Discovery with the real `httptp`: -out names and SRV records, answered by a
DNS server inside the test (tests/dnsserver.py), upstreams on 127.0.0.2-5."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time

import pytest

from tests.dnsserver import DNSServer
from tests.helpers import HttpTp, Reply, Upstream, load, run_httptp, wait_until

pytestmark = pytest.mark.timeout(90)

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def _loopback_aliases() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.5", 0))
        return True
    except OSError:
        return False


if not _loopback_aliases():
    pytest.skip("127.0.0.2-5 cannot be bound here", allow_module_level=True)


def upstreams_on_one_port(hosts=HOSTS) -> list[Upstream]:
    """One upstream per host, all on the same port (an A record has no port);
    each answers with its own address."""
    for _ in range(20):                 # bounded: a port free on all four hosts
        first = Upstream(host=hosts[0], name=hosts[0])
        ups = [first]
        try:
            for host in hosts[1:]:
                ups.append(Upstream(host=host, port=first.port, name=host))
            return ups
        except OSError:
            for u in ups:
                u.close()
    raise AssertionError("no port free on all of " + ", ".join(hosts))


def stats_get(p: HttpTp, path: str) -> bytes:
    assert wait_until(lambda: "stats on http://" in p.output), p.output
    port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", p.output).group(1))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        return c.getresponse().read()
    finally:
        c.close()


def served_by(p: HttpTp, n: int = 40) -> dict[bytes | int, int]:
    """Which upstream answered ``n`` sequential requests on fresh connections
    (the status for an answer other than 200)."""
    seen: dict[bytes, int] = {}
    for _ in range(n):
        c = http.client.HTTPConnection(p.host, p.port, timeout=5)
        try:
            c.request("GET", "/")
            r = c.getresponse()
            body = r.read() if r.status == 200 else r.status
            r.read()
            seen[body] = seen.get(body, 0) + 1
        finally:
            c.close()
    return seen


def counts(ups) -> dict[str, int]:
    return {u.name: u.requests for u in ups}


@pytest.fixture
def dns_and_upstreams():
    server = DNSServer(ttl=1)
    ups = upstreams_on_one_port()
    try:
        yield server, ups
    finally:
        server.close()
        for u in ups:
            u.close()


def httptp_for(server: DNSServer, out: str, *extra: str, workers: int = 2) -> HttpTp:
    return HttpTp("-outType=http", f"-out={out}", f"-resolver={server.addr}",
                  "-outResolveInterval=1s", "-expvarAddr=127.0.0.1:0", *extra, workers=workers)


def test_two_a_records_are_two_upstreams_with_traffic_on_both(dns_and_upstreams):
    server, ups = dns_and_upstreams
    port = ups[0].port
    server.set("app.test", "A", ["127.0.0.2", "127.0.0.3"])
    with httptp_for(server, f"app.test:{port}") as p:
        res = load(p.host, p.port, threads=4, duration=2.0, max_requests=400)
        assert res.failed == 0, res.errors[:3]
        c = counts(ups)
        assert c["127.0.0.2"] > 0 and c["127.0.0.3"] > 0, c
        assert c["127.0.0.4"] == c["127.0.0.5"] == 0, c
        text = stats_get(p, "/prometheus").decode()
        assert f'upstream="127.0.0.2:{port} (app.test:{port})"' in text
        assert f'upstream="127.0.0.3:{port} (app.test:{port})"' in text
        assert "httptp_upstream_resolve_errors_total 0.0" in text


def test_a_record_change_under_load_moves_traffic_without_a_failure(dns_and_upstreams):
    server, ups = dns_and_upstreams
    port = ups[0].port
    server.set("app.test", "A", ["127.0.0.2", "127.0.0.3"])
    with httptp_for(server, f"app.test:{port}") as p:
        stop = threading.Event()
        result = {}
        loader = threading.Thread(target=lambda: result.update(
            r=load(p.host, p.port, threads=6, duration=20.0, max_requests=200000, stop=stop)))
        loader.start()
        try:
            assert wait_until(lambda: ups[0].requests > 0 and ups[1].requests > 0, timeout=10)
            server.set("app.test", "A", ["127.0.0.4", "127.0.0.5"])
            changed = time.monotonic()
            # within -outResolveInterval (1 s) + 2 s the new ones have it all
            assert wait_until(lambda: ups[2].requests > 0 and ups[3].requests > 0, timeout=10)
            time.sleep(max(0.0, changed + 3.0 - time.monotonic()))
            before = counts(ups)
            assert wait_until(lambda: ups[2].requests > before["127.0.0.4"] + 20
                              and ups[3].requests > before["127.0.0.5"] + 20, timeout=10)
            after = counts(ups)
        finally:
            stop.set()
            loader.join(60)
        assert after["127.0.0.2"] == before["127.0.0.2"], (before, after)
        assert after["127.0.0.3"] == before["127.0.0.3"], (before, after)
        # the removed ones' pooled connections were closed by httptp
        assert wait_until(lambda: not ups[0]._conns and not ups[1]._conns, timeout=5)
        res = result["r"]
        assert res.ok > 0 and res.failed == 0, (res.statuses, res.errors[:3])
        assert "upstreams now: 127.0.0.4" in p.output


def test_a_dns_server_that_stops_answering_keeps_the_last_set(dns_and_upstreams):
    server, ups = dns_and_upstreams
    port = ups[0].port
    server.set("app.test", "A", ["127.0.0.2", "127.0.0.3"])
    with httptp_for(server, f"app.test:{port}") as p:
        server.answering = False
        asked = server.queries
        assert wait_until(lambda: server.queries > asked + 2, timeout=15)
        assert wait_until(lambda: json.loads(stats_get(p, "/expvar"))["outResolveErrors"] > 0,
                          timeout=15)
        before = counts(ups)
        res = load(p.host, p.port, threads=4, duration=1.5, max_requests=300)
        assert res.failed == 0, res.errors[:3]
        after = counts(ups)
        assert after["127.0.0.2"] > before["127.0.0.2"], (before, after)
        assert after["127.0.0.3"] > before["127.0.0.3"], (before, after)
        failures = [line for line in p.lines if "cannot resolve" in line]
        assert len(failures) == 1, failures          # once per name per minute
        assert f"-out app.test:{port}: cannot resolve" in failures[0]
        assert "keeping its last 2 address(es)" in failures[0]


def test_srv_name_gives_its_targets_and_ports():
    server = DNSServer(ttl=1)
    ups = [Upstream(host="127.0.0.2", name="a"), Upstream(host="127.0.0.3", name="b"),
           Upstream(host="127.0.0.4", name="backup")]
    try:
        server.set("_http._tcp.app.test", "SRV", [
            f"0 10 {ups[0].port} a.app.test.", f"0 10 {ups[1].port} b.app.test.",
            f"10 10 {ups[2].port} c.app.test."])
        server.set("a.app.test", "A", ["127.0.0.2"])
        server.set("b.app.test", "A", ["127.0.0.3"])
        server.set("c.app.test", "A", ["127.0.0.4"])
        with httptp_for(server, "_http._tcp.app.test") as p:
            seen = served_by(p, 40)
            assert seen.get(b"a", 0) > 0 and seen.get(b"b", 0) > 0, seen
            assert b"backup" not in seen, seen      # priority 10: only when 0 is all down
            text = stats_get(p, "/prometheus").decode()
            assert f'upstream="127.0.0.4:{ups[2].port} (_http._tcp.app.test)"' in text
            ups[0].kill()
            ups[1].kill()
            # the lowest priority is ejected (502s while it happens): the next takes over
            assert wait_until(lambda: served_by(p, 5).get(b"backup", 0) == 5, timeout=20)
    finally:
        server.close()
        for u in ups:
            u.close()


def test_teleport_out_resolves_each_address_to_its_own_link(dns_and_upstreams):
    server, ups = dns_and_upstreams
    # two teleport listeners, on 127.0.0.2 and 127.0.0.3, same port, each in
    # front of its own http upstream
    back = []
    try:
        tport = None
        for _ in range(20):
            with socket.socket() as s:
                s.bind(("127.0.0.2", 0))
                tport = s.getsockname()[1]
            try:
                for host, up in zip(HOSTS[:2], ups[:2]):
                    back.append(HttpTp(f"-in={host}:{tport}", "-inType=teleport",
                                       "-outType=http", f"-out={up.addr}", workers=1))
                break
            except AssertionError:
                for b in back:
                    b.__exit__(None, None, None)
                back = []
        assert back, "no common port for the teleport listeners"
        server.set("tp.test", "A", ["127.0.0.2", "127.0.0.3"])
        with HttpTp("-outType=teleport", f"-out=tp.test:{tport}", f"-resolver={server.addr}",
                    "-outResolveInterval=1s", workers=1) as p:
            res = load(p.host, p.port, threads=4, duration=2.0, max_requests=400)
            assert res.failed == 0, res.errors[:3]
            assert ups[0].requests > 0 and ups[1].requests > 0, counts(ups)
    finally:
        for b in back:
            b.__exit__(None, None, None)


def test_a_name_that_does_not_resolve_stops_the_start_with_one_line():
    with DNSServer() as server:
        server.set("other.test", "A", ["127.0.0.2"])
        for extra in ((), ("-checkConfig",)):
            r = run_httptp("-outType=http", "-out=app.test:80", f"-resolver={server.addr}",
                           *extra)
            assert r.returncode == 2, r
            assert r.stderr.strip().splitlines() == [
                "httptp: -out: app.test:80 does not resolve: no such name (NXDOMAIN)"]
        r = run_httptp("-outType=http", "-out=other.test:80", f"-resolver={server.addr}",
                       "-checkConfig")
        assert r.returncode == 0 and "configuration OK" in r.stdout, r


def test_resolve_wait_waits_for_the_name():
    with DNSServer() as server:
        up = Upstream(host="127.0.0.2", name="late")
        try:
            p = HttpTp("-outType=http", f"-out=late.test:{up.port}", f"-resolver={server.addr}",
                       "-outResolveWait=20s", workers=1, wait=False)
            try:
                assert wait_until(lambda: "does not resolve yet" in p.output, timeout=10), \
                    p.output
                server.set("late.test", "A", ["127.0.0.2"])
                p.wait_listening()
                assert served_by(p, 3) == {b"late": 3}
            finally:
                p.__exit__(None, None, None)
        finally:
            up.close()


def test_hup_moves_to_a_new_name_and_a_bad_one_keeps_the_old(dns_and_upstreams, tmp_path):
    server, ups = dns_and_upstreams
    port = ups[0].port
    server.set("one.test", "A", ["127.0.0.2"])
    server.set("two.test", "A", ["127.0.0.3", "127.0.0.4"])
    conf = tmp_path / "httptp.conf"

    def write(out):
        conf.write_text(f"outType = http\nout = {out}\nresolver = {server.addr}\n"
                        "outResolveInterval = 1s\n")

    write(f"one.test:{port}")
    with HttpTp(f"-config={conf}", workers=2) as p:
        assert served_by(p, 5) == {b"127.0.0.2": 5}
        write(f"two.test:{port}")
        p.signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded:" in p.output, timeout=20), p.output
        assert wait_until(lambda: set(served_by(p, 10)) == {b"127.0.0.3", b"127.0.0.4"},
                          timeout=10), p.output
        write(f"nowhere.test:{port}")
        p.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed" in p.output, timeout=20), p.output
        assert f"-out: nowhere.test:{port} does not resolve" in p.output
        # the old set stays, and its resolver runs again
        server.set("two.test", "A", ["127.0.0.5"])
        assert wait_until(lambda: set(served_by(p, 5)) == {b"127.0.0.5"}, timeout=10), p.output
        # back to a plain address: no resolver helper any more
        write(f"127.0.0.2:{port}")
        p.signal(signal.SIGHUP)
        assert wait_until(lambda: p.output.count("reloaded:") == 2, timeout=20), p.output
        assert served_by(p, 5) == {b"127.0.0.2": 5}
        helper_lines = [line for line in p.lines if "resolver helper" in line]
        assert helper_lines[-1].endswith("stopping it for the reload"), helper_lines


def test_health_checks_follow_resolved_addresses(dns_and_upstreams):
    """Discovery and -outHealthCheck together: each resolved address is checked
    on its own, the one that fails its checks gets no client request, and the
    status page shows it down under the name it came from."""
    server, ups = dns_and_upstreams
    port = ups[0].port
    ups[1].handler = lambda m, p, h, b: Reply(status=503, body=b"sick")
    server.set("app.test", "A", ["127.0.0.2", "127.0.0.3"])
    with httptp_for(server, f"app.test:{port}", "-outHealthCheck=/health",
                    "-outHealthCheckInterval=1s", "-outHealthCheckFall=1") as p:
        assert wait_until(lambda: "is down" in p.output, timeout=15), p.output
        assert f"upstream 127.0.0.3:{port} (app.test:{port}) is down" in p.output, p.output
        sick_before = ups[1].requests
        res = load(p.host, p.port, threads=4, duration=1.5, max_requests=300)
        assert res.failed == 0, res.errors[:3]
        assert ups[0].requests > 0
        # only the checker's GET /health reached the sick one (about one a second)
        assert ups[1].requests - sick_before <= 3, (sick_before, ups[1].requests)
        doc = json.loads(stats_get(p, "/status.json"))
        states = {u["address"]: (u["origin"], u["state"]) for u in doc["upstreams"]}
        assert states[f"127.0.0.3:{port}"] == (f"app.test:{port}", "down"), states
        assert states[f"127.0.0.2:{port}"][1] == "up", states
