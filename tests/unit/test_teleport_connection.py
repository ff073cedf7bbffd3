"""The sans-IO teleport connection (httptp/teleport/connection.py), driven in
memory: a client and a server connection exchange bytes as h11's
``ConnectionPair`` tests do, no socket, no loop, no clock."""

import itertools

import pytest

from httptp.teleport import CodecError, FrameTooLarge, HandshakeError, TeleportError
from httptp.teleport.codecs import MAX_SLICE, compressor
from httptp.teleport.connection import (MAX_ID, ClientConnection, RequestIdOverflow,
                                        ServerConnection)
from httptp.teleport.handshake import HEADER_SIZE, Compress, encode
from tests.unit.test_teleport_vectors import CASES, IDS, check_requests, check_responses, load

CODECS = list(Compress)
HOST = [(b"Host", b"example.com")]


def sliced(data: bytes, step: int | None):
    if not step:
        yield data
        return
    for i in range(0, len(data), step):
        yield data[i:i + step]


class Pair:
    """A client and a server connection joined by two byte pipes."""

    def __init__(self, requests=Compress.NONE, responses=Compress.NONE, *, client=None,
                 server=None):
        self.client = ClientConnection(requests, **(client or {}))
        self.server = ServerConnection(responses, **(server or {}))
        theirs, tls = self.server.receive_handshake(self.client.handshake())
        assert (theirs, tls) == (Compress(requests), False)
        theirs, tls = self.client.receive_handshake(self.server.handshake())
        assert theirs == self.server.compress

    def send(self, method=b"GET", target=b"/", body=b"", headers=HOST) -> int:
        req_id, frame = self.client.send_request(method, target, headers, body)
        self.client.write(frame)
        return req_id

    def answer(self, req_id, status=200, body=b"", headers=(), reason=b"") -> None:
        frame = self.server.send_response(req_id, status, reason, list(headers), body)
        if frame:
            self.server.write(frame)

    def to_server(self, step=None) -> list:
        out = []
        for piece in sliced(self.client.flush(), step):
            out += self.server.receive_data(piece)
        return out

    def to_client(self, step=None) -> list:
        out = []
        for piece in sliced(self.server.flush(), step):
            out += self.client.receive_data(piece)
        return out

    def echo(self, step=None) -> dict:
        """Answer every request that reaches the server with its target and
        body; return the client's responses by id."""
        for req_id, head, body in self.to_server(step):
            self.answer(req_id, body=head.target + b" " + body)
        return {req_id: (head, body) for req_id, head, body in self.to_client(step)}


# --- round trips, every codec --------------------------------------------------------

@pytest.mark.parametrize("requests, responses", list(itertools.product(CODECS, CODECS)),
                         ids=lambda c: c.name.lower())
def test_round_trip_every_codec_pair(requests, responses):
    p = Pair(requests, responses)
    for batch in range(3):                      # the streams carry on across batches
        ids = [p.send(b"POST", b"/b%d/%d" % (batch, i), b"x" * (i * 1000)) for i in range(4)]
        got = p.echo(step=7 if batch == 1 else None)
        assert sorted(got) == ids
        for i, req_id in enumerate(ids):
            head, body = got[req_id]
            assert head.status == 200
            assert body == b"/b%d/%d " % (batch, i) + b"x" * (i * 1000)
    assert p.client.pending == {}


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name.lower())
def test_auto_answers_in_the_clients_codec(codec):
    p = Pair(codec, None)
    assert p.server.compress == p.server.peer_compress == codec
    assert p.client.peer_compress == codec
    req_id = p.send()
    assert p.echo()[req_id][1] == b"/ "


def test_auto_server_has_no_codec_before_the_clients_handshake():
    s = ServerConnection(None)
    with pytest.raises(RuntimeError):
        s.handshake()
    s.write(b"a frame")
    with pytest.raises(RuntimeError):
        s.flush()
    assert s.buffered == 7 and s.error is None      # nothing lost, nothing sticky


