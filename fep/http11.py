"""Lean HTTP/1.1 over Twisted protocols, parsed by httptools (llhttp).

Both sides of fep speak HTTP: the HIS posts national envelopes to us, we post them to the bureau.
twisted.web costs about 0.3 ms of CPU a request on each side (limits.md); llhttp costs microseconds.
Owning the client protocol also lets the bureau link know exactly whether request bytes were
written, which is the line between "not sent" and "outcome unknown".
"""

from __future__ import annotations

import json
import select
import socket
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable

import httptools
from OpenSSL import SSL
from twisted.internet import abstract, defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from fep import tls


log = Logger()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str = ""
    version: str = "1.1"  # the client's HTTP version: "1.0" or "1.1"


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json; charset=utf-8"


def render_response(resp: Response, keep_alive: bool, version: str = "1.1", head: bool = False) -> bytes:
    """The answer's bytes. An HTTP/1.0 client keeps the connection only when told so (`Connection:
    keep-alive`); an HTTP/1.1 client unless told otherwise (`Connection: close`). The answer to a HEAD has
    the headers of the answer and no body: the client reads none, and the next answer begins right after."""
    reason = HTTPStatus(resp.status).phrase
    lines = [
        f"HTTP/1.1 {resp.status} {reason}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
    ]
    if not keep_alive:
        lines.append("Connection: close")
    elif version == "1.0":
        lines.append("Connection: keep-alive")
    lines.extend(f"{k}: {v}" for k, v in resp.headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else resp.body)


@dataclass(frozen=True)
class Limits:
    """What one connection may cost (README, "Limits"). Timeouts of None are not enforced."""

    max_url: int = 8192  # bytes of the request target; longer: 414
    max_header_bytes: int = 32768  # bytes of header names and values together; more: 431
    max_headers: int = 100  # header lines; more: 431
    max_pipelined: int = 16  # requests read and not yet answered; at this many, reading stops until one is
    max_pipelined_bytes: int = 32 << 20  # ... and at this many bytes of their bodies, or of answers not yet read
    header_timeout: float | None = None  # from a request's first byte to the end of its headers; then 408
    body_timeout: float | None = None  # from the end of the headers to the end of the body; then 408
    idle_timeout: float | None = None  # a kept connection with nothing owed and nothing arriving is closed


MIN_REQUEST = 16  # the fewest bytes a request can be ("GET / HTTP/1.1\r\n\r\n" less two): see _feed
LINGER_LIMIT = 64 << 20  # at most this much of a refused body is read before the connection is cut
LINGER_SECONDS = 5.0  # after fep's side is shut: how long what the client still sends is read, waiting for its close
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[[Request], "Awaitable[Response] | Response"]
# How a server says "no" before its handler runs (bad HTTP, too large, a crash): status and text in.
Refuser = Callable[[int, str], Response]


def plain_refusal(status: int, message: str) -> Response:
    return Response(status, json.dumps({"error": message}, ensure_ascii=False).encode("utf-8"))


