"""`make run` runs `python -m httptp.demo`: the chain must come up, save bytes, stop on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest


@pytest.mark.timeout(90)
def test_demo_shows_the_bandwidth_saved_and_stops_on_ctrl_c():
    env = dict(os.environ, DEMO_IN="127.0.0.1:0", DEMO_STATS="127.0.0.1:0")
    proc = subprocess.Popen([sys.executable, "-m", "httptp.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("serving; try" in l for l in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        out = "".join(lines)
        assert "2000 answered, 0 failed" in out, out
        ratio = float(re.search(r"\(([\d.]+)x smaller\)", out).group(1))
        assert ratio > 3, out
        os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C reaches the whole group
        assert proc.wait(45) == 0, "".join(lines)
        assert "Traceback" not in "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