def test_one_flush_is_one_batch_and_counts_plain_bytes():
    p = Pair(Compress.FLATE, Compress.FLATE)
    assert p.client.flush() == b""                # nothing written: nothing to send
    frames = [p.client.send_request(b"GET", b"/%d" % i, HOST)[1] for i in range(3)]
    sizes = [p.client.write(f) for f in frames]
    assert sizes == [len(frames[0]), len(frames[0]) + len(frames[1]), sum(map(len, frames))]
    assert p.client.buffered == sum(map(len, frames))
    wire = p.client.flush()
    assert wire.endswith(b"\x00\x00\xff\xff")       # one sync flush ends the batch
    assert p.client.buffered == 0 and p.client.plain_sent == sum(map(len, frames))
    got = p.server.receive_data(wire)
    assert [h.target for _, h, _ in got] == [b"/0", b"/1", b"/2"]
    assert p.server.plain_received == sum(map(len, frames))


def test_a_frame_held_back_is_never_sent():
    """The driver may drop a frame between send_request and write (its
    deadline passed while queued): forget(sent=False) and nothing is left."""
    p = Pair()
    dropped, _ = p.client.send_request(b"HEAD", b"/late", HOST, b"")
    p.client.forget(dropped, sent=False)
    kept = p.send(target=b"/kept")
    assert [r[0] for r in p.to_server()] == [kept]
    assert p.client._late_heads == set()


# --- pipelining, out of order ----------------------------------------------------------

def test_pipelined_responses_out_of_order():
    p = Pair(Compress.SNAPPY, Compress.ZSTD)
    ids = [p.send(b"POST", b"/%d" % i, b"body %d" % i) for i in range(10)]
    reqs = p.to_server()
    assert [r[0] for r in reqs] == ids
    order = [reqs[i] for i in (7, 2, 9, 0, 5, 1, 8, 3, 6, 4)]
    got = []
    for n, (req_id, head, body) in enumerate(order):
        p.answer(req_id, body=body)
        if n % 3 == 2:                             # several flushes, several reads
            got += p.to_client(step=5)
    got += p.to_client()
    assert [g[0] for g in got] == [r[0] for r in order]
    for req_id, head, body in got:
        assert body == b"body %d" % ids.index(req_id)
    assert p.client.pending == {}


def test_forgotten_request_answer_is_read_and_dropped():
    p = Pair()
    slow, fast = p.send(target=b"/slow"), p.send(target=b"/fast")
    p.to_server()
    p.client.forget(slow)                         # timed out
    assert list(p.client.pending) == [fast]
    p.answer(slow, body=b"late")
    p.answer(fast, body=b"ok")
    assert [(r[0], r[2]) for r in p.to_client()] == [(fast, b"ok")]
    assert p.client.pending == {}


def test_fire_and_forget_id_zero_gets_no_answer():
    p = Pair()
    frame = (0).to_bytes(4, "little") + b"GET /nowait HTTP/1.1\r\nHost: a\r\n\r\n"
    [(req_id, head, _)] = p.server.receive_data(frame)
    assert req_id == 0 and head.target == b"/nowait"
    assert p.server.send_response(0, 200, b"", [], b"ignored") == b""


# --- HEAD ----------------------------------------------------------------------------

def test_head_answer_has_no_body_on_either_side():
    p = Pair(Compress.FLATE, Compress.BROTLI)
    head_id, get_id = p.send(b"HEAD", b"/h"), p.send(b"GET", b"/g")
    reqs = p.to_server()
    p.answer(head_id, body=b"a body a handler gave anyway")
    p.answer(get_id, body=b"get body")
    wire = p.server._batch[0]
    assert b"Content-Length: 0\r\n\r\n" in wire and b"anyway" not in wire
    got = {r[0]: r for r in p.to_client()}
    assert got[head_id][2] == b"" and got[get_id][2] == b"get body"
    assert [h.method for _, h, _ in reqs] == [b"HEAD", b"GET"]
    assert p.server._heads == {}


