"""What the teleport library's users hold: requests, responses, headers.

Shared by the gevent library (``httptp.io.teleport_api``: ``Client``,
``Server``) and the asyncio one (``httptp.io.teleport_aio``: ``AsyncClient``,
``AsyncServer``, ``serve_asgi``), so this module imports neither gevent nor
asyncio.  The names follow httpx where a user would look for them
(``status_code``, ``content``, ``text``, ``json()``, ``raise_for_status()``,
``request(method, url, params=, headers=, json=, content=, timeout=)``) and
keep the library's older ones (``status``, ``body``, ``header(name)``).
"""

from __future__ import annotations

import json as _json
from http import HTTPStatus
from urllib.parse import urlencode, urlsplit

from httptp.netaddr import Address, parse_address
from httptp.teleport.handshake import BY_NAME, Compress

__all__ = ["Headers", "Request", "Response", "HTTPStatusError", "CODECS"]

#: Codec names accepted by ``compress=``; flate, none and snappy are the Go
#: original's, zstd and brotli only work between httptp peers.
CODECS = tuple(BY_NAME)

# Framing is the library's job: these headers from a caller or handler are dropped.
DROP = frozenset((b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                  b"te", b"trailer", b"upgrade", b"proxy-connection"))


class Headers(list):
    """Header fields as a list of ``(name, value)`` str pairs in wire order
    (iterating gives the pairs, as the library always did), that can also be
    looked up by name in any case, as httpx's ``Headers``:
    ``h["content-type"]``, ``h.get(name, default)``, ``name in h``,
    ``h.get_list(name)``; a repeated field reads as its values joined by
    ``", "``."""

    __slots__ = ()

    def get_list(self, name: str) -> list[str]:
        """Every value of the field ``name`` (any case), in order."""
        name = name.lower()
        return [v for k, v in list.__iter__(self) if k.lower() == name]

    def get(self, name: str, default=None):
        values = self.get_list(name)
        return ", ".join(values) if values else default

    def __getitem__(self, key):
        if isinstance(key, str):
            values = self.get_list(key)
            if not values:
                raise KeyError(key)
            return ", ".join(values)
        return list.__getitem__(self, key)

    def __contains__(self, item) -> bool:
        if isinstance(item, str):
            return bool(self.get_list(item))
        return list.__contains__(self, item)

    def keys(self) -> list[str]:
        """Field names, lower case, each once, in wire order."""
        return list(dict.fromkeys(k.lower() for k, _ in list.__iter__(self)))

    def items(self) -> list[tuple[str, str]]:
        return list(list.__iter__(self))


class HTTPStatusError(Exception):
    """``raise_for_status()`` on a 4xx or 5xx answer; ``response`` is it."""

    def __init__(self, message: str, response: "Response"):
        super().__init__(message)
        self.response = response


class Response:
    """An HTTP response.  httpx's names: ``status_code``, ``reason_phrase``,
    ``headers`` (`Headers`), ``content`` (bytes), ``text``, ``json()``,
    ``is_success``, ``raise_for_status()``; and the library's first ones:
    ``status``, ``reason``, ``body``, ``header(name)``."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str = "", headers=None, body: bytes = b""):
        self.status = status
        self.reason = reason
        self.headers = headers if isinstance(headers, Headers) else Headers(headers or ())
        self.body = body

    @classmethod
    def _from_wire(cls, head, body: bytes) -> "Response":
        return cls(head.status, head.reason.decode("latin-1"),
                   Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers),
                   body)

    status_code = property(lambda self: self.status, doc="The status, an int (httpx's name).")
    reason_phrase = property(lambda self: self.reason, doc="The reason phrase (httpx's name).")
    content = property(lambda self: self.body, doc="The body, bytes (httpx's name).")

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def encoding(self) -> str:
        """The charset of Content-Type, else utf-8."""
        ctype = self.headers.get("content-type") or ""
        for part in ctype.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                return value.strip('"')
        return "utf-8"

    @property
    def text(self) -> str:
        """The body decoded (``encoding``; undecodable bytes replaced)."""
        try:
            return self.body.decode(self.encoding, "replace")
        except LookupError:
            return self.body.decode("utf-8", "replace")

    def json(self, **kw):
        """The body parsed as JSON (``json.loads``; ValueError when it is not)."""
        return _json.loads(self.body, **kw)

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), or None."""
        values = self.headers.get_list(name)
        return values[0] if values else None

    def raise_for_status(self) -> "Response":
        """Raise `HTTPStatusError` for a 4xx or 5xx status; else return self."""
        if self.status >= 400:
            kind = "Client error" if self.status < 500 else "Server error"
            raise HTTPStatusError(f"{kind} '{self.status} {self.reason}'", self)
        return self

    def __repr__(self) -> str:
        return f"<Response [{self.status} {self.reason}] {len(self.body)} bytes>"


