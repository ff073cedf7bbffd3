"""Regenerate docs/status.png: the status page of a teleport link under load.

A (http in, teleport out to B and to a dead address) → B (teleport in) → an
upstream answering OpenRTB-like JSON.  Two minutes of uneven load with a burst
of bad requests, then headless Chromium screenshots A's -expvarAddr page.
Needs Debian's chromium (`make test-deps`).  Run from the repository root:

    .venv/bin/python bench/status_screenshot.py [--seconds 120] [--out docs/status.png]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import HttpTp, Reply, Upstream, dead_address, load, raw_exchange, wait_until  # noqa: E402

BODY = (b'{"id":"%d","seatbid":[{"bid":[{"id":"1","impid":"1","price":0.42,'
        b'"adm":"<div class=\\"ad\\">' + b"creative " * 60 + b'</div>","crid":"c-17"}]}]}')



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--out", default="docs/status.png")
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if not chromium:
        print("chromium is not installed (make test-deps)", file=sys.stderr)
        return 1
    up = Upstream(handler=lambda m, p, h, b: Reply(body=BODY % len(b)))
    try:
        with HttpTp("-inType=teleport", f"-out={up.addr}", "-outType=http", workers=1) as b, \
             HttpTp(f"-out={b.addr},{dead_address()}", "-outType=teleport",
                    "-expvarAddr=127.0.0.1:0", "-outMaxFails=1", "-outFailTimeout=1h",
                    workers=2) as a:
            assert wait_until(lambda: "stats on http://" in a.output)
            port = int(re.search(r"stats on http://127\.0\.0\.1:(\d+)/", a.output).group(1))
            deadline = time.monotonic() + args.seconds
            step = 0
            while time.monotonic() < deadline:
                load(a.host, a.port, threads=1 + step % 4, duration=min(5.0, args.seconds))
                if step % 5 == 2:
                    for _ in range(40):          # a burst of requests httptp refuses itself
                        raw_exchange((a.host, a.port), b"NOT HTTP\r\n\r\n")
                step += 1
            url = f"http://127.0.0.1:{port}/"
            stop = threading.Event()           # traffic goes on while the picture is taken
            busy = threading.Thread(target=load, args=(a.host, a.port),
                                    kwargs={"threads": 2, "duration": 60.0, "stop": stop})
            busy.start()
            time.sleep(2.0)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                "--hide-scrollbars", f"--user-data-dir={profile}",
                                "--window-size=1100,760", "--virtual-time-budget=4000",
                                f"--screenshot={os.path.abspath(args.out)}", url],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)
            stop.set()
            busy.join(70)
    finally:
        up.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
