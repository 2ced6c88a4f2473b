"""A property-based fuzzer over the HIS listener (issue 12): the request line, headers, chunking, pipelining,
JSON and envelope fields. Whatever comes, fep stays up, answers every request it read, in order, keeps at most
`max_pipelined` requests per connection, and journals nothing for a refused request.

A short run is part of the suite; scripts/fuzz runs long (FEP_FUZZ_EXAMPLES)."""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

import httptools
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, task

from fep.http11 import HTTPServerProtocol, Limits, Request, Response
from fep.sim.world import World, ZHANG

EXAMPLES = int(os.environ.get("FEP_FUZZ_EXAMPLES", "200"))
E2E_EXAMPLES = int(os.environ.get("FEP_FUZZ_E2E_EXAMPLES", "15"))
REFUSALS = {400, 408, 413, 414, 431, 501}

# ---- what a HIS (or anything else) might send ---------------------------------------------------------------

token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_"), min_size=1, max_size=12)
junk = st.binary(max_size=40)
methods = st.one_of(st.sampled_from(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "PATCH"]), token)
paths = st.one_of(st.sampled_from(["/fsi/api/rsfComIfsService/callService", "/hsa/hgs/1101", "/fep/trades/X",
                                   "/fep/confirm/X", "*", "/"]),
                  st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=300).map(
                      lambda t: "/" + t))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=20),
                    st.decimals(allow_nan=False, allow_infinity=False, places=2).map(str))
fields = st.dictionaries(st.sampled_from(["infno", "msgid", "opter", "opter_type", "opter_name", "sign_no",
                                          "insuplc_admdvs", "infver", "input", "data", "psn_no", "mdtrt_cert_no"]),
                         st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                                      st.dictionaries(token, kids, max_size=3)),
                                      max_leaves=6), max_size=8)
envelopes = st.one_of(
    fields.map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
    st.sampled_from(["1101", "2201", "2207", "9001", "0000", "2601"]).map(lambda infno: json.dumps(
        {"infno": infno, "opter_type": "1", "opter": "his", "opter_name": "HIS",
         "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}}).encode()),
    junk)


@st.composite
def request(draw: Any) -> bytes:
    method, path = draw(methods), draw(paths)
    body = draw(envelopes)
    version = draw(st.sampled_from(["1.1", "1.1", "1.0", "2.0", "x"]))
    heads = draw(st.lists(st.tuples(token, st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)),
                          max_size=4))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "wrong"]))
    lines = [f"{method} {path} HTTP/{version}", "Host: fep"]
    lines += [f"{k}: {v}" for k, v in heads]
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["Connection: close", "Connection: keep-alive", "Expect: 100-continue",
                                           "Content-Type: application/json; charset=gbk", "Upgrade: h2c",
                                           "Connection: Upgrade"])))
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(body)))
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p) + b"0\r\n\r\n"
    elif framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "wrong":
        lines.append(f"Content-Length: {draw(st.sampled_from(['-1', 'abc', '1, 2', str(len(body) + 1)]))}")
        payload = body
    else:
        payload = b""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + payload


pipelines = st.lists(st.one_of(request(), request(), junk), min_size=1, max_size=12)


# ---- at the protocol: fast ------------------------------------------------------------------------------------

class _Handler:
    def __init__(self) -> None:
        self.taken: list[defer.Deferred[Response]] = []
        self.methods: list[str] = []

    def __call__(self, req: Request) -> defer.Deferred[Response]:
        d: defer.Deferred[Response] = defer.Deferred()
        self.taken.append(d)
        self.methods.append(req.method)
        return d

    def answer(self, n: int) -> None:
        """The n-th request's answer; a HEAD's is empty, since none of its body is sent (so the checker's
        response parser, which cannot know a request was HEAD, reads the stream right)."""
        self.taken[n].callback(Response(200, self.expected(n)))

    def expected(self, n: int) -> bytes:
        return b"" if self.methods[n] == "HEAD" else b'{"seq": %d}' % n


