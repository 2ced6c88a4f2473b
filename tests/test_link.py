"""Both links at the byte level: what the HIS hears on one connection, and what the bureau link calls
sent, not sent or unknown."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest
from OpenSSL import SSL
from twisted.internet import defer, endpoints, task
from twisted.internet import ssl as twisted_ssl
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from fep import config, envelope, tls
from fep.bureau import BureauLink, Delivery, NotSent, Unknown, _Pool
from fep.config import Endpoint, TLSFiles
from fep.http11 import HTTPClientProtocol, HTTPServerProtocol, Response, TransportError
from fep.transports import AtOnce
from fep.sim.world import LI, ZHANG, Visit, World, free_port, his_msgid, wait_for
from tests.http_doubles import Later, Responses, server


# ---- the HIS side: HTTP/1.1 pipelining ------------------------------------------------------------------

def _post(body: bytes, path: str = "/fsi/api/rsfComIfsService/callService") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: fep\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body




def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _registration(msgid: str) -> bytes:
    return envelope.dumps({"infno": "2201", "msgid": msgid, "opter_type": "1", "opter": "his", "opter_name": "HIS",
                           "input": {"data": {"psn_no": ZHANG["psn_no"], "insutype": ZHANG["insutype"],
                                              "begntime": "2026-11-23 09:00:00", "mdtrt_cert_type": "02",
                                              "mdtrt_cert_no": ZHANG["certno"], "ipt_otp_no": f"B{time.time_ns() % 10**12}",
                                              "atddr_no": "D001", "dr_name": "医生", "dept_code": "01",
                                              "dept_name": "内科", "caty": "A03"}}})


def _pipelined(world: World, data: bytes) -> list[tuple[int, dict]]:
    with socket.create_connection(("127.0.0.1", world.his_port), timeout=30) as s:
        s.sendall(data)  # one write: both requests are in the server's hands before it answers either
        raw = _read_until_closed(s)
    return [(status, envelope.loads(body)) for status, body in Responses().feed(raw)]


def test_a_request_pipelined_before_garbage_is_answered_first_then_the_400(running: World) -> None:
    msgid = his_msgid(1)
    answers = _pipelined(running, _post(_registration(msgid)) + b"THIS IS NOT HTTP\r\n\r\n")
    assert [status for status, _ in answers] == [200, 400], answers
    registered, refused = answers[0][1], answers[1][1]
    assert registered["fep_msgid"] == msgid and registered["infcode"] == 0, registered
    assert registered["output"]["data"]["mdtrt_id"]
    assert refused["fep_state"] == "REFUSED" and "malformed HTTP request" in refused["err_msg"]
    assert running.trade(msgid)["state"] == "ANSWERED"  # what the HIS heard is what the journal holds


def test_a_request_pipelined_before_a_too_large_one_is_answered_first_then_the_413(world: World) -> None:
    world.configure(fep={"his": {"max_body": 4096}})
    world.start()
    msgid = his_msgid(2)
    answers = _pipelined(world, _post(_registration(msgid)) + _post(b"{" + b" " * 8192 + b"}"))
    assert [status for status, _ in answers] == [200, 413], answers
    assert answers[0][1]["fep_msgid"] == msgid and answers[0][1]["infcode"] == 0
    assert "over the limit" in answers[1][1]["err_msg"]
    assert world.trade(msgid)["state"] == "ANSWERED"


def test_protocol_answers_what_it_took_before_refusing_garbage() -> None:
    proto, transport, handler = server()
    proto.dataReceived(_post(b'{"n": 1}') + _post(b'{"n": 2}') + b"\x00GARBAGE\r\n\r\n")
    assert [r.body for r, _ in handler.taken] == [b'{"n": 1}']  # one at a time; nothing after garbage runs
    assert transport.value() == b"" and not transport.disconnecting  # the first answer is still owed
    handler.answer(0, b"one")
    assert [r.body for r, _ in handler.taken] == [b'{"n": 1}', b'{"n": 2}']
    assert transport.value().count(b"HTTP/1.1") == 1 and not transport.disconnecting
    handler.answer(1, b"two")
    got = Responses().feed(transport.value())
    assert [(s, b) for s, b in got[:2]] == [(200, b"one"), (200, b"two")]
    assert got[2][0] == 400 and len(got) == 3
    assert transport.disconnecting


def test_protocol_answers_what_it_took_before_refusing_a_body_too_large() -> None:
    proto, transport, handler = server(max_body=100)
    big = b"x" * 300
    proto.dataReceived(_post(b'{"n": 1}') + _post(big)[:-200])  # the refused body is still arriving
    assert len(handler.taken) == 1 and transport.value() == b""
    handler.answer(0, b"one")
    got = Responses().feed(transport.value())
    assert [s for s, _ in got] == [200, 413] and got[0][1] == b"one"
    assert not transport.disconnecting  # lingering: the client is still sending and must see the 413
    proto.dataReceived(big[-200:] + _post(b'{"n": 3}'))  # the rest of the refused body, and more
    assert transport.disconnecting and len(handler.taken) == 1  # nothing after a refusal is taken


def test_protocol_refuses_at_once_when_nothing_is_owed() -> None:
    proto, transport, handler = server()
    proto.dataReceived(b"\x00GARBAGE\r\n\r\n")
    assert [s for s, _ in Responses().feed(transport.value())] == [400] and transport.disconnecting
    proto, transport, handler = server(max_body=100)
    proto.dataReceived(_post(b"x" * 300)[:-100])
    assert [s for s, _ in Responses().feed(transport.value())] == [413] and not transport.disconnecting
    proto.dataReceived(b"x" * 100)
    assert transport.disconnecting and handler.taken == []


def test_protocol_answers_the_last_request_that_asked_to_close_and_takes_nothing_after_it() -> None:
    proto, transport, handler = server()
    closing = _post(b'{"n": 1}').replace(b"Host: fep\r\n", b"Host: fep\r\nConnection: close\r\n")
    proto.dataReceived(closing + _post(b'{"n": 2}'))
    handler.answer(0, b"one")
    assert [s for s, _ in Responses().feed(transport.value())] == [200] and transport.disconnecting
    assert len(handler.taken) == 1


# ---- the bureau side: the client protocol alone ---------------------------------------------------------------

def _client(handshake: bool = True) -> tuple[HTTPClientProtocol, StringTransport]:
    proto, transport = HTTPClientProtocol(), StringTransport()
    proto.makeConnection(transport)
    if handshake:
        proto.handshakeCompleted()
    return proto, transport


def _outcome(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def test_client_closed_fires_when_the_connection_is_lost() -> None:
    for handshake in (False, True):
        proto, _ = _client(handshake)
        proto.ready.addErrback(lambda f: None)
        assert not proto.closed.called
        proto.connectionLost(Failure(ConnectionError("gone")))
        assert proto.closed.called and not proto.idle


def test_client_a_connection_lost_after_the_request_was_written_is_sent() -> None:
    proto, transport = _client()
    d = proto.request("/", b"{}", {"Host": "bureau"})
    assert transport.value().startswith(b"POST / HTTP/1.1")
    proto.connectionLost(Failure(ConnectionError("reset")))
    err = _outcome(d)
    assert err.check(TransportError) and err.value.sent is True
    assert proto.closed.called


class _Wire:
    """A client and a server over real TLS in memory: bytes move only when the test moves them, and a
    closed connection is reported (connectionLost) only when the test says so."""

    def __init__(self, pki: Any, server_app: Any, clock: task.Clock | None = None,
                 server: twisted_ssl.CertificateOptions | None = None) -> None:
        self.clock = clock or task.Clock()  # the bureau's side: Twisted's TLS transport flushes writes on the next tick
        creator = tls.client_options(TLSFiles(pki / "ca.pem", pki / "hospital.pem", pki / "hospital.key"),
                                     "bureau.fep.test")
        server = server or tls.server_options(TLSFiles(pki / "ca.pem", pki / "bureau.pem", pki / "bureau.key"))
        self.client = HTTPClientProtocol()
        # as the link's: each write goes into the TLS layer at once
        self.client_tls = tls.WholeWrites(creator, True, Factory.forProtocol(lambda: self.client)).buildProtocol(None)
        self.server_tls = TLSMemoryBIOFactory(server, False, Factory.forProtocol(lambda: server_app),
                                              self.clock).buildProtocol(None)
        self.ct, self.st = StringTransport(), StringTransport()
        self.client_tls.makeConnection(self.ct)
        self.server_tls.makeConnection(self.st)
        self.pump()

    def to_client(self) -> bool:
        self.clock.advance(0)
        data, _ = self.st.value(), self.st.clear()
        if data:
            self.client_tls.dataReceived(data)
        return bool(data)

    def toserver(self) -> bool:
        self.clock.advance(0)
        data, _ = self.ct.value(), self.ct.clear()
        if data:
            self.server_tls.dataReceived(data)
        return bool(data)

    def pump(self) -> None:
        while self.toserver() | self.to_client():
            pass


def _bureau_app() -> HTTPServerProtocol:
    return HTTPServerProtocol(lambda req: Response(200, b'{"infcode": 0}'), max_body=1000)


def test_client_an_idle_connection_the_bureau_closed_is_not_used_and_a_request_on_it_is_not_sent(pki_dir) -> None:
    """The bureau closes an idle connection (close_notify, then FIN). Between fep reading the close_notify
    and its connectionLost there is a reactor turn in which the connection still looked idle; a request
    written then is dropped by the TLS layer, and was reported as possibly sent (Unknown)."""
    app = _bureau_app()
    wire = _Wire(pki_dir, app)
    assert wire.client.ready.called and wire.client.idle
    first = wire.client.request("/", b"{}", {"Host": "bureau"})
    wire.pump()
    assert _outcome(first).status == 200 and wire.client.idle
    app.close()  # the bureau's idle timeout
    wire.to_client()  # its close_notify is read; the TCP close is not seen yet
    assert not wire.client.idle, "the pool would hand this connection to a trade"
    second = wire.client.request("/", b"{}", {"Host": "bureau"})
    wire.client_tls.connectionLost(Failure(ConnectionDone()))
    err = _outcome(second)
    assert err.check(TransportError) and err.value.sent is False, err


def test_pool_skips_an_idle_connection_the_bureau_closed_and_connects_afresh(pki_dir) -> None:
    app = _bureau_app()
    stale = _Wire(pki_dir, app)
    ep = Endpoint("sim", "https://127.0.0.1:1/", "127.0.0.1", 1, "/", "bureau.fep.test")
    pool = _Pool(task.Clock(), ep, None, size=1, connect_timeout=1, source=None)  # type: ignore[arg-type]
    fresh = _Wire(pki_dir, _bureau_app())

    async def connect() -> HTTPClientProtocol:
        return fresh.client

    pool._connect = connect  # type: ignore[method-assign]
    pool.count, pool.idle = 1, [stale.client]
    app.close()
    stale.to_client()
    assert _outcome(defer.ensureDeferred(pool.acquire())) is fresh.client and pool.count == 1


def test_the_twisted_and_pyopenssl_internals_the_links_tls_reads_are_still_there(pki_dir) -> None:
    """tls._LinkTLS and tls.finished lean on Twisted's TLS transport and pyOpenSSL's memory BIOs
    below their public API: an upgrade that renames them must fail here, not quietly slow the link or
    make a write that never leaves look sent."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    for name in ("_flushReceiveBIO", "_flushSendBIO", "_write", "_bufferedWrite", "_shutdownTLS",
                 "_tlsShutdownFinished", "_lostTLSConnection", "_aborted"):
        assert hasattr(TLSMemoryBIOProtocol, name), name
    wire = _Wire(pki_dir, _bureau_app())
    conn = wire.client_tls._tlsConnection
    assert isinstance(conn, SSL.Connection)
    assert tls._buffered(conn._into_ssl) == 0 and tls._buffered(conn._from_ssl) >= 0
    assert not tls.finished(wire.client_tls)


