"""Coverage-guided fuzzing of the sans-IO parsers, bounded in time (``make fuzz``).

    python -m tests.fuzz.fuzz_main --seconds 240            # every target, 240 s in all
    python -m tests.fuzz.fuzz_main --list
    python -m tests.fuzz.fuzz_main --run TARGET [--seconds S] [libFuzzer args / crash file]

Targets are of two kinds:

- every property test of tests/fuzz (``http:test_...``, ``teleport:test_...``):
  atheris mutates the byte stream Hypothesis draws its choices from
  (``test.hypothesis.fuzz_one_input``), so the fuzzer keeps the strategies'
  structure and adds coverage guidance.  A failing input is also saved in
  ``.hypothesis/examples`` (the ``fuzz`` profile): ``HYPOTHESIS_PROFILE=fuzz
  pytest tests/fuzz -k NAME`` replays and shrinks it;
- ``raw:...``: wire bytes straight into one parser (HTTP requests and
  responses, frames of both kinds, each decompressor), starting from a small
  seed corpus, with the same properties as the tests (only the layer's own
  error, split feeds agree with byte-by-byte ones, bounded memory).

Each target runs in its own process for its share of the time, under
atheris when it is installed (the ``fuzz`` extra), else on random inputs.
Corpora go to ``fuzz-corpus/TARGET/``, failing inputs to
``fuzz-artifacts/`` (``crash-<sha1>``); ``--run TARGET fuzz-artifacts/crash-...``
runs one again.  The exit status is non-zero when any target failed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz-corpus")
ARTIFACTS = os.path.join(ROOT, "fuzz-artifacts")
CODECS = ("none", "flate", "snappy", "zstd", "brotli")
RAW = ["raw:http-request", "raw:http-response", "raw:frames-request", "raw:frames-response",
       *(f"raw:codec-{c}" for c in CODECS)]
# The property tests that only check a fixed table or a trivial round trip.
_SKIP = {"test_handshake_round_trip", "test_writer_error_responses_read_back",
         "test_strategies_cover_both_head_paths"}


def _property_tests() -> dict:
    from tests.fuzz import test_fuzz_http, test_fuzz_teleport
    tests = {}
    for prefix, mod in (("http", test_fuzz_http), ("teleport", test_fuzz_teleport)):
        for name, fn in vars(mod).items():
            if (name.startswith("test_") and hasattr(fn, "hypothesis")
                    and "finding" not in name and name not in _SKIP):
                tests[f"{prefix}:{name}"] = fn
    return tests


def list_targets() -> list:
    return sorted(_property_tests()) + RAW


# -- raw targets ------------------------------------------------------------------

def _split(data: bytes, rnd: int) -> list:
    """``data`` cut at up to three places chosen by ``rnd``."""
    if len(data) < 2:
        return [data]
    r = random.Random(rnd)
    points = sorted({r.randrange(1, len(data)) for _ in range(rnd % 4)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def _raw_http(kind: str):
    from tests.fuzz.support import BACKENDS, bytewise, run_parser, same_outcome

    def one(data: bytes):
        if not data:
            return
        control, data = data[0], data[1:]
        max_head = (16, 64, 4096)[control % 3]
        method = (b"GET", b"HEAD", b"POST")[control // 3 % 3]
        pieces = _split(data, control)
        for be in BACKENDS.values():
            def run(feeds, bound=None):
                if kind == "request":
                    return run_parser(be.RequestParser(1 << 16, 1 << 20), feeds, bound=bound)
                return run_parser(be.ResponseParser(1 << 16), feeds, start=method, bound=bound)
            reference = run(bytewise(data))
            same_outcome(reference, run([data]))
            same_outcome(reference, run(pieces))
            if kind == "request":
                run_parser(be.RequestParser(max_head, 64), pieces, bound=max_head)
            else:
                run_parser(be.ResponseParser(max_head), pieces, start=method, bound=max_head)
    return one


def _raw_frames(kind: str):
    from tests.fuzz.support import bytewise
    from tests.fuzz.test_fuzz_teleport import read_frames, same_frames

    def one(data: bytes):
        if not data:
            return
        control, data = data[0], data[1:]
        is_head = (lambda req_id: req_id % 3 == 0) if kind == "response" else None
        reference = read_frames(kind, bytewise(data), is_head=is_head)
        same_frames(reference, read_frames(kind, [data], is_head=is_head))
        same_frames(reference, read_frames(kind, _split(data, control), is_head=is_head))
        read_frames(kind, _split(data, control), 8 + control, control % 64)
    return one


def _raw_codec(name: str):
    from httptp.teleport import CodecError
    from httptp.teleport.codecs import decompressor
    from httptp.teleport.handshake import BY_NAME
    from tests.fuzz.test_fuzz_teleport import drain
    codec = BY_NAME[name]

    def one(data: bytes):
        if not data:
            return
        control, data = data[0], data[1:]
        dec = decompressor(codec)
        try:
            for piece in _split(data, control):
                drain(codec, dec, piece)
        except CodecError:
            pass
    return one


def _seeds(target: str) -> list:
    """A few valid inputs to start a raw target's corpus from."""
    from httptp.teleport.codecs import compressor
    from httptp.teleport.framing import encode_request, encode_response
    from httptp.teleport.handshake import BY_NAME
    if target == "raw:http-request":
        return [b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                b"\x01POST /p?q HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                b"\x05PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n"]
    if target == "raw:http-response":
        return [b"\x00HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                b"\x04HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                b"\x03HTTP/1.0 200 OK\r\nServer: x\r\n\r\nuntil close"]
    if target == "raw:frames-request":
        return [b"\x10" + encode_request(1, b"GET", b"/", [(b"Host", b"h")], b"")
                + encode_request(2, b"POST", b"/p", [(b"Host", b"h"), (b"X", b"y")], b"body"),
                b"\x20\x03\x00\x00\x00PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n2\r\nhi\r\n0\r\n\r\n"]
    if target == "raw:frames-response":
        return [b"\x10" + encode_response(1, 200, b"OK", [(b"Server", b"s")], b"hello")
                + encode_response(3, 204, b"", [], b"")]
    codec = BY_NAME[target.split("-", 1)[1]]
    comp = compressor(codec)
    plain = b"\x01\x00\x00\x00POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello" * 3
    stream = comp.compress(plain) + comp.flush() + comp.compress(plain[:40]) + comp.flush()
    return [b"\x00" + stream, b"\x03" + stream]


def target_function(target: str):
    if target.startswith("raw:"):
        what = target[4:]
        if what.startswith("http-"):
            return _raw_http(what[5:])
        if what.startswith("frames-"):
            return _raw_frames(what[7:])
        return _raw_codec(what[6:])
    return _property_tests()[target].hypothesis.fuzz_one_input


# -- one target in this process ---------------------------------------------------

def run_one(target: str, seconds: float, extra: list) -> int:
    os.environ.setdefault("HYPOTHESIS_PROFILE", "fuzz")
    os.chdir(ROOT)
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is not None:
        # instrument our parsers and the pure-Python libraries under them
        with atheris.instrument_imports(include=["httptp", "h11"]):
            import h11  # noqa: F401
            import httptp.http.h11_backend  # noqa: F401
            import httptp.http.httptools_backend  # noqa: F401
            import httptp.http.parser  # noqa: F401
            import httptp.http.writer  # noqa: F401
            import httptp.teleport.codecs  # noqa: F401
            import httptp.teleport.framing  # noqa: F401
            import httptp.teleport.handshake  # noqa: F401
    import tests.conftest  # noqa: F401  (the hypothesis profiles)
    fn = target_function(target)
    replay = [a for a in extra if not a.startswith("-")]
    if atheris is None:
        for path in replay:         # without atheris, run saved inputs once each
            with open(path, "rb") as f:
                fn(f.read())
        return 0 if replay else _random_loop(target, fn, seconds)
    corpus = os.path.join(CORPUS, target.replace(":", "_"))
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(ARTIFACTS, exist_ok=True)
    if target.startswith("raw:") and not os.listdir(corpus):
        for i, seed in enumerate(_seeds(target)):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
    args = [sys.argv[0], *extra]
    if not replay:
        args += [corpus, f"-max_total_time={max(1, int(seconds))}",
                 f"-artifact_prefix={ARTIFACTS}/", "-timeout=60", "-rss_limit_mb=4096",
                 "-print_final_stats=1", "-max_len=4096"]
    atheris.Setup(args, fn)
    atheris.Fuzz()
    return 0


def _random_loop(target: str, fn, seconds: float) -> int:
    """Without atheris: random inputs until the time is up."""
    rnd = random.Random()
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        data = rnd.randbytes(rnd.randrange(1, 2048))
        try:
            fn(data)
        except Exception:
            os.makedirs(ARTIFACTS, exist_ok=True)
            path = os.path.join(ARTIFACTS, f"crash-{target.replace(':', '_')}-{runs}")
            with open(path, "wb") as f:
                f.write(data)
            print(f"{target}: failure after {runs} runs; input saved to {path}", flush=True)
            raise
        runs += 1
    print(f"Done {runs} runs in {int(seconds)} second(s)", flush=True)
    return 0


# -- all targets --------------------------------------------------------------------

def run_all(seconds: float, only: str | None) -> int:
    targets = [t for t in list_targets() if not only or re.search(only, t)]
    failed, total_runs = [], 0
    started = time.monotonic()
    deadline = started + seconds
    overhead = 1.5          # starting a target (imports, instrumentation), measured as we go
    for i, target in enumerate(targets):
        share = max(1.0, (deadline - time.monotonic()) / (len(targets) - i) - overhead)
        cmd = [sys.executable, "-m", "tests.fuzz.fuzz_main", "--run", target,
               "--seconds", str(share)]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=share + 120)
        overhead = (overhead * i + max(0.0, time.monotonic() - t0 - share)) / (i + 1)
        out = proc.stdout + proc.stderr
        m = re.findall(r"Done (\d+) runs in|number_of_executed_units: (\d+)", out)
        m = [x or y for x, y in m]
        runs = int(m[-1]) if m else 0
        total_runs += runs
        crash = re.findall(r"Test unit written to (\S+)|input saved to (\S+)", out)
        status = "ok" if proc.returncode == 0 else "FAILED"
        print(f"{status:6} {target:70} {runs:8} runs", flush=True)
        if proc.returncode != 0:
            failed.append(target)
            lines = out.strip().splitlines()
            start = next((i for i, line in enumerate(lines) if "Uncaught Python exception" in line
                          or line.startswith("Traceback")), max(0, len(lines) - 40))
            print("\n".join(line for line in lines[start:] if not line.startswith("0x")),
                  flush=True)
            for path in (p for pair in crash for p in pair if p):
                print(f"       reproduce: python -m tests.fuzz.fuzz_main --run {target} {path}")
    print(f"{len(targets)} targets, {total_runs} runs in {time.monotonic() - started:.0f} s; "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=240.0,
                    help="time for all targets (--run: for this one)")
    ap.add_argument("--run", metavar="TARGET", help="fuzz one target in this process")
    ap.add_argument("--only", metavar="REGEX", help="only the targets matching REGEX")
    ap.add_argument("--list", action="store_true", help="list the targets")
    args, extra = ap.parse_known_args(argv)
    sys.path.insert(0, ROOT)
    if args.list:
        print("\n".join(list_targets()))
        return 0
    if args.run:
        return run_one(args.run, args.seconds, extra)
    return run_all(args.seconds, args.only)


if __name__ == "__main__":
    sys.exit(main())
