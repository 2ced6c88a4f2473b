"""No HIS can hurt fep (issue 12): every limit of the HIS side, measured. Protocol-level tests drive
HTTPServerProtocol over a StringTransport with a fake clock; the end-to-end ones run a real daemon (World)."""

from __future__ import annotations

import resource
import socket
import time
from typing import Any

import pytest
from twisted.internet import address, task
from twisted.internet.testing import StringTransport

from fep import envelope
from fep.his import BUSY, HisFactory, RateLimitedLog
from fep.http11 import HTTPServerProtocol, Limits, Request, Response
from fep.sim.world import ZHANG, World, wait_for
from tests import http_doubles
from tests.http_doubles import Responses

CALL = "/fsi/api/rsfComIfsService/callService"


class Later(http_doubles.Later):
    """The shared handler answering only when told, each answer naming its place: {"n": i}."""

    def answer(self, i: int, text: bytes | None = None) -> None:
        super().answer(i, text or b'{"n": %d}' % i)


class Transport(StringTransport):
    """StringTransport that records pausing, as a TCP transport stops reading."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False


def server(limits: Limits | None = None, max_body: int = 1 << 20) -> tuple[HTTPServerProtocol, Transport, Later, task.Clock]:
    handler, clock, transport = Later(), task.Clock(), Transport()
    proto = HTTPServerProtocol(handler, max_body=max_body, limits=limits or Limits(), clock=clock)
    proto.makeConnection(transport)
    return proto, transport, handler, clock


def post(n: int, extra: str = "") -> bytes:
    body = b'{"n": %d}' % n
    return f"POST {CALL} HTTP/1.1\r\nHost: fep\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


# ---- pipelining: bounded per connection, dropped when the client goes -------------------------------------------

def test_pipelined_requests_are_bounded_per_connection_and_reading_resumes_as_they_are_answered() -> None:
    proto, transport, handler, _ = server(Limits(max_pipelined=4))
    proto.dataReceived(b"".join(post(i) for i in range(1000)))  # 30 s of pipelining, in one read
    assert proto.buffered == 4 and transport.paused  # four parsed, the rest not even parsed
    assert len(handler.taken) == 1  # one at a time to the handler
    for i in range(1000):
        assert proto.buffered <= 4
        handler.answer(i)
    got = Responses().feed(transport.value())
    assert [b for _, b in got] == [b'{"n": %d}' % i for i in range(1000)]  # every one, in order
    assert not transport.paused and proto.buffered == 0


def test_pipelining_in_small_reads_is_bounded_too() -> None:
    proto, transport, handler, _ = server(Limits(max_pipelined=3))
    data = b"".join(post(i) for i in range(50))
    for k in range(0, len(data), 7):
        proto.dataReceived(data[k:k + 7])
        assert proto.buffered <= 3
    assert transport.paused
    for i in range(50):
        handler.answer(i)
    assert len(Responses().feed(transport.value())) == 50


def test_pipelined_bodies_are_bounded_in_bytes() -> None:
    proto, transport, handler, _ = server(Limits(max_pipelined=100, max_pipelined_bytes=10_000), max_body=8000)
    body = b"x" * 6000
    one = f"POST {CALL} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    proto.dataReceived(one * 20)
    assert proto.buffered <= 3 and transport.paused


def test_requests_not_yet_handed_over_are_dropped_when_the_client_disconnects_and_the_one_handed_over_completes() -> None:
    proto, transport, handler, _ = server(Limits(max_pipelined=8))
    proto.dataReceived(b"".join(post(i) for i in range(8)))
    assert len(handler.taken) == 1
    proto.connectionLost(Exception("gone"))
    assert proto.dropped == 7 and proto.buffered == 1
    handler.answer(0)  # the one handed over (perhaps journalled) completes as usual
    assert len(handler.taken) == 1  # and nothing after it is started
    assert proto.buffered == 0



def test_while_the_client_reads_none_of_its_answers_no_further_request_is_handled() -> None:
    """The transport pauses its producer when it holds more unread answers than it may (max_pipelined_bytes)."""
    proto, transport, handler, _ = server(Limits(max_pipelined=8))
    proto.dataReceived(b"".join(post(i) for i in range(3)))
    proto.pauseProducing()  # as the transport does when the answer it is given leaves it holding too much
    handler.answer(0)
    assert len(handler.taken) == 1  # the second waits: its answer would only pile up
    proto.resumeProducing()  # the client read: the transport's buffer drained
    assert len(handler.taken) == 2
    handler.answer(1)
    handler.answer(2)
    assert [b for _, b in Responses().feed(transport.value())] == [b'{"n": %d}' % i for i in range(3)]

# ---- sizes: 414 and 431 ----------------------------------------------------------------------------------------

def test_a_long_url_gets_414_and_the_connection_closes() -> None:
    proto, transport, handler, _ = server(Limits(max_url=100))
    proto.dataReceived(f"GET /fep/trades/{'9' * 200} HTTP/1.1\r\nHost: fep\r\n\r\n".encode())
    got = Responses().feed(transport.value())
    assert [s for s, _ in got] == [414] and transport.disconnecting and handler.taken == []


def test_too_many_header_fields_get_431() -> None:
    proto, transport, handler, _ = server(Limits(max_headers=10))
    heads = "".join(f"X-H{i}: v\r\n" for i in range(11))
    proto.dataReceived(f"POST {CALL} HTTP/1.1\r\n{heads}Content-Length: 2\r\n\r\n{{}}".encode())
    got = Responses().feed(transport.value())
    assert [s for s, _ in got] == [431] and transport.disconnecting and handler.taken == []
    assert "header fields" in got[0][1].decode()


def test_header_fields_over_the_byte_limit_get_431() -> None:
    proto, transport, handler, _ = server(Limits(max_header_bytes=1000))
    proto.dataReceived(f"POST {CALL} HTTP/1.1\r\nCookie: {'c' * 2000}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    assert [s for s, _ in Responses().feed(transport.value())] == [431] and handler.taken == []


def test_a_header_line_that_never_ends_is_cut_off_with_431() -> None:
    proto, transport, handler, _ = server(Limits(max_header_bytes=1000, max_url=100))
    proto.dataReceived(f"POST {CALL} HTTP/1.1\r\nX-Endless: ".encode())
    for _ in range(100):
        proto.dataReceived(b"a" * 1000)  # httptools gathers the line: fep must not
        if transport.value():
            break
    assert [s for s, _ in Responses().feed(transport.value())] == [431] and transport.disconnecting


def test_a_refusal_for_size_comes_after_the_answers_owed_before_it() -> None:
    proto, transport, handler, _ = server(Limits(max_url=100))
    proto.dataReceived(post(0) + f"GET /{'x' * 200} HTTP/1.1\r\n\r\n".encode())
    assert transport.value() == b""
    handler.answer(0)
    assert [s for s, _ in Responses().feed(transport.value())] == [200, 414]


# ---- deadlines -------------------------------------------------------------------------------------------------

def test_headers_not_complete_within_the_deadline_get_408_and_a_close() -> None:
    proto, transport, handler, clock = server(Limits(header_timeout=10))
    proto.dataReceived(f"POST {CALL} HTTP/1.1\r\nHost: f".encode())  # slowloris
    clock.advance(9)
    proto.dataReceived(b"e")
    assert transport.value() == b""
    clock.advance(1.5)
    assert [s for s, _ in Responses().feed(transport.value())] == [408] and transport.disconnecting


def test_a_body_not_complete_within_the_deadline_gets_408() -> None:
    proto, transport, handler, clock = server(Limits(header_timeout=10, body_timeout=60))
    proto.dataReceived(f"POST {CALL} HTTP/1.1\r\nContent-Length: 100\r\n\r\n{{".encode())
    clock.advance(59)
    assert transport.value() == b""
    clock.advance(2)
    assert [s for s, _ in Responses().feed(transport.value())] == [408] and handler.taken == []


def test_an_idle_kept_connection_is_closed_but_not_while_its_answer_is_being_made() -> None:
    proto, transport, handler, clock = server(Limits(header_timeout=10, body_timeout=60, idle_timeout=120))
    proto.dataReceived(post(0))
    clock.advance(500)  # the handler takes its time (the bureau): no deadline runs on the client meanwhile
    assert not transport.disconnecting
    handler.answer(0)
    clock.advance(119)
    assert not transport.disconnecting
    proto.dataReceived(post(1))  # kept and used again
    handler.answer(1)
    clock.advance(121)
    assert transport.disconnecting
    assert len(Responses().feed(transport.value())) == 2


def test_a_fresh_connection_that_sends_nothing_is_closed_after_the_idle_timeout() -> None:
    proto, transport, handler, clock = server(Limits(idle_timeout=120))
    clock.advance(121)
    assert transport.disconnecting and transport.value() == b""


# ---- half-close, Upgrade, CONNECT ------------------------------------------------------------------------------

def test_a_request_followed_by_a_half_close_is_answered_then_the_connection_closes() -> None:
    proto, transport, handler, _ = server()
    proto.dataReceived(post(0) + post(1))
    proto.readConnectionLost()
    assert not transport.disconnecting
    handler.answer(0)
    handler.answer(1)
    assert [s for s, _ in Responses().feed(transport.value())] == [200, 200] and transport.disconnecting


@pytest.mark.parametrize("head,status,word", [
    ("GET /ws HTTP/1.1\r\nHost: fep\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501, "Upgrade"),
    ("CONNECT bureau:443 HTTP/1.1\r\nHost: bureau:443\r\n\r\n", 501, "CONNECT"),
])
def test_upgrade_and_connect_are_answered_and_closed(head: str, status: int, word: str) -> None:
    proto, transport, handler, _ = server()
    proto.dataReceived(head.encode() + b"\x00\x01 not http")
    got = Responses().feed(transport.value())
    assert [s for s, _ in got] == [status] and word in got[0][1].decode()
    assert transport.disconnecting and handler.taken == []


# ---- caps and refusal lines ------------------------------------------------------------------------------------

class _Service:
    async def handle(self, req: Request) -> Response:
        return Response(200, b"{}")


def _connect(factory: HisFactory, host: str, port: int) -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(address.IPv4Address("TCP", host, port))
    transport = StringTransport()
    if proto is not None:
        proto.makeConnection(transport)
    return proto, transport


def test_connections_over_the_global_and_per_peer_caps_get_a_503_and_are_closed_before_a_byte_is_read() -> None:
    import ipaddress
    factory = HisFactory(_Service(), 1000, [ipaddress.ip_network("127.0.0.0/8")], max_connections=5, max_per_peer=3,
                         clock=task.Clock())
    kept = [_connect(factory, "127.0.0.2", 1000 + i) for i in range(3)]
    proto, transport = _connect(factory, "127.0.0.2", 2000)  # a fourth from one peer
    assert transport.value() == BUSY and transport.disconnecting
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    kept += [_connect(factory, "127.0.0.3", 1000 + i) for i in range(2)]
    assert factory.open == 5
    proto, transport = _connect(factory, "127.0.0.4", 1000)  # a sixth in all
    assert transport.value() == BUSY and transport.disconnecting
    kept[0][0].connectionLost(Exception("closed"))  # a place comes free
    proto, transport = _connect(factory, "127.0.0.4", 1001)
    assert transport.value() == b"" and not transport.disconnecting and factory.open == 5
    assert factory.per_peer == {"127.0.0.2": 2, "127.0.0.3": 2, "127.0.0.4": 1}


def test_refusal_lines_are_one_per_source_per_interval_with_a_count(caplog: Any) -> None:
    from twisted.logger import globalLogPublisher
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent
        if event.get("log_namespace") == "fep.his":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        clock = task.Clock()
        rl = RateLimitedLog(interval=60, clock=clock)
        for _ in range(1000):
            rl.warn("network", "10.0.0.9", "refused HIS connection from {source}")
        rl.warn("network", "10.0.0.8", "refused HIS connection from {source}")
        clock.advance(61)
        rl.warn("network", "10.0.0.9", "refused HIS connection from {source}")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert lines == ["refused HIS connection from 10.0.0.9", "refused HIS connection from 10.0.0.8",
                     "refused HIS connection from 10.0.0.9 (999 more since the last line)"]


def test_the_table_of_refused_sources_stays_bounded() -> None:
    rl = RateLimitedLog(interval=60, clock=task.Clock(), max_sources=100)
    for i in range(10_000):
        rl.warn("network", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "x {source}")
    assert len(rl._seen) <= 100


# ---- end to end: a real daemon ---------------------------------------------------------------------------------

def _identify_request(i: int) -> bytes:
    body = envelope.dumps({"infno": "1101", "opter_type": "1", "opter": "his", "opter_name": "HIS",
                           "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}})
    return (f"POST {CALL} HTTP/1.1\r\nHost: fep\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_2000_simultaneous_his_connections_are_all_answered(world: World) -> None:
    """The burst that a backlog of 50 dropped: 2,000 connections opened at once, each sending a 1101 only
    once all are open, from eight loopback addresses (the per-peer cap stays at its default)."""
    import selectors
    n = 2000
    _raise_nofile(3 * n + 1000)  # the test's sockets, and fep's (it inherits the limit)
    world.start()
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 8}", 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", world.his_port))
        socks.append(s)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    unsent = set(socks)
    deadline = time.monotonic() + 60
    while unsent and time.monotonic() < deadline:  # every connect done, then every request written
        for key, _ in sel.select(1):
            s = key.fileobj
            sel.unregister(s)
            unsent.discard(s)
    assert not unsent, f"{len(unsent)} connections never completed"
    got: dict[Any, bytes] = {}
    for i, s in enumerate(socks):
        s.sendall(_identify_request(i))
        sel.register(s, selectors.EVENT_READ)
        got[s] = b""
    open_ = set(socks)
    deadline = time.monotonic() + 120
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except ConnectionError:
                chunk = b""
            if chunk:
                got[s] += chunk
            else:
                sel.unregister(s)
                open_.discard(s)
    for s in socks:
        s.close()
    statuses = [Responses().feed(data) for data in got.values()]
    answered = [m for m in statuses if len(m) == 1 and m[0][0] == 200]
    assert len(answered) == n, f"{n - len(answered)} of {n} not answered; {len(open_)} still open"
    assert all(envelope.loads(m[0][1]).get("fep_msgid") for m in answered)
    assert world.fep_alive()


def _admin_status(world: World) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(world.dir / "run" / "admin.sock"))
        s.sendall(b"GET /status HTTP/1.1\r\nHost: fep\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return Responses().feed(data)[0][0]


def test_with_the_his_side_at_its_cap_the_admin_socket_and_metrics_still_answer(world: World) -> None:
    import urllib.request
    world.configure({"his": {"max_connections": 40, "max_connections_per_peer": 40}})
    world.start()
    held = []
    for _ in range(40):  # each answered once, so fep has taken all of them; then kept open, idle
        s = socket.create_connection(("127.0.0.1", world.his_port))
        s.sendall(b"GET /fep/trades/NONE HTTP/1.1\r\nHost: fep\r\n\r\n")
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        held.append(s)
    assert _over_cap(world)
    assert _admin_status(world) == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
    for s in held:
        s.close()
    wait_for(lambda: _identified(world), what="a place to come free once the held connections close")


def _identified(world: World) -> bool:
    try:
        return world.his_tcp.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}})[
            "infcode"] == 0
    except Exception:  # the 503 of a place not yet free: not JSON
        return False


def _over_cap(world: World) -> bool:
    with socket.create_connection(("127.0.0.1", world.his_port)) as s:
        s.settimeout(5)
        try:
            return s.recv(100).startswith(b"HTTP/1.1 503")
        except (socket.timeout, ConnectionError):
            return False


def test_end_to_end_half_close_upgrade_and_a_long_url(running: World) -> None:
    port = running.his_port
    with socket.create_connection(("127.0.0.1", port)) as s:  # the request, then SHUT_WR: still answered
        s.sendall(_identify_request(0).replace(b"Connection: close\r\n", b""))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    got = Responses().feed(data)
    assert [st for st, _ in got] == [200] and envelope.loads(got[0][1])["infcode"] == 0
    for head, status in ((b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
                         (b"CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n", 501),
                         (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
                         (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431)):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head)
            s.settimeout(10)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert [st for st, _ in Responses().feed(data)] == [status], head[:40]
    assert "Traceback" not in running.log("run") and "Unhandled" not in running.log("run")
    assert running.fep_alive()


def test_an_his_that_pipelines_without_reading_gets_no_more_answers_than_fep_may_hold_then_all_in_order(
        world: World) -> None:
    """The clerk's batch job pipelines 40 downloads of a 1 MB reconciliation file on one connection and reads
    none of the answers (its reader thread hung). Past what the kernel's buffers take, fep must stop handling
    the job's requests once the unread answers fill what it may hold for a connection (his.max_body's bytes,
    here 2 MiB), not go on answering 40 MB into its own memory; when the job reads, every answer comes whole,
    in order."""
    from tests.test_breaker24 import body_msgid, read_answers
    from tests.test_breaker27 import MAX_BODY, file_downloads, hung_reader, pipelined, stalled

    world.configure(fep={"his": {"max_body": MAX_BODY}})
    world.start()
    content, wanted = file_downloads(world, 3000, 40)
    with hung_reader(world) as s:
        s.sendall(pipelined(wanted))
        handled = stalled(world)
        assert handled <= 20, f"fep handled {handled} of 40 downloads whose answers nobody read"
        answers = read_answers(s, len(wanted))
    assert [body_msgid(a) for a in answers] == [world.journal("his_msgid=?", (m,))[0]["msgid"] for m, _ in wanted]
    assert all(a[2] == content for a in answers)
