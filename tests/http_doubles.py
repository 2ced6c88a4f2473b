"""Shared doubles for testing fep's HTTP server protocol alone: a handler that answers when told, and a
parser of what the server wrote."""

from __future__ import annotations

import httptools
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from fep.http11 import HTTPServerProtocol, Request, Response


class Responses:
    """Parses what a server wrote, in order: [(status, body), ...]."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes]] = []
        self._body: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.got.append((self._parser.get_status_code(), b"".join(self._body)))
        self._body = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._parser.feed_data(data)
        return self.got


class Later:
    """A handler answering only when told: the requests it was handed, in order."""

    def __init__(self) -> None:
        self.taken: list[tuple[Request, defer.Deferred[Response]]] = []

    def __call__(self, req: Request) -> defer.Deferred[Response]:
        d: defer.Deferred[Response] = defer.Deferred()
        self.taken.append((req, d))
        return d

    def answer(self, i: int, text: bytes = b'{"infcode":0}') -> None:
        self.taken[i][1].callback(Response(200, text))


def server(max_body: int = 1000) -> tuple[HTTPServerProtocol, StringTransport, Later]:
    """A server protocol on a test transport, its handler answering when told."""
    handler = Later()
    proto = HTTPServerProtocol(handler, max_body=max_body)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, handler