class Request:
    """What a server handler gets: ``method`` and ``path`` (the request
    target, query included) as str, ``headers`` (`Headers`), ``body``
    bytes, ``peer`` the teleport peer's ``ip:port`` (the connection, not the
    original client); ``content``, ``text`` and ``json()`` as on a
    `Response`."""

    __slots__ = ("method", "path", "headers", "body", "peer")

    def __init__(self, method: str, path: str, headers, body: bytes, peer: str):
        self.method = method
        self.path = path
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body
        self.peer = peer

    @classmethod
    def _from_wire(cls, head, body: bytes, peer: str) -> "Request":
        return cls(head.method.decode("latin-1"), head.target.decode("latin-1"),
                   Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers),
                   body, peer)

    content = property(lambda self: self.body, doc="The body, bytes.")
    text = property(lambda self: self.body.decode("utf-8", "replace"),
                    doc="The body decoded as utf-8.")

    def json(self, **kw):
        return _json.loads(self.body, **kw)

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), or None."""
        values = self.headers.get_list(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} from {self.peer}>"


# --------------------------------------------------------------------------- helpers

def codec(name, allow_auto: bool = False):
    """``compress=`` as a `Compress` (or ``"auto"``); ValueError names the choices."""
    if isinstance(name, int):
        return Compress(name)
    if allow_auto and name == "auto":
        return "auto"
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown teleport compression {name!r}: want one of "
                         f"{', '.join(CODECS)}{' or auto' if allow_auto else ''}") from None


def address(addr, listen: bool = False) -> Address:
    if isinstance(addr, Address):
        return addr
    if addr.startswith("unix:") or addr.startswith("/"):
        return parse_address(addr, "unix")
    return parse_address(addr, "tcp", allow_port0=listen)


def default_host(addr: Address) -> bytes:
    """The Host a client sends when the caller names none."""
    return (str(addr) if addr.kind == "tcp" else "localhost").encode()


def to_bytes(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("latin-1")


def header_list(headers) -> list:
    """dict / list of pairs, str or bytes → [(bytes, bytes)] without framing headers."""
    if not headers:
        return []
    items = headers.items() if hasattr(headers, "items") else headers
    out = []
    for name, value in items:
        name = to_bytes(name)
        if name.lower() not in DROP:
            out.append((name, to_bytes(value)))
    return out


def outgoing(method, path, headers, body, host, default: bytes):
    """``do()``'s arguments → ``(method, target, headers, body)`` as bytes,
    with a Host (``host``, else one in ``headers``, else ``default``)."""
    hdrs = header_list(headers)
    if host is not None:
        hdrs = [h for h in hdrs if h[0].lower() != b"host"]
        hdrs.insert(0, (b"Host", to_bytes(host)))
    elif not any(h[0].lower() == b"host" for h in hdrs):
        hdrs.insert(0, (b"Host", default))
    if isinstance(body, str):
        body = body.encode()
    return to_bytes(method).upper(), to_bytes(path), hdrs, body


def build_request(method: str, url: str, params=None, headers=None, json=None,
                  content=None, host=None) -> tuple:
    """``request()``'s arguments (httpx's) → ``do()``'s: ``(method, path,
    headers, body, host)``.  ``url`` is a path (``/a?b=1``) or a full URL,
    whose host becomes the Host header (the connection still goes to the
    client's address: teleport has one peer).  ``params`` (a dict or pairs)
    is appended to the query; ``json`` is serialised with Content-Type
    application/json; ``content`` is bytes or str."""
    if json is not None and content is not None:
        raise ValueError("pass json= or content=, not both")
    if "://" in url or url.startswith("//"):
        parts = urlsplit(url)
        if parts.scheme not in ("", "http", "https"):
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
        if host is None and parts.netloc:
            host = parts.netloc.rsplit("@", 1)[-1]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    else:
        path = url or "/"
    if params:
        query = urlencode(list(params.items()) if hasattr(params, "items") else list(params),
                          doseq=True)
        path += ("&" if "?" in path else "?") + query
    hdrs = header_list(headers)
    body = b""
    if json is not None:
        body = _json.dumps(json, separators=(",", ":"), ensure_ascii=False).encode()
        if not any(k.lower() == b"content-type" for k, _ in hdrs):
            hdrs.append((b"Content-Type", b"application/json"))
    elif content is not None:
        body = content.encode() if isinstance(content, str) else bytes(content)
    return method, path, hdrs, body, host


def answer_parts(out) -> tuple[int, bytes, list, bytes]:
    """A handler's result → ``(status, reason, headers, body)`` as the
    encoder wants them.  ``out`` is ``(status, headers, body)`` or an object
    with ``status`` (or ``status_code``), ``headers``, ``body`` (or
    ``content``) and optionally ``reason``: a `Response` works."""
    if isinstance(out, tuple):
        status, headers, body = out
        reason = None
    else:
        status = getattr(out, "status", None)
        if status is None:
            status = out.status_code
        headers = out.headers
        body = out.body if hasattr(out, "body") else out.content
        reason = getattr(out, "reason", None)
    status = int(status)
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    if isinstance(body, str):
        body = body.encode()
    return status, to_bytes(reason), header_list(headers), body or b""
