"""Errors that carry their answer.

Every failure that reaches a client is one of these: the status and the short
text body live here, in one table, so the connection code never needs an
isinstance ladder (STYLE.md §7.4).
"""

from __future__ import annotations


class ProxyError(Exception):
    """An expected failure with the HTTP answer the client gets."""

    status = 500
    reason = "Internal Server Error"
    body = "internal error"
    close = True            # close the client connection after answering
    upstream = ""           # the upstream that failed, if any (access log)
    upstream_time = 0.0
    request = None          # the refused request's head, when only the error knows it (access log)

    def __init__(self, detail: str = ""):
        super().__init__(detail or self.body)
        self.detail = detail

    @property
    def payload(self) -> bytes:
        """The body as sent to the client: the short text and a newline."""
        return (self.body + "\n").encode()


class BadRequest(ProxyError):
    status, reason, body = 400, "Bad Request", "bad request"


class MethodNotAllowed(ProxyError):
    status, reason, body = 405, "Method Not Allowed", "method not allowed: only GET is accepted"


class RequestTimeout(ProxyError):
    status, reason, body = 408, "Request Timeout", "request header timeout"


class PayloadTooLarge(ProxyError):
    status, reason, body = 413, "Payload Too Large", "request body too large"


class HeaderTooLarge(ProxyError):
    status, reason, body = 431, "Request Header Fields Too Large", "request header too large"


class BadGateway(ProxyError):
    status, reason, body = 502, "Bad Gateway", "upstream failed"
    close = False


class ServiceUnavailable(ProxyError):
    status, reason, body = 503, "Service Unavailable", "server overloaded: too many connections"


class NoUpstreamUp(ProxyError):
    """Every upstream is down by the active health checks (-outHealthCheck)."""
    status, reason, body = 503, "Service Unavailable", "no upstream is up (health checks)"
    close = False


class GatewayTimeout(ProxyError):
    status, reason, body = 504, "Gateway Timeout", "upstream timed out"
    close = False


class UpgradeNotSupported(ProxyError):
    status, reason, body = 501, "Not Implemented", "Upgrade cannot cross a teleport link"
    close = False


class ProtocolError(BadRequest):
    """The peer sent bytes that are not valid HTTP/1.1 (or that we refuse as
    ambiguous).  ``status`` is 400, 413 or 431; the connection is closed.

    ``request``: the head of the refused request when the parser got far
    enough to know it but raised before handing it out (a 413 or 431): the
    whole head, or one with only the request line (no headers)."""

    def __init__(self, detail: str = "", status: int = 400, request=None):
        super().__init__(detail)
        if status != 400:
            cls = {413: PayloadTooLarge, 431: HeaderTooLarge}[status]
            self.status, self.reason, self.body = cls.status, cls.reason, cls.body
        if request is not None:
            self.request = request


class UpstreamError(Exception):
    """An upstream exchange failed.  ``sent_nothing_back`` is true when no byte of
    a response arrived, which makes an idempotent request safe to retry."""

    def __init__(self, detail: str, sent_nothing_back: bool = True):
        super().__init__(detail)
        self.sent_nothing_back = sent_nothing_back


class ResponseTooLarge(UpstreamError):
    """An upstream response over -outMaxHeaderSize or -outMaxBodySize: the
    client gets 502, the upstream connection is closed (never retried: the
    upstream did answer)."""

    def __init__(self, detail: str):
        super().__init__(detail, sent_nothing_back=False)


class ConfigError(Exception):
    """A bad option value: one line naming the flag; the command exits 2."""
