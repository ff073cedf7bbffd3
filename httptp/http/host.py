"""Host and request-target syntax: the checks every request passes (sans-IO).

``valid_host`` says whether a ``Host`` value (or the authority of an
absolute-form target) is ``host [":" port]`` by RFC 3986 §3.2.2/§3.2.3 (RFC
9110 §7.2): a reg-name (unreserved, pct-encoded, sub-delims; an IPv4 address
is one too), or an IP-literal ``[IPv6]`` / ``[vX.future]``, then an optional
port of digits.  A space, a control character, ``@`` (userinfo), ``/`` or a
non-ASCII byte makes it invalid.

An empty value is refused too.  RFC 9110 §7.2 allows ``Host:`` empty only
when the target URI has no authority, which never happens for the http(s)
URIs a reverse proxy serves; nginx refuses it as well ("client sent invalid
host header", 400).  Being no laxer than nginx is the conservative choice.

``upstream_target`` classifies a request-target (RFC 9112 §3.2) into what is
sent upstream: origin-form as is, ``*`` for OPTIONS only, and absolute-form
``http(s)://authority/path?query`` as its origin-form plus the authority, which
becomes the Host upstream (§3.2.2: the target's authority wins over Host).

Used by both HTTP parser back-ends (``parser.check_request``), the teleport
frame reader and the pipeline, so one grammar decides everywhere.  Hot path:
a value already seen valid costs one set lookup (about 40 ns); a new one a
regex fullmatch (about 0.3 us).
"""

from __future__ import annotations

import ipaddress
import re

_SUB_DELIMS = rb"!$&'()*+,;="
_UNRESERVED = rb"A-Za-z0-9\-._~"
_REG_CHARS = rb"[" + _UNRESERVED + _SUB_DELIMS + rb"]"
_PCT = rb"%[0-9A-Fa-f]{2}"
# one or more (char | %HH), written so that no two paths match the same text:
# a run of characters is one C loop, and a failing value cannot backtrack
_REG_NAME = (rb"(?:" + _REG_CHARS + rb"|" + _PCT + rb")" + _REG_CHARS + rb"*(?:" + _PCT
             + _REG_CHARS + rb"*)*")
_IP_FUTURE = rb"[vV][0-9A-Fa-f]+\.[" + _UNRESERVED + _SUB_DELIMS + rb":]+"
# The IPv6 grammar is long; this keeps its alphabet and ipaddress checks the rest.
_HOST = re.compile(rb"(?:" + _REG_NAME + rb"|\[(?:(" + rb"[0-9A-Fa-f:.]+" + rb")|"
                   + _IP_FUTURE + rb")\])(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?]*)(.*)", re.DOTALL)

_seen: set = set()      # values found valid, so the usual ones skip the regex
_SEEN_MAX = 512         # cleared when full: a flood of new names costs only the regex
_SEEN_LEN = 262         # a DNS name and a port: longer values are checked every time


def valid_host(value: bytes) -> bool:
    """True when ``value`` is a non-empty ``host [":" port]`` (module docstring)."""
    if value in _seen:
        return True
    m = _HOST.fullmatch(value)
    if m is None:
        return False
    v6 = m.group(1)
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6.decode("ascii"))
        except ValueError:
            return False
    if len(value) <= _SEEN_LEN:
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen.add(bytes(value))
    return True


def upstream_target(method: bytes, target: bytes) -> tuple[bytes, bytes | None] | None:
    """``(target to send upstream, authority or None)`` for a request-target,
    or None when it is none of the forms httptp serves: origin-form
    (``/path?query``), ``*`` with OPTIONS, or absolute-form with an http or
    https scheme and a valid authority (no userinfo).  An absolute-form target
    becomes origin-form (``/`` when its path is empty; ``*`` for OPTIONS with
    neither path nor query, RFC 9112 §3.2.4)."""
    if target[:1] == b"/":
        return target, None
    if target == b"*":
        return (target, None) if method == b"OPTIONS" else None
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        return None
    authority, rest = m.groups()
    if not valid_host(authority):
        return None
    if rest[:1] != b"/":
        if not rest and method == b"OPTIONS":
            rest = b"*"
        else:
            rest = b"/" + rest
    return rest, authority
