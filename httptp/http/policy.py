"""Header policy between the two hops (pure functions, hot path).

Hop-by-hop headers (RFC 9110 §7.6.1) and the headers named by ``Connection``
belong to one connection and are never forwarded.  ``Content-Length`` and
``Expect`` are re-derived by the proxy for every message it writes
(``httptp.http.writer``), so they are dropped too.

Headers the proxy adds to a request (``forward_request_headers``):

* ``-clientIPHeader``: the client's address.  ``X-Forwarded-For`` (any case)
  is a list: the client's address is appended to the values it came with, in
  one field (nginx's ``$proxy_add_x_forwarded_for``, HAProxy's ``option
  forwardfor``).  Any other name is set: what the client sent under it is
  dropped, as the Go original does.
* ``-forwardedProto``: ``X-Forwarded-Proto: http`` or ``https`` (set).
"""

from __future__ import annotations

HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
))
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_XFF = b"x-forwarded-for"       # the one client-IP header that is appended to
_XFP = (b"X-Forwarded-Proto", b"x-forwarded-proto")


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
_CACHE_MAX, _NAME_MAX = 4096, 64     # at most 256 KiB of names per cache
_request_keeps: dict = {}
_response_keeps: dict = {}


def _kept(headers: list, drop: frozenset, keeps: dict) -> list:
    out = []
    for h in headers:
        keep = keeps.get(h[0])
        if keep is None:
            keep = h[0].lower() not in drop
            if len(keeps) < _CACHE_MAX and len(h[0]) <= _NAME_MAX:
                keeps[h[0]] = keep
        if keep:
            out.append(h)
    return out


class _Added:
    """What adding a client-IP header and/or X-Forwarded-Proto means for the
    fields a request came with: one per (header name as spelt, proto or not)."""

    __slots__ = ("drop", "append", "keeps")

    def __init__(self, client_ip_header: bytes | None, proto: bool):
        named = {client_ip_header.lower()} if client_ip_header else set()
        self.drop = _REQUEST_DROP | named | ({_XFP[1]} if proto else set())
        self.append = _XFF in named
        self.keeps: dict = {}   # field name as spelt -> 1 keep, 0 drop, 2 drop and collect

    def classify(self, name: bytes) -> int:
        lower = name.lower()
        keep = 2 if self.append and lower == _XFF else int(lower not in self.drop)
        if len(self.keeps) < _CACHE_MAX and len(name) <= _NAME_MAX:
            self.keeps[name] = keep
        return keep


_added: dict = {}       # (client_ip_header, proto is not None) -> _Added (config values)


def forward_request_headers(headers: list, client_ip_header: bytes | None,
                            client_ip: bytes | None, proto: bytes | None = None) -> list:
    """Headers to send upstream: drop hop-by-hop, Connection-named,
    Content-Length and Expect.  When both ``client_ip_header`` and
    ``client_ip`` are given, one ``client_ip_header`` field goes at the end:
    for X-Forwarded-For the values the request came with, then ``client_ip``
    (appended); for any other name ``client_ip`` alone (set: the client's
    own fields of that name are dropped).  ``proto`` (``b"http"``,
    ``b"https"``): one ``X-Forwarded-Proto: proto`` at the end, set."""
    drop = _drop_set(headers, _REQUEST_DROP)
    if client_ip is None:
        client_ip_header = None
    if client_ip_header is None and proto is None:
        if drop is _REQUEST_DROP:
            return _kept(headers, drop, _request_keeps)
        return [h for h in headers if h[0].lower() not in drop]
    key = (client_ip_header, proto is not None)
    rule = _added.get(key)
    if rule is None:
        rule = _Added(client_ip_header, proto is not None)
        if len(_added) < 64:
            _added[key] = rule
    if drop is _REQUEST_DROP:
        out, prior = _kept_collect(headers, rule)
    else:                           # Connection names more fields: the slow way
        prior = (_values(headers, _XFF) if rule.append and _XFF not in drop else None)
        drop = drop | rule.drop
        out = [h for h in headers if h[0].lower() not in drop]
    if client_ip_header is not None:
        if prior:
            prior.append(client_ip)
            client_ip = b", ".join(prior)
        out.append((client_ip_header, client_ip))
    if proto is not None:
        out.append((_XFP[0], proto))
    return out


def _kept_collect(headers: list, rule: _Added) -> tuple[list, list | None]:
    """(the fields kept, the non-empty X-Forwarded-For values when appending)."""
    keeps = rule.keeps
    out, prior = [], None
    for h in headers:
        keep = keeps.get(h[0])
        if keep is None:
            keep = rule.classify(h[0])
        if keep == 1:
            out.append(h)
        elif keep == 2 and h[1]:
            if prior is None:
                prior = [h[1]]
            else:
                prior.append(h[1])
    return out, prior


def _values(headers: list, lower: bytes) -> list | None:
    values = [v for n, v in headers if v and len(n) == len(lower) and n.lower() == lower]
    return values or None


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