@pytest.mark.parametrize("cut", [1, 7, 1000, 1 << 20])
def test_client_an_answer_of_many_records_and_the_close_behind_it_are_read_wherever_the_network_cuts_them(
        pki_dir, cut: int) -> None:
    """The link's TLS asks OpenSSL only for what a chunk holds (tls._LinkTLS): every record of an
    answer is read whether a chunk ends inside one, between two or after all, and so is the bureau's
    close_notify right behind it."""
    body = bytes(range(256)) * 160  # 40 KB: three records
    app = HTTPServerProtocol(lambda req: Response(200, body), max_body=1000)
    wire = _Wire(pki_dir, app)
    answer = wire.client.request("/", b"{}", {"Host": "bureau"})
    wire.toserver()
    app.close()
    wire.clock.advance(0)
    data, _ = wire.st.value(), wire.st.clear()
    for i in range(0, len(data), cut):
        wire.client_tls.dataReceived(data[i:i + cut])
    assert _outcome(answer).body == body
    assert not wire.client.idle and tls.finished(wire.client_tls), "the close_notify was not read"


def test_client_a_request_of_many_records_goes_to_the_socket_in_one_write_and_arrives_whole(pki_dir) -> None:
    body = bytes(range(256)) * 4096  # 1 MB: 64 records
    got: list[bytes] = []
    app = HTTPServerProtocol(lambda req: (got.append(req.body), Response(200, b"{}"))[1], max_body=2 << 20)
    wire = _Wire(pki_dir, app)
    writes = []
    write = wire.client_tls.transport.write
    wire.client_tls.transport.write = lambda data: (writes.append(len(data)), write(data))[1]
    answer = wire.client.request("/", body, {"Host": "bureau"})
    assert len(writes) == 1 and writes[0] > len(body)  # the records, and the HTTP head's
    wire.pump()
    assert _outcome(answer).status == 200 and got == [body]


