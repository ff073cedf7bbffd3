"""A small authoritative DNS server for the discovery tests: UDP on 127.0.0.1,
answers built with dnspython from a dict the test changes as it goes.

``records[(name, type)] = [rdata text, ...]`` (names without the final dot,
lower case); a name with no record of any type is NXDOMAIN, a known name
without the asked type an empty answer.  ``answering = False`` drops every
query (a dead server: the client times out); ``servfail = True`` answers
SERVFAIL.  ``queries`` counts what arrived.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DNSServer:
    def __init__(self, ttl: int = 1):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.ttl = ttl
        self.records: dict[tuple[str, str], list[str]] = {}
        self.answering = True
        self.servfail = False
        self.queries = 0
        self.lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def set(self, name: str, rdtype: str, values: list[str]) -> None:
        with self.lock:
            if values:
                self.records[(name.lower(), rdtype)] = list(values)
            else:
                self.records.pop((name.lower(), rdtype), None)

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self.lock:
                self.queries += 1
                if not self.answering:
                    continue
                reply = self._answer(data)
            if reply is not None:
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    pass

    def _answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:           # not DNS: ignore, like a real server
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(
                question.name, self.ttl, "IN", rdtype, values))
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.thread.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