def test_head_answer_with_a_content_length_is_read_without_body():
    """A Go server answers HEAD with the upstream's Content-Length and no
    body (PROTOCOL.md §1.9): the client frames it by the method it sent."""
    c = ClientConnection(Compress.NONE)
    c.receive_handshake(encode(Compress.NONE, False))
    head_id, _ = c.send_request(b"HEAD", b"/", HOST)
    get_id, _ = c.send_request(b"GET", b"/", HOST)
    stream = (head_id.to_bytes(4, "little") + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
              + get_id.to_bytes(4, "little") + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    got = [r for piece in sliced(stream, 3) for r in c.receive_data(piece)]
    assert [(r[0], r[1].content_length, r[2]) for r in got] == [(head_id, 9, b""),
                                                                 (get_id, 2, b"ok")]


def test_forgotten_head_late_answer_keeps_the_stream_in_sync():
    c = ClientConnection(Compress.NONE)
    c.receive_handshake(encode(Compress.NONE, False))
    head_id, _ = c.send_request(b"HEAD", b"/", HOST)
    c.forget(head_id)                              # timed out after it was sent
    get_id, _ = c.send_request(b"GET", b"/", HOST)
    stream = (head_id.to_bytes(4, "little") + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
              + get_id.to_bytes(4, "little") + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [(r[0], r[2]) for r in c.receive_data(stream)] == [(get_id, b"ok")]
    assert c._late_heads == set()


@pytest.mark.parametrize("status", [100, 204, 304])
def test_bodiless_statuses_drop_the_body(status):
    p = Pair()
    req_id = p.send()
    p.to_server()
    p.answer(req_id, status=status, body=b"dropped")
    [(_, head, body)] = p.to_client()
    assert head.status == status and body == b""


def test_bad_status_is_a_caller_error_not_sticky():
    p = Pair()
    req_id = p.send(b"HEAD")
    p.to_server()
    with pytest.raises(ValueError):
        p.server.send_response(req_id, 1000, b"", [], b"")
    p.answer(req_id, body=b"x")                    # still known as a HEAD
    assert p.to_client()[0][2] == b""


# --- ids -----------------------------------------------------------------------------

def test_ids_wrap_to_one_never_zero():
    p = Pair(client={"first_id": MAX_ID - 1})
    ids = [p.send(target=b"/%d" % i) for i in range(4)]
    assert ids == [MAX_ID - 1, MAX_ID, 1, 2]
    got = p.echo()
    assert sorted(got) == sorted(ids) and got[1][1] == b"/2 "


def test_wrap_skips_ids_still_pending():
    p = Pair()
    stuck = [p.send(target=b"/stuck%d" % i) for i in range(3)]     # 1, 2, 3: never answered
    p.to_server()
    p.client.forget(2)                                              # 2 is free again
    p.client.next_id = MAX_ID
    ids = [p.send(target=b"/%d" % i) for i in range(4)]
    assert stuck == [1, 2, 3] and ids == [MAX_ID, 2, 4, 5]
    assert set(p.client.pending) == {1, 3, MAX_ID, 2, 4, 5}
    assert sorted(r[0] for r in p.to_server()) == sorted(ids)


def test_wrap_onto_a_pending_id_can_fail_as_go_does():
    p = Pair(client={"skip_pending_ids": False})
    first = p.send()
    p.client.next_id = first
    with pytest.raises(RequestIdOverflow, match="overflow") as e:
        p.send()
    with pytest.raises(RequestIdOverflow) as again:               # sticky
        p.send()
    assert again.value is e.value and p.client.error is e.value
    with pytest.raises(RequestIdOverflow):
        p.client.flush()


def test_refused_request_uses_no_id():
    p = Pair()
    with pytest.raises(ValueError):
        p.client.send_request(b"GET", b"/", HOST, b"a GET cannot carry this")
    with pytest.raises(ValueError, match="Host"):
        p.client.send_request(b"POST", b"/", [], b"")
    assert p.client.error is None and p.client.pending == {}
    assert p.send() == 1


def test_first_id_is_checked():
    with pytest.raises(ValueError):
        ClientConnection(first_id=0)


# --- limits ----------------------------------------------------------------------------

def test_response_over_the_header_limit_is_sticky():
    p = Pair(client={"max_header_size": 200})
    small, big = p.send(target=b"/small"), p.send(target=b"/big")
    p.to_server()
    p.answer(small, body=b"fine")
    p.answer(big, headers=[(b"X-Big", b"y" * 300)])
    wire = p.server.flush()
    with pytest.raises(FrameTooLarge) as e:
        p.client.receive_data(wire)
    assert e.value.what == "header" and e.value.req_id == big and e.value.limit == 200
    assert p.client.error is e.value
    for call in (lambda: p.client.receive_data(b"more"), lambda: p.client.next_frames(),
                 p.client.flush, lambda: p.client.send_request(b"GET", b"/", HOST),
                 lambda: p.client.write(b"x")):
        with pytest.raises(FrameTooLarge) as again:
            call()
        assert again.value is e.value
    p.client.forget(big)                           # clean-up never raises


def test_response_over_the_body_limit():
    p = Pair(Compress.ZSTD, Compress.ZSTD, client={"max_body_size": 1000})
    ok, big = p.send(target=b"/ok"), p.send(target=b"/big")
    p.to_server()
    p.answer(ok, body=b"a" * 1000)
    p.answer(big, body=b"b" * 1001)
    with pytest.raises(FrameTooLarge) as e:
        p.to_client(step=100)
    assert e.value.what == "body" and e.value.req_id == big and e.value.size == 1001


def test_request_body_over_the_limit_is_refused_and_skipped():
    p = Pair(Compress.FLATE, server={"max_body_size": 100})
    big = p.send(b"POST", b"/big", b"z" * 5000)
    after = p.send(b"POST", b"/after", b"fine")
    reqs = p.to_server(step=64)
    assert [(r[0], r[2]) for r in reqs] == [(big, None), (after, b"fine")]
    assert p.server.error is None
    p.answer(big, status=413, body=b"too large")
    p.answer(after, body=b"ok")
    assert {r[0]: r[1].status for r in p.to_client()} == {big: 413, after: 200}


def test_request_header_over_the_limit_is_sticky():
    p = Pair(server={"max_header_size": 100})
    p.send(headers=HOST + [(b"X-Pad", b"p" * 200)])
    with pytest.raises(FrameTooLarge) as e:
        p.to_server()
    assert e.value.what == "header" and e.value.req_id == 1
    with pytest.raises(FrameTooLarge):
        p.server.receive_data(b"")


def test_a_bomb_comes_out_one_slice_at_a_time():
    """next_frames decompresses at most one slice per call, so a driver can
    check its limits and yield between slices (codecs.MAX_SLICE)."""
    p = Pair(Compress.FLATE, server={"max_body_size": 64 << 20})
    req_id = p.send(b"POST", b"/bomb", b"\0" * (4 * MAX_SLICE + 10))
    wire = p.client.flush()
    assert len(wire) < MAX_SLICE // 8
    p.server.feed(wire)
    seen, frames = [], []
    while (got := p.server.next_frames()) is not None:
        seen.append(p.server.plain_received)
        frames += got
    steps = [b - a for a, b in zip([0] + seen, seen)]
    assert len(steps) >= 5 and max(steps) <= MAX_SLICE
    assert [(f[0], len(f[2])) for f in frames] == [(req_id, 4 * MAX_SLICE + 10)]


# --- sticky errors ---------------------------------------------------------------------

@pytest.mark.parametrize("codec", [Compress.FLATE, Compress.SNAPPY, Compress.ZSTD,
                                   Compress.BROTLI], ids=lambda c: c.name.lower())
def test_corrupt_stream_error_is_sticky(codec):
    c = ClientConnection(Compress.NONE)
    c.receive_handshake(encode(codec, False))
    c.send_request(b"GET", b"/", HOST)
    with pytest.raises(CodecError) as e:
        c.receive_data(b"\xff\xfe this is not a %s stream \x00\x01" % codec.name.encode() * 40)
    with pytest.raises(CodecError) as again:
        c.receive_data(encode(Compress.NONE, False))
    assert again.value is e.value and c.error is e.value


def test_garbage_frame_is_sticky_on_the_server():
    s = ServerConnection(Compress.NONE)
    s.receive_handshake(encode(Compress.NONE, False))
    with pytest.raises(TeleportError) as e:
        s.receive_data(b"\x01\x00\x00\x00NOT HTTP AT ALL\r\n\r\n")
    with pytest.raises(TeleportError) as again:
        s.flush()
    assert again.value is e.value


def test_bad_handshake_is_sticky():
    s = ServerConnection(Compress.NONE)
    with pytest.raises(HandshakeError) as e:
        s.receive_handshake(b"httpteleport\x00\x09\x00")
    with pytest.raises(HandshakeError) as again:
        s.receive_handshake(encode(Compress.NONE, False))
    assert again.value is e.value


def test_data_before_the_handshake_is_a_driver_bug():
    with pytest.raises(RuntimeError):
        ClientConnection().receive_data(b"x")
    assert ClientConnection().next_frames() is None


def test_tls_flag_is_reported():
    s = ServerConnection(Compress.NONE)
    assert s.receive_handshake(encode(Compress.SNAPPY, True)) == (Compress.SNAPPY, True)
    assert s.handshake(True)[-1] == 1 and s.handshake()[-1] == 0


# --- the Go captures ---------------------------------------------------------------------

def _replay(case, step):
    """Our server reads Go's client stream; our client sends the same
    requests (so ids 1..n are pending) and reads Go's server stream."""
    c2s, s2c = load(case, "c2s"), load(case, "s2c")
    server = ServerConnection(Compress.NONE)
    theirs, tls = server.receive_handshake(c2s[:HEADER_SIZE])
    assert theirs.name.lower() == case["client_compress"] and not tls
    requests = [r for piece in sliced(c2s[HEADER_SIZE:], step)
                for r in server.receive_data(piece)]
    client = ClientConnection(Compress.SNAPPY)
    for req_id, head, body in requests:
        headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
        assert client.send_request(head.method, head.target, headers, body)[0] == req_id
    theirs, _ = client.receive_handshake(s2c[:HEADER_SIZE])
    assert theirs.name.lower() == case["server_compress"]
    responses = [r for piece in sliced(s2c[HEADER_SIZE:], step)
                 for r in client.receive_data(piece)]
    return requests, responses, client


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("step", [1, 7, 1000])
def test_go_captures_through_receive_data(case, step):
    requests, responses, client = _replay(case, step)
    check_requests(case, requests)
    check_responses(case, responses)
    assert client.pending == {} and client.error is None


@pytest.mark.parametrize("case", CASES[:1], ids=IDS[:1])
def test_go_capture_answers_to_forgotten_requests_are_dropped(case):
    c2s, s2c = load(case, "c2s"), load(case, "s2c")
    server = ServerConnection(Compress.NONE)
    server.receive_handshake(c2s[:HEADER_SIZE])
    requests = server.receive_data(c2s[HEADER_SIZE:])
    client = ClientConnection(Compress.NONE)
    for req_id, head, body in requests:
        headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
        client.send_request(head.method, head.target, headers, body)
    client.forget(2)
    client.forget(4)
    client.receive_handshake(s2c[:HEADER_SIZE])
    got = [r for piece in sliced(s2c[HEADER_SIZE:], 13) for r in client.receive_data(piece)]
    assert [r[0] for r in got] == [1, 3, 5]


def test_our_client_bytes_read_like_gos():
    """What our client sends for the captured requests reads back the same in
    every codec (the compressed bytes differ: Go's fasthttp orders headers
    its own way)."""
    case = CASES[0]
    requests, _, _ = _replay(case, None)
    for codec in CODECS:
        client = ClientConnection(codec)
        for req_id, head, body in requests:
            headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
            client.write(client.send_request(head.method, head.target, headers, body)[1])
        server = ServerConnection(Compress.NONE)
        server.receive_handshake(client.handshake())
        check_requests(case, [r for piece in sliced(client.flush(), 100)
                              for r in server.receive_data(piece)])
    assert compressor(Compress.NONE).compress(b"x") == b"x"


def test_fail_fast_remembers_a_failed_dial_for_a_while():
    from httptp.teleport.connection import STICKY_FOR, FailFast
    now = [100.0]
    ff = FailFast("127.0.0.1:9", lambda: now[0])
    assert ff.refusal() is None and ff.last is None
    ff.failed("connection refused")
    want = "teleport connection to 127.0.0.1:9 failed: connection refused"
    assert ff.refusal() == want and ff.last == want
    now[0] += STICKY_FOR - 0.01
    assert ff.refusal() == want
    now[0] += 0.02
    assert ff.refusal() is None and ff.last is None      # forgotten: the next request dials
    ff.closed = True
    assert ff.refusal() == "teleport client for 127.0.0.1:9 is closed"
