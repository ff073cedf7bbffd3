"""Log lines: the error log (stderr) and the access log (-accessLog).

Formats (-logFormat):

* ``text`` (default). Error log: ``httptp: <who>: <message>`` (no level: the
  line stays what it was).  Access log, nginx's "combined" first, then our
  fields as ``key=value``:
  ``client - - [29/Nov/2026:10:40:00 +0000] "GET /p HTTP/1.1" 200 1234 "referer"
  "user agent" upstream=10.0.0.1:80 upstream_time=0.003 request_time=0.004
  upstream_status=200 tries=1 bytes_received=0 host="example.com" tls=TLSv1.3
  sni=example.com request_id=5f0c2a9e41d3-1a``
* ``json``: one JSON object a line. Error log:
  ``{"time": "...", "level": "info", "who": "worker 0", "msg": "..."}``
  (``who`` is ``master`` for the master; ``level`` is info, warning or
  error).  Access log: ``{"time", "client", "method", "target", "protocol",
  "status", "bytes", "referer", "user_agent", "upstream", "upstream_time",
  "request_time", "duration", "upstream_status", "tries", "bytes_received",
  "host", "tls_version", "sni", "request_id"}`` (docs/operations.md says
  what each one means).

The access log is written with one ``write()`` per line on an ``O_APPEND``
descriptor, so the lines of all workers interleave whole. USR1 reopens it
(logrotate: rename, then ``kill -USR1 <master>``). ``-`` means stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

FORMATS = ("text", "json")
INFO, WARNING, ERROR = "info", "warning", "error"      # the JSON error log's "level"


def _iso(now: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-29T10:40:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % int(now % 1 * 1000)


def error_logger(who: str, fmt: str = "text", level: str = INFO):
    """A ``log(message, level=<level>)`` for stderr, in the chosen format;
    ``level`` (info, warning, error) shows in JSON only."""
    if fmt == "json":
        def line(message: str, level: str) -> str:
            return json.dumps({"time": _iso(time.time()), "level": level, "who": who,
                               "msg": message}) + "\n"
    else:
        prefix = f"httptp: {who}: " if who else "httptp: "

        def line(message: str, level: str) -> str:
            return prefix + message + "\n"

    def log(message: str, level: str = level) -> None:
        try:
            sys.stderr.write(line(message, level))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass    # stderr gone (a closed pipe): logging must never take the caller down
    log.levels = True
    return log


def say(log, message: str, level: str) -> None:
    """``log(message, level)`` for a logger of ``error_logger``; any other
    callable (a test's ``list.append``) gets the message alone."""
    if getattr(log, "levels", False):
        log(message, level)
    else:
        log(message)


def _header(headers: list, name: bytes) -> str:
    for n, v in headers:
        if len(n) == len(name) and n.lower() == name:
            return v.decode("latin-1")
    return ""


class AccessLog:
    """One line per answered request; ``path`` "-" is stderr."""

    def __init__(self, path: str, fmt: str = "text"):
        self.path = path
        self.fmt = fmt
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        """Open the path again (USR1, after logrotate renamed the file)."""
        if self.path == "-":
            self.fd = 2
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        old, self.fd = self.fd, fd
        if old > 2:
            os.close(old)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1

    def log(self, client: bytes | None, head, status: int, size: int, upstream: str,
            upstream_time: float, *, request_time: float = 0.0, received: int = 0,
            upstream_status: int = 0, tries: int = 0, tls: tuple | None = None,
            request_id: str = "") -> None:
        """One line.  ``request_time``: seconds from the request head to the
        end of the answer; ``received``: request body bytes; ``upstream_status``
        0 when no upstream answered; ``tls``: (version, SNI name or "") on a
        TLS listener, else None."""
        now = time.time()
        client_s = client.decode("ascii") if client else "-"
        if head is None:
            method = target = protocol = ""
            referer = agent = host = ""
        else:
            method, target = head.method.decode("latin-1"), head.target.decode("latin-1")
            protocol = "HTTP/" + head.version.decode("ascii")
            referer = _header(head.headers, b"referer")
            agent = _header(head.headers, b"user-agent")
            host = _header(head.headers, b"host")
        version, sni = tls if tls is not None else ("", "")
        if self.fmt == "json":
            request_time = round(request_time, 3)
            line = json.dumps({"time": _iso(now), "client": client_s, "method": method,
                               "target": target, "protocol": protocol, "status": status,
                               "bytes": size, "referer": referer, "user_agent": agent,
                               "upstream": upstream or None,
                               "upstream_time": round(upstream_time, 6),
                               "request_time": request_time, "duration": request_time,
                               "upstream_status": upstream_status or None, "tries": tries,
                               "bytes_received": received, "host": host or None,
                               "tls_version": version or None, "sni": sni or None,
                               "request_id": request_id or None}) + "\n"
        else:
            request = f"{method} {target} {protocol}" if method else "-"
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
            line = (f'{client_s} - - [{stamp}] "{_quote(request)}" {status} {size} '
                    f'"{_quote(referer) or "-"}" "{_quote(agent) or "-"}" '
                    f"upstream={upstream or '-'} upstream_time={upstream_time:.3f} "
                    f"request_time={request_time:.3f} upstream_status={upstream_status or '-'} "
                    f"tries={tries} bytes_received={received} "
                    f'host="{_quote(host) or "-"}" tls={version or "-"} '
                    f"sni={_token(sni)} request_id={_token(request_id)}\n")
        try:
            os.write(self.fd, line.encode("utf-8", "replace"))
        except OSError:
            pass     # a full disk must not take the proxy down


def _token(text: str) -> str:
    """A value written bare (no quotes): "-" when empty, escaped so that it
    cannot split the line's fields."""
    if not text:
        return "-"
    text = _quote(text)
    return text.replace(" ", "\\x20") if " " in text else text


def _quote(text: str) -> str:
    """Escape what would break the line's fields, as nginx does (\\xHH)."""
    if '"' not in text and "\\" not in text and text.isprintable():
        return text
    return "".join(c if c.isprintable() and c not in '"\\' else "\\x%02X" % (ord(c) & 0xFF)
                   for c in text)


class RateLimitedLog:
    """Say the first occurrence of a thing at once, then a count per period.

    For refusals an operator must see (a misconfigured partner, a peer over a
    limit) that can also come thousands of times a second.  ``say(key,
    message)`` logs ``message`` at once when ``key`` has been quiet; further
    calls with the same key within ``period`` are only counted.  The first
    call after the period logs again, with ``"(N more in the last 60 s)"``
    when some were counted.  ``flush()``, called every second or so (a
    worker's heartbeat), logs that count as soon as a period ends, without
    waiting for another call, and forgets keys that stayed quiet a whole
    period.  At most ``max_keys`` keys are tracked; beyond that, new keys are
    counted under one ``"other"`` line, so a scan from many addresses cannot
    grow this table.  No clock of its own beyond ``clock``; no I/O but ``log``
    (its lines at ``level``, warning: a refusal, a thing to look at).
    """

    def __init__(self, log, period: float = 60.0, *, max_keys: int = 1024,
                 clock=time.monotonic, level: str = WARNING):
        self._log = (lambda message: log(message, level)) if getattr(log, "levels", False) \
            else log
        self.period = period
        self.max_keys = max_keys
        self._clock = clock
        self._keys: dict = {}        # key -> [period end, count since, last message]

    def say(self, key, message: str) -> None:
        entry = self._keys.get(key)
        if entry is None:
            if len(self._keys) >= self.max_keys:
                key, message = _OTHER, "more refusals of other kinds or peers"
                entry = self._keys.get(key)
            if entry is None:
                self._keys[key] = [self._clock() + self.period, 0, message]
                self._log(message)
                return
        now = self._clock()
        if now >= entry[0]:
            counted = entry[1]
            entry[0], entry[1], entry[2] = now + self.period, 0, message
            self._log(f"{message} ({counted} more in the last {self.period:g} s)" if counted
                      else message)
            return
        entry[1] += 1
        entry[2] = message

    def flush(self) -> None:
        now = self._clock()
        for key, entry in list(self._keys.items()):
            if now < entry[0]:
                continue
            if entry[1]:
                self._log(f"{entry[2]} ({entry[1]} more in the last "
                          f"{self.period:g} s)")
                entry[0], entry[1] = now + self.period, 0
            else:
                del self._keys[key]


_OTHER = object()