def test_client_a_renegotiation_the_bureau_asks_for_is_done_and_its_answers_still_read(pki_dir) -> None:
    """TLS 1.2 (the lowest the link allows): the bureau renegotiates between two exchanges on one connection."""
    own = tls._private(pki_dir / "bureau.pem", pki_dir / "bureau.key")
    tls12 = twisted_ssl.CertificateOptions(privateKey=own.privateKey.original, certificate=own.original,
                                           raiseMinimumTo=twisted_ssl.TLSVersion.TLSv1_2,
                                           lowerMaximumSecurityTo=twisted_ssl.TLSVersion.TLSv1_2)
    app = _bureau_app()
    wire = _Wire(pki_dir, app, server=tls12)
    first = wire.client.request("/", b"{}", {"Host": "bureau"})
    wire.pump()
    assert _outcome(first).status == 200
    bureau = wire.server_tls._tlsConnection
    assert bureau.renegotiate()
    with contextlib.suppress(SSL.WantReadError):
        bureau.do_handshake()
    wire.server_tls._flushSendBIO()  # its HelloRequest
    second = wire.client.request("/", b"{}", {"Host": "bureau"})
    wire.pump()
    assert _outcome(second).status == 200 and wire.client.idle
    assert wire.client_tls.getHandle().total_renegotiations() == 1


