"""Header policy between the two hops (pure functions, hot path).

Hop-by-hop headers (RFC 9110 §7.6.1) and the headers named by ``Connection``
belong to one connection and are never forwarded.  ``Content-Length`` and
``Expect`` are re-derived by the proxy for every message it writes
(``httptp.http.writer``), so they are dropped too.
"""

from __future__ import annotations

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
))
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_with_ip_header: dict = {}     # client-IP header name -> _REQUEST_DROP plus its lower-case name


def connection_tokens(headers: list) -> frozenset:
    """Lower-case field names listed in every ``Connection`` header."""
    tokens = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


# Connection values that name nothing beyond the hop-by-hop set (nearly all).
_NOTHING_MORE = frozenset((b"keep-alive", b"Keep-Alive", b"close", b"Close"))


def _drop_set(headers: list, base: frozenset) -> frozenset:
    for name, value in headers:
        if len(name) == 10 and value not in _NOTHING_MORE and name.lower() == b"connection":
            return base | connection_tokens(headers)
    return base


# Whether a field name (as spelt) is forwarded, for the base drop sets: one
# dict lookup per field instead of a lower() and a set lookup.  Names come
# from peers, so each cache is bounded.
_CACHE_MAX = 4096
_request_keeps: dict = {}
_response_keeps: dict = {}


def _kept(headers: list, drop: frozenset, keeps: dict) -> list:
    out = []
    for h in headers:
        keep = keeps.get(h[0])
        if keep is None:
            keep = h[0].lower() not in drop
            if len(keeps) < _CACHE_MAX:
                keeps[h[0]] = keep
        if keep:
            out.append(h)
    return out


def forward_request_headers(headers: list, client_ip_header: bytes | None,
                            client_ip: bytes | None) -> list:
    """Headers to send upstream: drop hop-by-hop, Connection-named,
    Content-Length and Expect; when both ``client_ip_header`` and
    ``client_ip`` are given, replace any such header (any case) with one
    ``client_ip_header: client_ip`` at the end."""
    drop = _drop_set(headers, _REQUEST_DROP)
    if client_ip_header and client_ip is not None:
        if drop is _REQUEST_DROP:
            with_ip = _with_ip_header.get(client_ip_header)
            if with_ip is None:
                with_ip = _with_ip_header[client_ip_header] = drop | {client_ip_header.lower()}
            drop = with_ip
        else:
            drop = drop | {client_ip_header.lower()}
        out = [h for h in headers if h[0].lower() not in drop]
        out.append((client_ip_header, client_ip))
        return out
    if drop is _REQUEST_DROP:
        return _kept(headers, drop, _request_keeps)
    return [h for h in headers if h[0].lower() not in drop]


def set_host(headers: list, authority: bytes) -> list:
    """``headers`` with one ``Host: authority`` where the first Host was (at
    the end when there was none): the Host sent upstream for an absolute-form
    request, whose target's authority wins (RFC 9112 §3.2.2)."""
    out = []
    for name, value in headers:
        if len(name) == 4 and name.lower() == b"host":
            if authority is not None:
                out.append((name, authority))
                authority = None
        else:
            out.append((name, value))
    if authority is not None:
        out.append((b"Host", authority))
    return out


def forward_response_headers(headers: list) -> list:
    """Headers to send to the client: drop hop-by-hop, Connection-named and
    Content-Length (the writer sets framing)."""
    drop = _drop_set(headers, _RESPONSE_DROP)
    if drop is _RESPONSE_DROP:
        return _kept(headers, drop, _response_keeps)
    return [h for h in headers if h[0].lower() not in drop]
