"""-inCompressLevel/-outCompressLevel through the real `httptp` command: a
chain with fixed and auto levels carries RTB-like bodies byte-exact and shows
its levels on /expvar and /prometheus; a level the codec does not take is
one clear line and exit code 2, no traceback."""

from __future__ import annotations

import http.client
import json
import random
import re
import subprocess
import urllib.request

import pytest

from tests.helpers import HTTPTP, HttpTp, Reply, Upstream, get
from tests.unit.test_teleport_levels import rtb

pytestmark = pytest.mark.timeout(120)


def _echo_all(method, path, headers, body):
    return Reply(body=b"%d:" % len(body) + body)


def _stats(proc: HttpTp, path: str) -> bytes:
    port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", proc.output).group(1))
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()


@pytest.mark.parametrize("out_codec, out_level, in_codec, in_level", [
    ("zstd", "auto", "flate", "9"),
    ("flate", "1", "zstd", "auto"),
    ("brotli", "11", "brotli", "0"),
])
def test_a_chain_with_levels_is_byte_exact_and_shows_them(out_codec, out_level, in_codec,
                                                          in_level):
    up = Upstream(handler=_echo_all)
    b = HttpTp("-inType=teleport", "-outType=http", f"-out={up.addr}", f"-inCompress={in_codec}",
               f"-inCompressLevel={in_level}", "-expvarAddr=127.0.0.1:0", workers=1)
    a = HttpTp("-outType=teleport", f"-out={b.addr}", f"-outCompress={out_codec}",
               f"-outCompressLevel={out_level}", "-expvarAddr=127.0.0.1:0", workers=1)
    try:
        c = http.client.HTTPConnection(a.host, a.port, timeout=10)
        rng = random.Random(5)
        for i in range(120):
            body = rtb(i, rng) * (1 + i % 3)
            status, _, got = get(c, f"/bid/{i}", method="POST", body=body)
            assert (status, got) == (200, b"%d:" % len(body) + body)
        a_vars = json.loads(_stats(a, "/expvar"))
        b_vars = json.loads(_stats(b, "/expvar"))
        text = _stats(a, "/prometheus").decode()
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        up.close()
    for level, seen in ((out_level, a_vars["teleportCompressLevelOut"]),
                        (in_level, b_vars["teleportCompressLevelIn"])):
        if level == "auto":
            assert 1 <= seen <= 12
        else:
            assert seen == int(level)
    assert re.search(r'^httptp_teleport_compress_level\{side="out"\} \d', text, re.M)


@pytest.mark.parametrize("args, message", [
    (["-outCompress=snappy", "-outCompressLevel=3"],
     "httptp: -outCompressLevel: snappy has no compression levels"),
    (["-outCompress=zstd", "-outCompressLevel=20"],
     "httptp: -outCompressLevel: zstd levels are 1 to 19, not 20"),
    (["-inCompress=auto", "-inCompressLevel=4"],
     "httptp: -inCompressLevel: a number needs a fixed -inCompress"),
])
def test_a_level_the_codec_does_not_take_is_one_clear_line(args, message):
    r = subprocess.run([HTTPTP, "-outType=teleport", *args, "-checkConfig"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