class _Answers:
    def __init__(self) -> None:
        self.got: list[tuple[int, bytes]] = []
        self._body = b""
        self._parser = httptools.HttpResponseParser(self)

    def on_body(self, b: bytes) -> None:
        self._body += b

    def on_message_complete(self) -> None:
        self.got.append((self._parser.get_status_code(), self._body))
        self._body = b""


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines, st.lists(st.integers(1, 200), min_size=1, max_size=20), st.integers(1, 4), st.booleans())
def test_protocol_fuzz(items: list[bytes], cuts: list[int], limit: int, half_close: bool) -> None:
    from twisted.internet.testing import StringTransport
    data = b"".join(items)
    handler, clock, transport = _Handler(), task.Clock(), StringTransport()
    proto = HTTPServerProtocol(handler, max_body=4096, limits=Limits(max_pipelined=limit, max_url=200,
                               max_header_bytes=300, max_headers=6, header_timeout=10, body_timeout=10,
                               idle_timeout=30), clock=clock)
    proto.makeConnection(transport)
    k = i = 0
    answered = 0
    while k < len(data) and not transport.disconnecting:
        step = cuts[i % len(cuts)]
        proto.dataReceived(data[k:k + step])
        k += step
        i += 1
        assert proto.buffered <= limit  # bounded, however it is sent
        if i % 3 == 0 and answered < len(handler.taken):  # the handler answers as it goes
            handler.answer(answered)
            answered += 1
    if half_close:
        proto.readConnectionLost()
    for _ in range(200):  # answer everything it handed over, one at a time
        if answered < len(handler.taken):
            handler.answer(answered)
            answered += 1
        else:
            break
    clock.advance(100)  # deadlines run out
    answers = _Answers()
    answers._parser.feed_data(transport.value().replace(b"HTTP/1.1 100 Continue\r\n\r\n", b""))
    ok = [b for s, b in answers.got if s == 200]
    assert ok == [handler.expected(n) for n in range(len(handler.taken))]  # every request taken, in order
    rest = [s for s, _ in answers.got if s != 200]
    assert len(rest) <= 1 and set(rest) <= REFUSALS  # at most one refusal, last
    if rest:
        assert answers.got[-1][0] in REFUSALS
    assert transport.disconnecting  # every connection ends: by the client's close, a refusal or a deadline


# ---- end to end: a real daemon, short -------------------------------------------------------------------------

def _methods(sent: bytes) -> list[bytes]:
    """The methods of the requests in `sent` as llhttp, fep's own parser, splits them, up to where it gives up."""
    methods: list[bytes] = []

    class Requests:
        def on_headers_complete(self) -> None:
            methods.append(parser.get_method())

    parser = httptools.HttpRequestParser(Requests())
    try:
        parser.feed_data(sent)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    return methods


_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)\r\n")


def _heads_without_bodies(data: bytes, methods: list[bytes]) -> bytes:
    """The answers with each HEAD's saying Content-Length: 0. A HEAD's answer has the length of the body it would
    have and no body (RFC 9110, 9.3.2); the checker's parser cannot know which answer is a HEAD's. The n-th answer
    is the n-th request's; one to a HEAD that another answer follows at once, or that ends the stream, has no body."""
    out, at, n = [], 0, 0
    while (end := data.find(b"\r\n\r\n", at)) >= 0:
        head, start = data[at:end + 4], end + 4
        length = int(m.group(1)) if (m := _LENGTH.search(head)) else 0
        if n < len(methods) and methods[n] == b"HEAD" and (start == len(data) or data.startswith(b"HTTP/1.", start)):
            head, length = _LENGTH.sub(b"\r\nContent-Length: 0\r\n", head), 0
        out.append(head + data[start:start + length])
        at, n = start + length, n + 1
    return b"".join(out) + data[at:]


def _journal_rows(world: World) -> int:
    return len(world.journal())


@settings(max_examples=E2E_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(items=st.lists(request(), min_size=1, max_size=6))
def test_daemon_fuzz(running: World, items: list[bytes]) -> None:
    before = _journal_rows(running)
    with socket.create_connection(("127.0.0.1", running.his_port)) as s:
        s.settimeout(30)
        s.sendall(b"".join(items))
        s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    answers = _Answers()
    try:
        answers._parser.feed_data(_heads_without_bodies(data.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b""),
                                                        _methods(b"".join(items))))
    except httptools.HttpParserError:
        raise AssertionError(f"fep wrote something that is not HTTP: {data[:300]!r}")
    assert len(answers.got) <= len(items)
    assert all(s == 200 or s in REFUSALS or s in (405,) for s, _ in answers.got), answers.got
    taken = 0
    for status, body in answers.got:
        if status == 200 and body.startswith(b"{"):
            env = json.loads(body)
            if env.get("fep_state") not in (None, "REFUSED"):
                taken += 1
    assert _journal_rows(running) - before <= taken  # nothing journalled for what was refused
    assert running.fep_alive()
