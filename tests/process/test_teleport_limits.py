"""Size limits on teleport and on responses, through the real `httptp` command.

Issue 10: a decompression bomb on a teleport listener, requests and responses
one byte under and one byte over each limit, and the worker serving other
connections throughout.  Peers are raw sockets speaking our own codecs and
frames; upstreams are real threaded servers on loopback.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.request

import pytest

from tests.helpers import HttpTp, Peer, Reply, Upstream, get, wait_until

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20


def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_idle(pid: int, timeout: float = 60.0) -> None:
    """Until the process has used no CPU for half a second (bounded)."""
    last, still = -1, 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and still < 5:
        now = cpu_ticks(pid)
        still = still + 1 if now == last else 0
        last = now
        time.sleep(0.1)


def expvar(p: HttpTp) -> dict:
    url = wait_until(lambda: (m := re.search(r"stats on (http://\S+/expvar)", p.output))
                     and m.group(1))
    assert url, p.output
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def sized(method, path, headers, body):
    """``/N`` answers N bytes; ``/chunked/N`` the same, chunked; ``/head/N``
    a header block of about N bytes."""
    parts = path.split(b"?")[0].strip(b"/").split(b"/")
    if parts[0] == b"chunked":
        return Reply(body=b"c" * int(parts[1]), chunked=True)
    if parts[0] == b"head":
        return Reply(body=b"ok", headers=[(b"X-Pad", b"p" * int(parts[1]))])
    return Reply(body=b"b" * int(parts[0] or b"2"))


# --- the bomb ----------------------------------------------------------------

@pytest.mark.parametrize("codec", ["flate", "zstd", "brotli", "snappy"])
def test_a_decompression_bomb_is_refused_with_bounded_memory(codec, tmp_path):
    """A peer announces a 2 GB body and sends 256 MiB of zeros (a few MB or
    less on the wire): it gets 413 at once, the body is skipped as it is
    decompressed, the worker's peak RSS grows by less than 64 MiB (before
    the fix: by the whole body), and it keeps serving another connection."""
    plain = 256 * MiB
    up = Upstream()
    log = tmp_path / "access.log"
    with HttpTp("-inType=teleport", "-inCompress=auto", "-outType=http", f"-out={up.addr}",
                f"-accessLog={log}", workers=1) as p:
        [pid] = p.worker_pids()
        rss0 = status(pid, "VmRSS")

        probe_ok, probe_failed, stop = [0], [], threading.Event()

        def probe():
            peer = Peer(p.host, p.port, "none", timeout=20)
            try:
                rid = 0
                while not stop.is_set():
                    rid += 1
                    peer.request(rid, target=b"/probe")
                    answer = peer.answer(rid)
                    if answer is None or answer[0].status != 200:
                        probe_failed.append(answer)
                        return
                    probe_ok[0] += 1
            except OSError as e:
                probe_failed.append(e)
            finally:
                peer.close()

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        assert wait_until(lambda: probe_ok[0] > 0)

        bomb = Peer(p.host, p.port, codec)
        bomb.send((1).to_bytes(4, "little") +
                  b"POST /bomb HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000000\r\n\r\n")
        zeros = bytes(MiB)
        wire = 0
        for _ in range(plain // MiB):
            wire += bomb.send(zeros)
        head, body = bomb.answer(1)
        assert head.status == 413 and body == b"request body too large\n"
        stop.set()                  # the probe served alongside; now let the worker settle
        prober.join(30)
        wait_idle(pid)              # the last wire bytes are decompressed and skipped
        after = Peer(p.host, p.port, "none")
        after.request(1, target=b"/after")
        assert after.answer(1)[0].status == 200
        after.close()

        growth = status(pid, "VmHWM") - rss0
        print(f"{codec}: {plain // MiB} MiB plain as {wire / MiB:.2f} MiB on the wire; "
              f"peak RSS growth {growth / MiB:.1f} MiB")
        assert growth < 64 * MiB
        assert p.worker_pids() == [pid]
        assert not probe_failed and probe_ok[0] > 1
        assert not any(b"/bomb" in r for r in up.received)      # never reached the upstream
        bomb.close()
        refusals = [line for line in p.lines if "over the limit" in line]
        assert len(refusals) == 1 and "127.0.0.1" in refusals[0] and "-inMaxBodySize" in refusals[0]
        assert wait_until(lambda: '"POST /bomb HTTP/1.1" 413' in log.read_text())
    up.close()


# --- one byte under and over, teleport in --------------------------------------

def test_teleport_listener_limits_one_byte_under_and_over(tmp_path):
    up = Upstream(handler=lambda m, path, h, body: Reply(body=b"got %d" % len(body)))
    with HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}",
                "-inMaxBodySize=1000", "-inMaxHeaderSize=200", "-expvarAddr=127.0.0.1:0",
                workers=1) as p:
        [pid] = p.worker_pids()
        peer = Peer(p.host, p.port, "flate")
        peer.request(1, b"POST", b"/under", b"u" * 1000)
        assert peer.answer(1)[1] == b"got 1000"
        peer.request(2, b"POST", b"/over", b"o" * 1001)
        peer.request(3, b"POST", b"/next", b"n" * 5)           # same connection: still in sync
        head, body = peer.answer(2)
        assert head.status == 413 and body == b"request body too large\n"
        assert peer.answer(3)[1] == b"got 5"
        assert not any(b"/over" in r for r in up.received)

        # a chunked body over the limit cannot be skipped: the connection closes
        peer.send((4).to_bytes(4, "little") + b"POST /chunked HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"c" * 1001 + b"\r\n0\r\n\r\n")
        assert peer.closed_by_server()
        peer.close()

        # a header block of exactly the limit, then one byte more
        def head_of(size: int, req_id: int) -> bytes:
            start = b"GET /h HTTP/1.1\r\nHost: x\r\nX-Pad: "
            return (req_id.to_bytes(4, "little") + start + b"p" * (size - len(start) - 4)
                    + b"\r\n\r\n")
        peer = Peer(p.host, p.port, "none")
        peer.send(head_of(200, 5))
        assert peer.answer(5)[0].status == 200
        peer.send(head_of(201, 6))
        assert peer.closed_by_server()
        peer.close()

        stats = expvar(p)
        assert stats["inRequestTooLarge"] == 3, stats
        assert p.worker_pids() == [pid]
        lines = [line for line in p.lines if "over the limit" in line]
        assert len(lines) == 1     # one per peer a minute: the first only
        assert "-inMaxBodySize" in lines[0] and "127.0.0.1" in lines[0]
    up.close()


# --- responses over -outMaxBodySize / -outMaxHeaderSize ---------------------

def test_teleport_out_response_limits():
    """A (http in, teleport out, -outMaxBodySize=1000) → B (teleport in) →
    upstream: a response one byte over is a 502, the link is redialled, the
    next request is served."""
    up = Upstream(handler=sized)
    with HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}", workers=1) as b, \
            HttpTp("-outType=teleport", f"-out={b.addr}", "-outMaxBodySize=1000",
                   "-outMaxHeaderSize=600", "-expvarAddr=127.0.0.1:0", workers=1) as a:
        c = http.client.HTTPConnection(a.host, a.port, timeout=10)
        assert get(c, "/1000")[0] == 200
        assert get(c, "/1001")[0] == 502
        status, _, body = get(c, "/5")                # a new link to B
        assert status == 200 and body == b"b" * 5
        assert get(c, "/chunked/1001")[0] == 502
        assert get(c, "/head/300")[0] == 200
        assert get(c, "/head/700")[0] == 502          # over A's -outMaxHeaderSize
        assert get(c, "/7")[2] == b"b" * 7
        stats = expvar(a)
        assert stats["outResponseTooLarge"] == 3, stats
        lines = [line for line in a.lines if "over the limit" in line]
        assert len(lines) == 1 and "-outMaxBodySize" in lines[0] and b.addr in lines[0]
    up.close()


def test_http_out_response_limits():
    up = Upstream(handler=sized)
    with HttpTp("-outType=http", f"-out={up.addr}", "-outMaxBodySize=1000",
                "-expvarAddr=127.0.0.1:0", workers=1) as p:
        c = http.client.HTTPConnection(p.host, p.port, timeout=10)
        status, _, body = get(c, "/1000")
        assert status == 200 and body == b"b" * 1000
        assert get(c, "/1001")[0] == 502                 # announced by Content-Length
        assert get(c, "/chunked/1001")[0] == 502         # found out as it came
        assert get(c, "/chunked/1000")[2] == b"c" * 1000
        assert get(c, "/1001", method="HEAD")[0] == 200   # no body: nothing to hold
        assert get(c, "/3")[2] == b"bbb"
        assert expvar(p)["outResponseTooLarge"] == 2
        lines = [line for line in p.lines if "over the limit" in line]
        assert len(lines) == 1 and up.addr in lines[0] and "answered 502" in lines[0]
    up.close()
