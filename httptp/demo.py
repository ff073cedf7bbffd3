"""`make run`: a small upstream and httptp in front of it, until Ctrl-C.

The upstream is plain Python on 127.0.0.1:8043 (the original's default -out);
httptp listens on 127.0.0.1:8080 with two workers.  Ports can be moved with
DEMO_IN and DEMO_OUT.  Teleport between two httptp (and the bandwidth it saves)
joins this demo when the teleport link lands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({"path": self.path, "method": self.command, "got_bytes": len(body),
                          "client_ip": self.headers.get("X-Real-IP", ""),
                          "served_by": "demo upstream"}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args):
        pass


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    in_addr = os.environ.get("DEMO_IN", "127.0.0.1:8080")
    out_addr = os.environ.get("DEMO_OUT", "127.0.0.1:8043")
    try:
        upstream = ThreadingHTTPServer(_hostport(out_addr), _Upstream)
    except OSError as e:
        print(f"demo: cannot listen on {out_addr}: {e.strerror}; set DEMO_OUT=host:port", file=sys.stderr)
        return 1
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    exe = shutil.which("httptp") or os.path.join(os.path.dirname(sys.executable), "httptp")
    cmd = [exe, f"-in={in_addr}", f"-out={out_addr}", "-outType=http", "-workers=2",
           "-clientIPHeader=X-Real-IP"]
    print("demo: upstream on http://%s, httptp: %s" % (out_addr, " ".join(cmd[1:])), flush=True)
    proc = subprocess.Popen(cmd)
    print(f"demo: try   curl -i http://{in_addr}/hello   (Ctrl-C stops)", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(40) if proc.poll() is None else proc.returncode
    finally:
        upstream.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
