"""The HIS listener (hospital NIC): HTTP/1.1 on a Unix socket and a TCP address.

A thin adapter: parse the envelope, call one engine method, map errors to answers. Any POST path is a
trade (HIS programs post to /fsi/api/rsfComIfsService/callService, /hsa/hgs/{infno} or per-service
paths); `infno` comes from the body. fep's own calls live under /fep/.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

from multipart import parse_options_header
from twisted.internet import address
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from fep import envelope
from fep.trades import InvalidInput, UnknownTrade
from fep.engine import Engine, Refused
from fep.http11 import HTTPServerProtocol, Request, Response
from fep.replies import Reply

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HisService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def handle(self, req: Request) -> Response:
        output = "data"  # a refusal carries the trade's output node once the trade is known
        try:
            path = req.path.split("?", 1)[0]
            if req.method == "GET" and path.startswith("/fep/trades/"):
                return _json(await self.engine.lookup(path.rsplit("/", 1)[1]))
            if req.method == "POST" and path.startswith("/fep/confirm/"):
                return _json(await self.engine.confirm(path.rsplit("/", 1)[1]))
            if req.method != "POST":
                return envelope.refusal(405, f"{req.method} {path}: post a trade envelope, or GET /fep/trades/MSGID")
            trade_req = parse(req)
            output = self.engine.trades.get(trade_req.infno).output
            return _json(await self.engine.submit(trade_req))
        except (envelope.BadEnvelope, UnknownTrade, InvalidInput) as e:
            return envelope.his_refusal(400, str(e), self.engine.cfg.his.infcode_type, output)
        except Refused as e:
            return envelope.his_refusal(e.status, str(e), self.engine.cfg.his.infcode_type, output)


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


def _json(reply: Reply) -> Response:
    """What the HIS hears: the envelope as JSON; a download (9102) that succeeded, the file itself."""
    file = envelope.downloaded_file(reply.body)
    if file is not None:
        return envelope.file_response(200, file, reply.body)
    return Response(200, reply.raw or envelope.dumps(reply.body))


class HisFactory(Factory):
    """Connections from outside the configured client networks are closed before a byte is read."""

    def __init__(self, service: HisService, max_body: int, networks: Sequence[Network]) -> None:
        self.service = service
        self.max_body = max_body
        self.networks = tuple(networks)

    def buildProtocol(self, addr: Any) -> Protocol | None:
        peer = ""
        if isinstance(addr, (address.IPv4Address, address.IPv6Address)):
            ip = ipaddress.ip_address(addr.host)
            if not any(ip in n for n in self.networks):
                log.warn("refused HIS connection from {host}: not in his.allowed_networks", host=addr.host)
                return None
            peer = f"{addr.host}:{addr.port}"
        return HTTPServerProtocol(self.service.handle, self.max_body, peer, refuse=envelope.refusal)