# ---- the bureau side: a connection that timed out ----------------------------------------------------------

def test_a_late_answer_s_connection_is_not_reused_so_its_abort_never_cuts_another_trade(world: World) -> None:
    """One connection to the bureau. A 2207 times out (2 s) and its answer comes late (2.5 s); the late-grace
    abort of that connection was armed for 4 s after the timeout. A second 2207, answered by the bureau in
    time (1.6 s, under its 2 s), is in flight at that moment: it must be heard, not reversed."""
    world.configure(trades={"2207": {"timeout": 2}}, fep={"bureau": {"late_grace": 4, "concurrency": 1}})
    world.start()
    first, second = Visit(world.his, ZHANG), Visit(world.his, LI)
    first.up_to_settlement()
    world.fault(mode="late", infno="2207", seconds=2.5, times=1)
    lost = first.settle()
    timed_out = time.monotonic()  # within milliseconds of the timeout that armed the late-grace abort
    assert lost["fep_state"] == "RESOLVING", lost
    wait_for(lambda: world.trade(lost["fep_msgid"])["late_answer"], what="the late answer")
    wait_for(lambda: world.trade(lost["fep_msgid"])["state"] == "REVERSED", what="the reversal")
    second.up_to_settlement()
    world.fault(mode="late", infno="2207", seconds=1.6, times=1)
    time.sleep(max(0.0, timed_out + 4 - 0.8 - time.monotonic()))  # in flight from 0.8 s before to 0.8 s after
    settled = second.settle()
    assert settled["infcode"] == 0 and settled["fep_state"] == "ANSWERED", settled
    assert world.trade(settled["fep_msgid"])["state"] == "ANSWERED"
    assert not world.journal("infno='2601' AND related=?", (settled["fep_msgid"],))
    world.assert_ledgers_agree()


