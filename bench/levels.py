"""Offline: what each codec and level costs and saves on OpenRTB-like requests.

Frames as a teleport client writes them (request id + POST of a seeded
OpenRTB-like body, bench/rtb.py) go through our own compressors, one stream
per run, a flush per batch of 1 and of 8 messages.  Printed as a Markdown
table: the ratio (frame bytes over compressed bytes) and the compressor's
CPU µs per message (process time, so other load on the machine inflates it
less than wall time would).  No sockets, one process, a few seconds per
codec:  ``python bench/levels.py [--messages N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rtb  # noqa: E402

from httptp.teleport import codecs  # noqa: E402
from httptp.teleport.framing import encode_request  # noqa: E402

CONFIGS = [("snappy", None), ("flate", 1), ("flate", 6), ("flate", 9), ("zstd", 1), ("zstd", 3),
           ("zstd", 6), ("zstd", 9), ("zstd", 12), ("zstd", 19), ("brotli", 5), ("brotli", 9),
           ("brotli", 11)]


def frames(n: int) -> list[bytes]:
    traffic = rtb.Traffic(11)
    headers = [(b"Host", b"bidder.example"), *((k.encode(), v.encode())
                                               for k, v in rtb.HEADERS.items())]
    return [encode_request(i + 1, b"POST", b"/openrtb2/auction", headers, traffic.request())
            for i in range(n)]


def measure(name: str, level: int | None, msgs: list[bytes], batch: int) -> tuple[float, float]:
    c = codecs.compressor(codecs.BY_NAME[name], level)
    out = 0
    t0 = time.process_time()
    for i in range(0, len(msgs), batch):
        for m in msgs[i:i + batch]:
            out += len(c.compress(m))
        out += len(c.flush())
    spent = time.process_time() - t0
    return sum(map(len, msgs)) / out, spent / len(msgs) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000)
    args = ap.parse_args(argv)
    msgs = frames(args.messages)
    print(f"{len(msgs)} frames, mean {sum(map(len, msgs)) / len(msgs):,.0f} bytes\n")
    print("| codec-level | ratio, batch 1 | µs/msg | ratio, batch 8 | µs/msg |")
    print("|---|--:|--:|--:|--:|")
    for name, level in CONFIGS:
        r1, u1 = measure(name, level, msgs, 1)
        r8, u8 = measure(name, level, msgs, 8)
        label = name if level is None else f"{name}-{level}"
        print(f"| {label} | ×{r1:.2f} | {u1:.0f} | ×{r8:.2f} | {u8:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