@implementer(IHalfCloseableProtocol)
class HTTPServerProtocol(Protocol):
    """One connection. Requests are answered in order, one at a time (HTTP/1.1 pipelining safe).

    A refusal (bad HTTP, a body too large) answers the request it refuses, so by HTTP's ordering it
    must come after every answer already owed on this connection: a client that heard only the refusal
    would take it for the answer to its first request, and believe a trade failed that stands. Nothing
    after a refusal is taken; once it is written the connection closes.

    What one connection can make fep hold is bounded (`Limits`): at most `max_pipelined` requests read and
    not yet answered (then the socket is not read until one is answered), header and URL sizes, and
    deadlines for reading a request and for an idle kept connection. When the client goes away, requests
    read but not yet handed to the handler are dropped: nobody is left to hear them, and nothing of them
    was journalled. The one being handled completes (it may be journalled already). A client that shuts
    down its sending side after its requests (half-close) still gets every answer. Answers the client has
    not read wait in the transport up to `max_pipelined_bytes`; past that no further request is handled
    until it reads, so a client that never reads costs fep that and one answer, not an answer a request."""

    # `Expect: 100-continue` (curl for large bodies, every .NET Framework HttpWebRequest): the client waits for
    # "100 Continue" before it sends the body (.NET 350 ms, curl 1 s, then it sends anyway). It is sent as soon
    # as the headers show a body that will be taken, after any answers still owed on the connection (they come
    # first, in order); a body over the limit gets its 413 instead, and the client need not send it.

    def __init__(self, handler: Handler, max_body: int, peer: str = "", refuse: Refuser = plain_refusal,
                 limits: Limits | None = None, clock: Any = None, on_close: Callable[[], None] | None = None) -> None:
        self._handler = handler
        self._refusal = refuse
        self._max_body = max_body
        self._peer = peer
        self._limits = limits or Limits()
        self._clock = clock
        self._on_close = on_close
        self._parser = httptools.HttpRequestParser(self)
        # what is owed, in order: requests taken, and at most one refusal, last
        self._pending: deque[tuple[Request, bool] | Response] = deque()
        self._pending_bytes = 0  # body bytes of the requests in _pending
        self._busy = False
        self._refused = False  # a refusal is queued: nothing more is taken
        self._drained = True  # False while a refused body is still being read (lingering close)
        self._finished = False  # the last answer is written; the connection closes once drained
        self._discarded = 0  # bytes read and dropped after the refusal
        self._held = bytearray()  # bytes read and not yet parsed: reading is paused
        self._paused = False
        self._unread = False  # the transport holds more unread answers than it may: nothing more is handled
        self._producing = False  # registered with the transport as what produces its writes
        self._closing = False  # fep's side is shut (or being shut, once written): the client's is awaited
        self._half_closes = False  # a socket of our own (TCP, UNIX): its write side can be shut alone
        self._parsing = False  # in the parser's feed_data: a handler that answered at once must not feed it again
        self._read_closed = False  # the client half-closed: it sends nothing more but still reads
        self._lost = False
        self._in_head = False  # a request has begun and its headers are not complete
        self._in_body = False
        self._head_bytes = 0
        self._timer: Any = None  # the connection's one DelayedCall, at or before _deadline when that is set
        self._deadline: float | None = None  # when the phase the connection is in runs out
        self._phase = ""
        self.dropped = 0  # requests read and dropped because the client went away before their turn
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._header_count = 0
        self._body: list[bytes] = []
        self._size = 0
        self._continue = False  # the request in progress waits for "100 Continue" before sending its body

    @property
    def buffered(self) -> int:
        """Requests read and not yet answered (the one being handled included)."""
        return sum(1 for item in self._pending if not isinstance(item, Response)) + (1 if self._busy else 0)

    # Deadlines: one for the phase the connection is in, kept as a number. Its one timer is looked at when it
    # fires and moved only when a deadline comes before it: a request's phases (headers, body, idle after the
    # answer) then cost no callLater and cancel each, and a busy connection's timer fires about once a
    # header_timeout, finds its deadline ahead and waits for it.
    def _arm(self, seconds: float | None, what: str) -> None:
        if seconds is None or self._lost:
            self._deadline = None
            return
        clock = self._reactor_clock()
        self._deadline, self._phase = clock.seconds() + seconds, what
        if self._timer is None:
            self._timer = clock.callLater(seconds, self._check)
        elif self._timer.getTime() > self._deadline:
            self._timer.reset(seconds)

    def _disarm(self) -> None:
        self._deadline = None

    def _reactor_clock(self) -> Any:
        if self._clock is None:
            from twisted.internet import reactor
            self._clock = reactor
        return self._clock

    def _check(self) -> None:
        self._timer = None
        if self._deadline is None or self._lost:
            return
        left = self._deadline - self._clock.seconds()
        if left > 0:
            self._timer = self._clock.callLater(left, self._check)
            return
        self._deadline = None
        self._expired(self._phase)

    def _expired(self, what: str) -> None:
        if what == "idle":
            self.close()
            return
        if what == "linger":  # the client has had every answer and its end of the close for LINGER_SECONDS
            self.transport.abortConnection()
            return
        limit = self._limits.header_timeout if what == "headers" else self._limits.body_timeout
        self._refuse(408, f"the request's {what} did not arrive within {limit:g} s")
        self._drained = True
        self._close_if_done()

    def _idle_check(self) -> None:
        """Nothing owed and no request begun: the idle deadline runs; otherwise it does not."""
        if self._lost or self._finished:
            return
        if not self._busy and not self._pending and not self._in_head and not self._in_body:
            if self._read_closed:  # the client sends nothing more and is owed nothing
                self.close()
                return
            self._arm(self._limits.idle_timeout, "idle")
        elif self._deadline is not None and not (self._in_head or self._in_body):
            self._disarm()  # waiting for our own handler: no deadline on the client

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._arm(self._limits.header_timeout, "headers")

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._url += url
        if len(self._url) > self._limits.max_url:
            self._refuse(414, f"the request target is over the limit of {self._limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_bytes += len(name) + len(value)
        self._header_count += 1
        if self._header_count > self._limits.max_headers:
            self._refuse(431, f"the request has more than {self._limits.max_headers} header fields")
            return
        if self._header_bytes > self._limits.max_header_bytes:
            self._refuse(431, f"the request's header fields are over the limit of {self._limits.max_header_bytes} bytes")
            return
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._arm(self._limits.body_timeout, "body")
        if self._refused:
            return
        if self._parser.should_upgrade():
            method = self._parser.get_method().decode("latin-1")
            if method == "CONNECT":
                self._refuse(501, "CONNECT is not supported: fep is not a proxy")
            else:
                self._refuse(501, f"Upgrade ({self._headers.get('upgrade', '')}) is not supported: "
                                  "post trades over HTTP/1.1 without Upgrade")
            return
        length = self._headers.get("content-length", "0")
        if length.isdigit() and int(length) > self._max_body:
            self._refuse(413, f"request body of {length} bytes is over the limit of {self._max_body}", linger=True)
            return
        if (self._headers.get("expect", "").strip().lower() == "100-continue"
                and self._parser.get_http_version() != "1.0"):  # HTTP/1.0 has no 100 (RFC 9110 10.1.1)
            self._continue = True
            self._send_continue()

    def _send_continue(self) -> None:
        """The 100 of the request being read, once every answer owed before it is written."""
        if self._continue and not self._busy and not self._pending and not self._refused:
            self._continue = False
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._continue = False  # the client sends the body already: no 100 is needed
        if self._refused:
            return
        self._size += len(body)
        if self._size > self._max_body:
            self._refuse(413, f"request body is over the limit of {self._max_body} bytes", linger=True)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = self._in_body = False
        self._disarm()
        if self._refused:  # the end of a refused body: the client is now reading, not sending
            self._drained = True
            self._close_if_done()
            return
        req = Request(
            method=self._parser.get_method().decode("latin-1"),
            path=self._url.decode("utf-8", "replace"),
            headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
            peer=self._peer,
            version=self._parser.get_http_version(),
        )
        self._pending.append((req, self._parser.should_keep_alive()))
        self._pending_bytes += len(req.body)
        self._reset()
        self._next()

    # Twisted
    def connectionMade(self) -> None:
        self._half_closes = isinstance(self.transport, abstract.FileDescriptor)  # (TLS has no half-close of its own)
        if self._half_closes:  # (Twisted's own cap is 64 KiB: one big answer)
            self.transport.bufferSize = self._limits.max_pipelined_bytes
        self.transport.registerProducer(self, True)
        self._producing = True
        self._idle_check()

    # IPushProducer: the transport pauses this connection's answers while the client is not reading them
    def pauseProducing(self) -> None:
        self._unread = True

    def resumeProducing(self) -> None:
        if self._unread:
            self._unread = False
            self._next()

    def stopProducing(self) -> None:
        pass  # the connection is lost: connectionLost does what there is to do

    def close(self) -> None:
        """Close once what is written has gone, without a reset. A socket closed with bytes from the client
        still unread makes the kernel reset the connection, and that throws away the answers it has not yet
        delivered: so on a socket whose client may still send, fep shuts its own side once its answers are
        written and reads (and drops) what comes until the client closes too, or LINGER_SECONDS pass. (Not the
        transport's loseConnection alone: while this connection is its producer, it holds the close back.)"""
        if self._closing:
            return
        self._closing = True
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        if self._read_closed or not self._half_closes:
            self.transport.loseConnection()  # (the client sends nothing more, or fep cannot shut one side)
            return
        self._refused = self._drained = self._finished = True  # nothing more is taken: what comes is dropped
        self._held.clear()
        self._resume()
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_LIMIT:
                self.transport.abortConnection()
                return
            if self._drained:  # past the refused request: read only so that closing sends no reset
                return
        self._held += data
        self._feed()

    def _full(self) -> bool:
        return (self.buffered >= self._limits.max_pipelined
                or (self._pending_bytes >= self._limits.max_pipelined_bytes and bool(self._pending)))

    def _feed(self) -> None:
        """Parse what is held, stopping as soon as `max_pipelined` requests are owed. llhttp cannot be paused
        from a callback, so it is fed no more bytes at a time than can hold the requests there is still room
        for: every request is at least MIN_REQUEST bytes long, and a body's announced rest is passed whole."""
        while self._held and not self._lost and not (self._refused and self._drained):
            room = self._limits.max_pipelined - self.buffered
            if self._full() or room <= 0:
                self._pause()
                return
            step = room * MIN_REQUEST
            if self._refused:  # a refused body being read to its end: no request can come of it
                step = len(self._held)
            elif self._in_body:
                length = self._headers.get("content-length", "")
                if length.isdigit():  # the rest of this body ends this request: one of the `room`
                    step = max(1, int(length) - self._size + (room - 1) * MIN_REQUEST)
            piece = bytes(self._held[:step])
            del self._held[:step]
            began_in_head = self._in_head
            self._parsing = True
            try:
                self._parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # the request asking for an upgrade (refused in on_headers_complete) is complete; what follows
                # is not HTTP and is not read
                self._held.clear()
                self._drained = True
                self._close_if_done()
                return
            except httptools.HttpParserError as e:
                self._held.clear()
                if not self._refused:
                    self._refuse(400, f"malformed HTTP request: {e}")
                self._drained = True  # the parser reads no further: whatever follows is dropped
                self._close_if_done()
                return
            finally:
                self._parsing = False
            if self._in_head and not self._refused:
                # httptools gathers a header line before calling on_header: a line that never ends is caught here
                self._head_bytes += len(piece) if began_in_head else 0
                limit = self._limits.max_header_bytes + self._limits.max_url + 8192
                if self._head_bytes > limit:
                    self._held.clear()
                    self._refuse(431, f"the request's header fields are over the limit of "
                                      f"{self._limits.max_header_bytes} bytes")
                    self._drained = True
                    self._close_if_done()
                    return
        if self._refused and self._drained:
            self._held.clear()
        if not self._held:
            self._resume()
        self._idle_check()

    def _pause(self) -> None:
        if not self._paused and not self._lost:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused and not self._lost:
            self._paused = False
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        """The client shut down its sending side (SHUT_WR): what it sent is answered, then the connection closes."""
        self._read_closed = True
        if self._closing:  # the end of a close that fep began: both sides are shut
            self.transport.loseConnection()
            return
        if not (self._in_head or self._in_body):
            self._idle_check()
        else:  # a request cut short: nothing more of it will come; answer what is owed, then close
            self._in_head = self._in_body = False
            self._disarm()
            self._refused = True
            self._drained = True
            if not self._busy and not self._pending:
                self.close()

    def writeConnectionLost(self) -> None:
        if self._closing:  # fep's side is shut, every answer handed to the kernel: the client has a while to close
            self._arm(LINGER_SECONDS, "linger")
            return
        self.close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self._disarm()
        if self._timer is not None and self._timer.active():  # it holds this connection until it fires
            self._timer.cancel()
        self._timer = None
        self.dropped += self.buffered - (1 if self._busy else 0)
        self._pending.clear()  # not handed to the handler: nothing of them was journalled
        self._pending_bytes = 0
        self._held.clear()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def _refuse(self, status: int, message: str, linger: bool = False) -> None:
        """Queue the answer to a request that cannot be taken, behind the answers already owed. With
        `linger` the rest of the body is read and dropped before closing, so a client still sending
        sees our answer instead of a broken pipe."""
        if self._refused:
            return
        self._refused = True
        self._drained = not linger
        self._pending.append(self._refusal(status, message))
        self._next()

    def _next(self) -> None:
        if self._busy or self._unread or not self._pending or self._finished or self._lost:
            return
        item = self._pending.popleft()
        if isinstance(item, Response):  # the refusal: always the last thing owed
            self._finish(item)
            return
        self._busy = True
        req, keep_alive = item
        self._pending_bytes -= len(req.body)
        d = defer.maybeDeferred(self._handler, req)
        d.addErrback(self._internal_error)
        d.addCallback(self._write, keep_alive, req.version, req.method == "HEAD")

    def _internal_error(self, f: Failure) -> Response:
        log.failure("unhandled error answering an HTTP request", f)
        return self._refusal(500, "internal error in fep; the request is in the journal if it was accepted")

    def _write(self, resp: Response, keep_alive: bool, version: str, head: bool = False) -> None:
        self._busy = False
        if self._lost:  # the client went away: the work is done (and journalled), nobody hears it
            return
        if not keep_alive:  # the client asked to close: whatever it sent after this is not answered
            self._pending.clear()
            self._held.clear()
            self._drained = True
            self._finish(resp, version)
            return
        self.transport.write(render_response(resp, keep_alive, version, head))
        self._next()
        self._send_continue()
        if self._held and not self._full() and not self._parsing:  # parsing: the _feed it answers in goes on
            self._feed()
        elif not self._held:
            self._resume()
            self._idle_check()
        if self._read_closed and not self._busy and not self._pending:
            self.close()

    def _finish(self, resp: Response, version: str = "1.1") -> None:
        self._finished = True
        self._refused = True  # nothing more is taken
        self._disarm()
        self.transport.write(render_response(resp, keep_alive=False, version=version))
        self._close_if_done()

    def _close_if_done(self) -> None:
        """After the last answer: closed at once where the rest of a refused body can be read and dropped after
        fep's side is shut (close), else once it has been read."""
        if self._finished and (self._drained or self._read_closed or self._half_closes):
            self.close()


REFUSAL_ALERTS = ("unknown ca", "bad certificate", "certificate required", "certificate unknown",
                  "certificate revoked", "certificate expired", "unsupported certificate", "access denied",
                  "handshake failure")


class TransportError(Exception):
    """The connection failed; `sent` says whether any request bytes were written before it did."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass
class ClientResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@implementer(IHandshakeListener)
class HTTPClientProtocol(Protocol):
    """A persistent client connection carrying one request at a time.

    `ready` fires once the TLS handshake is complete: nothing is written before that, so a
    handshake failure is provably "not sent".
    """

    def __init__(self) -> None:
        self.ready: defer.Deferred[HTTPClientProtocol] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._waiting: defer.Deferred[ClientResponse] | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reset()
        self.connected_ok = False
        self.reusable = True  # False once a request on it timed out: its late answer may still come
        self._requests = 0
        self._received = 0

    def _reset(self) -> None:
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def handshakeCompleted(self) -> None:
        self.connected_ok = True
        self.ready.callback(self)

    def request(self, path: str, body: bytes, headers: dict[str, str]) -> defer.Deferred[ClientResponse]:
        assert self._waiting is None, "one request at a time on a connection"
        if self._closing():  # the write would be dropped on the floor: provably not sent
            self.connected_ok = False
            return defer.fail(TransportError("the connection was closed before the request was written", sent=False))
        head = [f"POST {path} HTTP/1.1", f"Content-Length: {len(body)}"]
        head.extend(f"{k}: {v}" for k, v in headers.items())
        self._waiting = defer.Deferred()
        self._requests += 1
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body)
        return self._waiting

    @property
    def idle(self) -> bool:
        return self.connected_ok and self.reusable and self._waiting is None and not self._closing()

    def _closing(self) -> bool:
        """Closed or closing below us, though connectionLost has not come yet. A bureau closing an idle
        connection sends close_notify, and the TLS layer drops every write after reading it; our
        connectionLost comes only once the TCP connection is down, a reactor turn or more later."""
        t = self.transport
        if t is None or not self.connected_ok or t.disconnecting:
            return True
        if getattr(getattr(t, "transport", None), "disconnecting", False):  # TCP under TLS: shut down
            return True
        return tls.finished(t)

    def unread(self) -> bool:
        """Bytes wait in the kernel on this idle connection, not yet read by the reactor: the bureau's
        close (close_notify, FIN, a reset) on its way up, or bytes no request asked for. A request written
        now might never be read, and nothing provable could be said of it (urllib3 and Go's net/http
        check the same before they reuse a connection)."""
        sock = _socket(self.transport)
        if sock is None:
            return False
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        resp = ClientResponse(self._parser.get_status_code(), self._headers, b"".join(self._body))
        keep = self._parser.should_keep_alive()
        self._reset()
        waiting, self._waiting = self._waiting, None
        if not keep:
            self.connected_ok = False
            self.transport.loseConnection()
        if waiting is not None:
            waiting.callback(resp)

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(TransportError(f"malformed HTTP answer: {e}", sent=True))
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected_ok = False
        why = reason.getErrorMessage()
        if not self.ready.called:
            self.ready.errback(TransportError(f"TLS handshake failed: {why}", sent=False))
        elif self._refused_session(reason):
            self._fail(TransportError(f"TLS handshake failed: the bureau refused our certificate: {why}", sent=False))
        else:
            self._fail(TransportError(f"connection lost before the whole answer: {why}", sent=True))
        if not self.closed.called:
            self.closed.callback(None)

    def _refused_session(self, reason: Failure) -> bool:
        """In TLS 1.3 the server checks our certificate after our side has finished the handshake, so its
        refusal arrives after we wrote. A certificate or handshake alert on a connection's first request,
        before any answer byte, means the server's TLS layer rejected the session: nothing was delivered."""
        if self._requests != 1 or self._received or not reason.check(SSL.Error):
            return False
        text = reason.getErrorMessage().lower()
        return any(a in text for a in REFUSAL_ALERTS)

    def _fail(self, err: TransportError) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(err)


def _socket(transport: Any) -> socket.socket | None:
    """The TCP socket under a transport, under its TLS layer if it has one; None for one that has none."""
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if isinstance(handle, SSL.Connection):
        below = getattr(transport, "transport", None)
        handle = below.getHandle() if hasattr(below, "getHandle") else None
    return handle if isinstance(handle, socket.socket) else None
