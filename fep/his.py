"""The HIS listener (hospital NIC): HTTP/1.1 on a Unix socket and a TCP address.

A thin adapter: parse the envelope, call one engine method, map errors to answers. Any POST path is a
trade (HIS programs post to /fsi/api/rsfComIfsService/callService, /hsa/hgs/{infno} or per-service
paths); `infno` comes from the body. fep's own calls live under /fep/.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Sequence
from urllib.parse import unquote

from multipart import parse_options_header
from twisted.internet import address
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from fep import envelope
from fep.trades import InvalidInput, UnknownTrade
from fep.engine import Engine, Refused
from fep.journal import Fenced, IllegalTransition
from fep.http11 import HTTPServerProtocol, Limits, Request, Response
from fep.replies import Reply

log = Logger()

FREE_LATER_FROM = 64 << 10  # bytes of a posted body: from this size its parse is freed after the answer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HisService:
    def __init__(self, engine: Engine, reactor: IReactorThreads | None = None) -> None:
        self.engine = engine
        self.reactor = reactor  # None: a parsed request is freed as soon as it is answered

    async def handle(self, req: Request) -> Response:
        output = "data"  # a refusal carries the trade's output node once the trade is known
        try:
            path = req.path.split("?", 1)[0]
            if req.method == "GET" and path.startswith("/fep/trades/"):
                return self._json(await self.engine.lookup(unquote(path[len("/fep/trades/"):])))
            if req.method == "POST" and path.startswith("/fep/confirm/"):
                return self._json(await self.engine.confirm(unquote(path[len("/fep/confirm/"):])))
            if req.method != "POST":
                return envelope.refusal(405, f"{req.method} {path}: post a trade envelope, or GET /fep/trades/MSGID")
            trade_req = parse(req)
            try:
                output = self.engine.trades.get(trade_req.infno).output
                return self._json(await self.engine.submit(trade_req))
            finally:
                if len(req.body) >= FREE_LATER_FROM:
                    self._free_after_answer(req, trade_req)
        except (envelope.BadEnvelope, UnknownTrade, InvalidInput) as e:
            return envelope.his_refusal(400, str(e), self.engine.cfg.his.infcode_type, output)
        except Refused as e:
            return envelope.his_refusal(e.status, str(e), self.engine.cfg.his.infcode_type, output)
        except (Fenced, IllegalTransition) as e:
            if self.engine.role == "single":
                raise
            # Another node took the lead while this one had the trade in hand: the leader has it now.
            return envelope.his_refusal(envelope.STANDBY, f"this fep node no longer leads ({e}); "
                                        f"{self.engine.who_leads()} (with the same msgid)",
                                        self.engine.cfg.his.infcode_type, output)

    def _free_after_answer(self, *parsed: Any) -> None:
        """A 5,000-line upload, parsed, is some 200,000 objects that take 4 ms to free: they are let go after
        the answer has gone out. (A call queued from the reactor thread runs in its next round, after the
        round that writes the answer to the HIS's socket.) A small trade is freed at once: the queued call
        costs it more (a write to the reactor's waker pipe, which lets go of the interpreter lock) than
        freeing it does."""
        if self.reactor is not None:
            self.reactor.callFromThread(_nothing, parsed)

    def _json(self, reply: Reply) -> Response:
        """What the HIS hears: the envelope as JSON; a download (9102) that succeeded, the file itself, unless
        his.file_answers says this HIS reads only JSON."""
        file = reply.download() if self.engine.cfg.his.file_answers == "file" else None
        if file is not None:
            return envelope.file_response(200, file, reply.body)
        return Response(200, reply.raw or envelope.dumps(reply.body))


def _nothing(_: Any) -> None:
    pass


def parse(req: Request) -> envelope.HisRequest:
    """The envelope of a posted trade: JSON in UTF-8, GBK or GB18030 (the charset in Content-Type), or a
    multipart/form-data 9101 (a jsonStr part and a file part)."""
    mime, options = content_type(req.headers.get("content-type", ""))
    if mime == "multipart/form-data":
        return envelope.parse_his_form(req.body, options.get("boundary"))
    return envelope.parse_his_request(req.body, options.get("charset"))


def content_type(value: str) -> tuple[str, dict[str, str]]:
    """("multipart/form-data", {"boundary": ...}): the media type lower-cased, its options by lower-cased name."""
    return parse_options_header(value)


class RateLimitedLog:
    """One line per (what, source) per `interval` seconds; the next line says how many were left out. A
    refused source cannot fill the disk, and the table of sources is bounded too."""

    def __init__(self, interval: float = 60.0, clock: Any = None, max_sources: int = 10000) -> None:
        self.interval = interval
        self.clock = clock
        self.max_sources = max_sources
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [last logged at, left out since]

    def _now(self) -> float:
        if self.clock is not None:
            return self.clock.seconds()
        return time.monotonic()

    def warn(self, what: str, source: str, text: str, **fields: Any) -> bool:
        """Log `text` (a twisted.logger format; {source} and {more} are filled) unless this source was logged for
        this reason less than `interval` ago. True when a line was written."""
        now = self._now()
        key = (what, source)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        more = int(seen[1]) if seen is not None else 0
        if len(self._seen) >= self.max_sources:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            if len(self._seen) >= self.max_sources:  # a flood from many sources: forget the oldest half
                keep = sorted(self._seen.items(), key=lambda kv: kv[1][0])[len(self._seen) // 2:]
                self._seen = dict(keep)
        self._seen[key] = [now, 0]
        suffix = f" ({more} more since the last line)" if more else ""
        log.warn(text + suffix, source=source, **fields)
        return True


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n"
        b"Connection: close\r\nRetry-After: 1\r\n\r\nfep: too many HIS connections\r\n")


class _Busy(Protocol):
    """A connection over a cap: one short 503, closed at once, nothing read."""

    def connectionMade(self) -> None:
        self.transport.write(BUSY)
        self.transport.loseConnection()


class HisFactory(Factory):
    """Connections from outside the configured client networks are closed before a byte is read, and so
    are connections over `his.max_connections` or `his.max_connections_per_peer` (after a short 503).
    Each refusal is logged at most once a minute per source, with a count."""

    def __init__(self, service: HisService, max_body: int, networks: Sequence[Network],
                 limits: Limits | None = None, max_connections: int = 2048, max_per_peer: int = 512,
                 clock: Any = None) -> None:
        self.service = service
        self.max_body = max_body
        self.networks = tuple(networks)
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.clock = clock
        self.refusals = RateLimitedLog(clock=clock)
        self.open = 0
        self.per_peer: dict[str, int] = {}
        self.refused = 0  # connections refused, every reason

    def buildProtocol(self, addr: Any) -> Protocol | None:
        peer = ""
        host = "unix"
        if isinstance(addr, (address.IPv4Address, address.IPv6Address)):
            host = addr.host
            ip = ipaddress.ip_address(addr.host)
            if not any(ip in n for n in self.networks):
                self.refused += 1
                self.refusals.warn("network", host, "refused HIS connection from {source}: not in his.allowed_networks")
                return None
            peer = f"{addr.host}:{addr.port}"
        if self.open >= self.max_connections:
            return self._busy(host, "refused HIS connection from {source}: {n} HIS connections are open, "
                                    "his.max_connections", self.open)
        count = self.per_peer.get(host, 0)
        if host != "unix" and count >= self.max_per_peer:
            return self._busy(host, "refused HIS connection from {source}: it has {n} open, "
                                    "his.max_connections_per_peer", count)
        self.open += 1
        self.per_peer[host] = count + 1
        return HTTPServerProtocol(self.service.handle, self.max_body, peer, refuse=envelope.refusal,
                                  limits=self.limits, clock=self.clock, on_close=lambda: self._closed(host))

    def _busy(self, host: str, text: str, n: int) -> Protocol:
        self.refused += 1
        self.refusals.warn("busy", host, text, n=n)
        return _Busy()

    def _closed(self, host: str) -> None:
        self.open -= 1
        left = self.per_peer.get(host, 1) - 1
        if left > 0:
            self.per_peer[host] = left
        else:
            self.per_peer.pop(host, None)