def test_link_a_late_answer_closes_its_connection_and_disarms_the_abort(world: World, pki_dir) -> None:
    clock, bureau = task.Clock(), Later()
    wire = _Wire(pki_dir, HTTPServerProtocol(bureau, max_body=10000), clock)
    world.configure(fep={"bureau": {"late_grace": 4, "concurrency": 1}})
    link = BureauLink(clock, config.load(world.fep_config).bureau)
    pool = link.pools[0]

    async def connect() -> HTTPClientProtocol:
        return wire.client

    pool._connect = connect  # type: ignore[method-assign]
    late: list[bytes] = []
    sent = defer.ensureDeferred(link.send("2207", b"{}", 1, on_late=late.append))
    wire.pump()
    assert len(bureau.taken) == 1
    clock.advance(1)
    assert _outcome(sent).check(Unknown)
    bureau.answer(0, b'{"infcode": 0}')
    wire.pump()
    assert late == [b'{"infcode": 0}']
    assert pool.idle == [] and pool.count == 0, "the connection went back to the pool"
    assert not [c for c in clock.getDelayedCalls() if c.active()], "the late-grace abort is still armed"


# ---- the bureau link alone, on a real reactor (in a thread) against the real simulator -----------------------

@pytest.fixture(scope="module")
def reactor() -> Iterator[Any]:
    from twisted.internet import reactor as r

    thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    yield r
    r.callFromThread(r.stop)
    thread.join(10)


