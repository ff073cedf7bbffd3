"""supervisor/upgrade.py without processes: HTTPTP_INHERIT_FDS as untrusted input,
and the checks on inherited fds (real sockets on loopback)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from httptp.config import load_config
from httptp.supervisor import upgrade
from httptp.supervisor.sockets import TcpListeners, open_listeners


def config(*args):
    return load_config(["-outType=http", *args], {})


def take(value):
    lines = []
    env = {upgrade.ENV: value}
    got = upgrade.take_inherited(lines.append, env)
    assert upgrade.ENV not in env            # read once: never passed on to children
    return got, lines


@pytest.mark.parametrize("value", [
    "", "nonsense", "[]", "{}", '{"parent": -1}', '{"parent": true}',
    '{"parent": 1, "slots": {"x": 3}}', '{"parent": 1, "slots": [3]}',
    '{"parent": 1, "sockets": {"expvarAddr": [":1"]}}', '{"parent": 1, "ready_fd": 1.5}',
    '{"parent": 1, "ready_fd": 99999999999}', '{"parent": 1, "ready_fd": 5, "slots": {"0": 5}}',
])
def test_a_malformed_variable_is_one_line_and_ignored(value):
    got, lines = take(value)
    assert got is None
    assert len(lines) == 1 and lines[0].startswith(f"ignoring {upgrade.ENV}: malformed")


def test_unset_is_none():
    assert upgrade.take_inherited(lambda m: None, {}) is None


def test_a_well_formed_variable():
    got, lines = take(json.dumps({"parent": os.getppid(), "ready_fd": 9,
                                  "listen": "tcp 127.0.0.1:0", "slots": {"0": 5, "1": 6},
                                  "sockets": {"expvarAddr": ["localhost:8040", 7]}}))
    assert lines == []
    assert got == upgrade.Inherited(os.getppid(), 9, "tcp 127.0.0.1:0", {0: 5, 1: 6},
                                    {"expvarAddr": ("localhost:8040", 7)})


def test_a_variable_from_another_process_than_our_parent_is_ignored():
    got, lines = take(json.dumps({"parent": os.getppid() + 1, "slots": {"0": 1}}))
    assert got is None
    assert lines == [f"ignoring {upgrade.ENV}: it names pid {os.getppid() + 1}, not our "
                     f"parent {os.getppid()}; binding every socket as at a plain start"]


def test_listening_socket_refuses_what_is_not_a_listening_socket_of_that_kind():
    r, w = os.pipe()
    plain = socket.socket()
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(upgrade.InheritError, match="is not a socket"):
            upgrade.listening_socket(r, unix=False)
        with pytest.raises(upgrade.InheritError, match="not a listening TCP socket"):
            upgrade.listening_socket(plain.fileno(), unix=False)
        with pytest.raises(upgrade.InheritError, match="not a listening unix socket"):
            upgrade.listening_socket(listening.fileno(), unix=True)
        assert plain.fileno() >= 0 and listening.fileno() >= 0   # left open on refusal
        fd = os.dup(listening.fileno())
        sock = upgrade.listening_socket(fd, unix=False)
        assert sock.fileno() == fd and not sock.get_inheritable()
        sock.close()
    finally:
        os.close(r), os.close(w), plain.close(), listening.close()


def _inherited_from(listeners, cfg):
    description = upgrade.describe(cfg, listeners, {})
    fds = {int(k): os.dup(v) for k, v in description["slots"].items()}
    return upgrade.Inherited(os.getpid(), None, description["listen"], fds)


def test_adopted_tcp_sockets_keep_their_slots_and_port_and_grow_to_the_worker_count():
    cfg = config("-in=127.0.0.1:0", "-workers=2")
    old = open_listeners(cfg.listen, 2, cfg.reuse_port)
    try:
        inherited = _inherited_from(old, cfg)
        new = upgrade.adopt_listeners(inherited, cfg, 3, print)
        assert isinstance(new, TcpListeners) and new.name == old.name
        assert sorted(new.slot_fds()) == [0, 1, 2]
        assert inherited.slots == {}
        new.close()
    finally:
        old.close()


def test_another_listen_address_is_bound_anew_and_the_old_fds_closed():
    cfg = config("-in=127.0.0.1:0", "-workers=1")
    old = open_listeners(cfg.listen, 1, cfg.reuse_port)
    try:
        inherited = _inherited_from(old, cfg)
        fd = inherited.slots[0]
        lines = []
        other = config("-in=127.0.0.1:1", "-workers=1")
        assert upgrade.adopt_listeners(inherited, other, 1, lines.append) is None
        assert "binding -in anew" in lines[0]
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        old.close()


def test_a_helper_socket_is_adopted_only_for_the_same_value():
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        inherited = upgrade.Inherited(1, None, sockets={"expvarAddr": ("a:1", os.dup(sock.fileno())),
                                                       "autocertHTTPAddr": (":80", os.dup(sock.fileno()))})
        lines = []
        got = upgrade.adopt_socket(inherited, "expvarAddr", "a:1", lines.append)
        assert got is not None and got.getsockname() == sock.getsockname()
        got.close()
        assert upgrade.adopt_socket(inherited, "autocertHTTPAddr", ":8080", lines.append) is None
        assert lines == ["upgrade: -autocertHTTPAddr was ':80', is ':8080': binding it anew"]
        assert inherited.sockets == {}
    finally:
        sock.close()


def test_report_ready_writes_once_and_closes():
    r, w = os.pipe()
    try:
        inherited = upgrade.Inherited(1, w)
        upgrade.report_ready(inherited, print)
        assert os.read(r, 64) == upgrade.READY and inherited.ready_fd is None
        assert os.read(r, 64) == b""             # closed: EOF
    finally:
        os.close(r)


def test_fds_that_are_not_listening_sockets_are_never_closed(tmp_path):
    r, w = os.pipe()
    f = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    try:
        inherited = upgrade.Inherited(1, None, "tcp 127.0.0.1:1", {0: r},
                                      {"expvarAddr": ("x:1", w)})
        assert upgrade.adopt_listeners(inherited, config("-in=127.0.0.1:0"), 1, print) is None
        upgrade.close_unused(inherited)
        lines = []
        upgrade.report_ready(upgrade.Inherited(1, f), lines.append)
        assert lines == ["upgrade: could not tell the old master (pid 1) we are ready: "
                         f"fd {f} is not a pipe"]
        os.fstat(r), os.fstat(w), os.fstat(f)     # all still open
    finally:
        os.close(r), os.close(w), os.close(f)


def test_report_ready_to_a_gone_master_is_one_line():
    r, w = os.pipe()
    os.close(r)
    lines = []
    upgrade.report_ready(upgrade.Inherited(4242, w), lines.append)
    assert len(lines) == 1 and "could not tell the old master (pid 4242)" in lines[0]