def on_reactor(reactor: Any, fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    """Run fn() on the reactor thread and return what it returns (or raise what it raises)."""
    done, box = threading.Event(), {}

    def start() -> None:
        try:
            d = defer.ensureDeferred(fn())  # type: ignore[arg-type]
        except Exception:
            d = defer.fail()
        d.addBoth(lambda r: (box.update(r=r), done.set()))

    reactor.callFromThread(start)
    assert done.wait(timeout), "the reactor did not finish in time"
    if isinstance(box["r"], Failure):
        box["r"].raiseException()
    return box["r"]


def _link(world: World, reactor: Any, endpoints: list[tuple[str, int]], **bureau: Any) -> BureauLink:
    path = "/fsi/api/rsfComIfsService/callService"
    world.configure(fep={"bureau": {"endpoints": [{"name": n, "url": f"https://127.0.0.1:{port}{path}",
                                                   "server_name": "bureau.fep.test"} for n, port in endpoints],
                                    **bureau}})
    cfg = config.load(world.fep_config)
    return on_reactor(reactor, lambda: defer.succeed(BureauLink(reactor, cfg.bureau)))


def _query(n: int) -> tuple[str, bytes]:
    msgid = his_msgid(n)
    return msgid, envelope.dumps({"infno": "1101", "msgid": msgid,
                                  "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}})


def _send(reactor: Any, link: BureauLink, body: bytes, **kw: Any) -> Delivery:
    return on_reactor(reactor, lambda: link.send("1101", body, 5, **kw))


def test_a_pinned_send_goes_to_its_endpoint_only_and_never_fails_over(world: World, reactor: Any) -> None:
    world.start_sim()
    link = _link(world, reactor, [("sim", world.sim_port), ("dead", free_port())])  # nothing listens on dead
    try:
        # Unpinned, both are tried while both are down (before any connection is open: a connection the
        # bureau resets just as a request is written on it is rightly Unknown), and the failure names both.
        world.fault(mode="refuse")
        with pytest.raises(NotSent, match="sim.*dead"):
            _send(reactor, link, _query(3)[1])
        world.clear_faults()
        msgid, body = _query(1)
        with pytest.raises(NotSent, match="dead"):
            _send(reactor, link, body, endpoint="dead")
        assert msgid not in {m for m, _ in world.sim_answers()}  # the sim was up, and never asked
        assert _send(reactor, link, body, endpoint="sim").endpoint == "sim"
        with pytest.raises(NotSent, match="not configured"):
            _send(reactor, link, _query(2)[1], endpoint="elsewhere")
        assert _send(reactor, link, _query(4)[1]).endpoint == "sim"
    finally:
        on_reactor(reactor, lambda: defer.succeed(link.close()))


def test_an_unpinned_send_fails_over_for_what_was_never_sent(world: World, reactor: Any) -> None:
    world.start_sim()
    link = _link(world, reactor, [("dead", free_port()), ("sim", world.sim_port)])
    try:
        assert _send(reactor, link, _query(1)[1]).endpoint == "sim"
        sim = link.pools[1]
        kept = list(sim.idle)
        assert _send(reactor, link, _query(2)[1]).endpoint == "sim"
        assert sim.idle == kept and len(kept) == sim.count == 1  # a healthy connection is reused
    finally:
        on_reactor(reactor, lambda: defer.succeed(link.close()))


def test_unknown_names_the_endpoint_the_request_may_have_reached(world: World, reactor: Any) -> None:
    world.start_sim()
    link = _link(world, reactor, [("dead", free_port()), ("sim", world.sim_port)])
    try:
        world.fault(mode="drop_after", infno="1101", times=2)
        for n, pin in ((5, None), (6, "sim")):
            msgid, body = _query(n)
            with pytest.raises(Unknown) as lost:
                _send(reactor, link, body, endpoint=pin)
            assert lost.value.endpoint == "sim" and msgid in {m for m, _ in world.sim_answers()}
    finally:
        on_reactor(reactor, lambda: defer.succeed(link.close()))


def test_a_trade_is_not_written_on_a_pooled_connection_whose_close_is_waiting_unread(world: World,
                                                                                     reactor: Any) -> None:
    """The bureau closes its idle connections (here: it goes down) and its close_notify and FIN are already
    in fep's kernel, not yet read by the reactor, when a trade takes the connection from the pool. Written
    on it, the request could only be called Unknown; it is not written on it, so it is provably not sent."""
    world.start_sim()
    link = _link(world, reactor, [("sim", world.sim_port)])
    try:
        _send(reactor, link, _query(1)[1])
        [pooled] = link.pools[0].idle
        msgid, body = _query(2)

        async def close_then_send() -> Delivery:
            # one reactor turn: the reactor cannot read the close before the trade takes the connection
            world.fault(mode="refuse")
            sock = pooled.transport.transport.getHandle()
            assert select.select([sock], [], [], 10)[0], "the bureau's close did not arrive"
            assert pooled.idle, "the close is unread: the connection still looks idle"
            return await link.send("1101", body, 5)

        with pytest.raises(NotSent):
            on_reactor(reactor, close_then_send)
        assert msgid not in {m for m, _ in world.sim_answers()}
    finally:
        on_reactor(reactor, lambda: defer.succeed(link.close()))


# ---- connections that write at once (fep.transports) ----------------------------------------------------

class _Writes(Protocol):
    """Writes `chunks` as soon as it is connected, then, when told, once more and closes."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.waiting: list[int] = []  # bytes Twisted held after each write, not the kernel

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            self.transport.write(chunk)  # type: ignore[union-attr]
            self.waiting.append(len(self.transport.dataBuffer) - self.transport.offset  # type: ignore[union-attr]
                                + self.transport._tempDataLen)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


def _served(reactor: Any, chunks: list[bytes], read_slowly: bool) -> tuple[bytes, list[int]]:
    proto = _Writes(chunks)
    port = on_reactor(reactor, lambda: endpoints.TCP4ServerEndpoint(
        AtOnce(reactor), 0, interface="127.0.0.1").listen(Factory.forProtocol(lambda: proto)))
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as s:
            if read_slowly:
                time.sleep(0.3)  # the kernel's buffers fill; Twisted keeps the rest, in order
            return _read_until_closed(s), proto.waiting
    finally:
        on_reactor(reactor, lambda: defer.maybeDeferred(port.stopListening))


def test_a_write_on_an_idle_connection_is_in_the_kernels_hands_before_the_reactor_turns(reactor: Any) -> None:
    got, waiting = _served(reactor, [b"HTTP/1.1 200 OK\r\n\r\n", b"{}"], read_slowly=False)
    assert got == b"HTTP/1.1 200 OK\r\n\r\n{}" and waiting == [0, 0]


def test_nothing_written_to_a_connection_being_aborted_leaves(reactor: Any) -> None:
    """Twisted drops what is written after abortConnection; a write at once must not send it either (a trade
    handed a connection aborted a moment ago is then judged unknown, and never reaches the bureau)."""

    class Aborts(Protocol):
        def connectionMade(self) -> None:
            self.transport.abortConnection()  # type: ignore[union-attr]
            self.transport.write(b"never sent")  # type: ignore[union-attr]

    port = on_reactor(reactor, lambda: endpoints.TCP4ServerEndpoint(
        AtOnce(reactor), 0, interface="127.0.0.1").listen(Factory.forProtocol(Aborts)))
    try:
        got = b""
        with contextlib.suppress(ConnectionResetError):  # the abort's reset may come before connect returns
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as s:
                while chunk := s.recv(65536):
                    got += chunk
        assert got == b""
    finally:
        on_reactor(reactor, lambda: defer.maybeDeferred(port.stopListening))


def test_what_the_kernel_does_not_take_at_once_follows_in_order_and_whole(reactor: Any) -> None:
    big = bytes(range(256)) * (16 * 1024)  # 4 MB: more than a socket's buffers hold
    got, waiting = _served(reactor, [big, b"after the big one"], read_slowly=True)
    assert waiting[0] > 0  # (else this test shows nothing)
    assert got == big + b"after the big one"


# ---- the simulated bureau, as slow as real ones --------------------------------------------------------

def test_a_slow_bureau_keeps_serving_other_trades_while_one_waits_out_its_latency(world: World) -> None:
    world.start_sim()
    assert world.latency()["ms"] == 0
    world.latency(60_000)  # a trade sent now waits a minute inside the bureau
    ctx = ssl.create_default_context(cafile=str(world.pki / "ca.pem"))
    ctx.load_cert_chain(str(world.pki / "hospital.pem"), str(world.pki / "hospital.key"))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", world.sim_port)),
                         server_hostname="bureau.fep.test") as waiting:
        waiting.sendall(_post(envelope.dumps({"infno": "1101", "msgid": his_msgid(1), "input": {"data": {}}})))
        wait_for(lambda: world.latency()["waiting"] == 1, what="the first trade to reach the bureau")
        assert world.latency(0)["ms"] == 0  # the control port answers: the simulator's reactor is not blocked
        answer = world.bypass("1101", his_msgid(2), {"data": {"mdtrt_cert_type": "02",
                                                              "mdtrt_cert_no": ZHANG["certno"]}})
        assert answer["infcode"] == 0 and world.latency()["waiting"] == 1  # the first still waits its minute


def test_a_latency_that_is_not_a_number_of_milliseconds_is_refused_naming_the_key(world: World) -> None:
    from fep.sim.server import load_config

    world.configure(sim={"latency_ms": "fast"})
    with pytest.raises(ValueError, match="latency_ms"):
        load_config(world.sim_config)
