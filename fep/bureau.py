"""The bureau link (VPN NIC): persistent HTTP/1.1 connections to the bureau's endpoints, over mutual TLS
unless the region's link is set otherwise (bureau.link_security), framed for the region's gateway
(fep.gateway) with its token (fep.token).

It answers one question per send, precisely: did the bureau answer, did the request provably never
leave (NotSent: safe to fail, queue or try another endpoint), or may it have arrived (Unknown)?
A refusal of the gateway itself (signature, timestamp, token, a path it has no service at, throttling) never
reached the bureau: NotSent; its backend's timeout or 5xx (HTTP 504 调用后端服务超时) may have: Unknown.
Failover happens only for NotSent. The link knows nothing of the journal or of what a trade means.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from fep import envelope, fileform, gateway, logs, metrics, tls
from fep.config import LINK_SECURITY, BureauSide, Endpoint
from fep.http11 import ClientResponse, HTTPClientProtocol, TransportError
from fep.token import TokenCache
from fep.transports import AtOnce

log = Logger()


LateHandler = Callable[[bytes], None]


class NotSent(Exception):
    """No byte of the request left the box: the trade can be failed, queued or sent elsewhere."""


class Unknown(Exception):
    """The request may have reached the bureau and no valid answer came back. `endpoint` names the
    endpoint it may have reached: a resend or reversal of it must go there (`send(endpoint=...)`)."""

    def __init__(self, message: str, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


@dataclass
class Delivery:
    answer: envelope.BureauAnswer
    body: bytes
    endpoint: str
    seconds: float


class _Pool:
    """Connections to one endpoint: at most `size`, reused while idle, handshake done before use."""

    def __init__(self, reactor: Any, ep: Endpoint, creator: IOpenSSLClientConnectionCreator | None, size: int,
                 connect_timeout: float, source: str | None) -> None:
        self.reactor, self.ep, self.creator = reactor, ep, creator
        self.size, self.connect_timeout, self.source = size, connect_timeout, source
        self.idle: list[HTTPClientProtocol] = []
        self.count = 0
        self.waiters: deque[defer.Deferred[HTTPClientProtocol | None]] = deque()
        self.up: bool | None = None  # None: not tried yet
        self.retired = False  # replaced by a reload: connections still in use close when done
        self.tokens: TokenCache | None = None  # the gateway's bearer token, where the region has one
        self.seconds = metrics.BUREAU_SECONDS.labels(ep.name)  # labels() is a lock and a look-up: once, not a trade

    async def acquire(self) -> HTTPClientProtocol:
        while self.idle:
            p = self.idle.pop()
            if p.idle:
                if not p.unread():
                    return p
                p.transport.abortConnection()  # the bureau spoke unasked (its close, most often): never written to
            self.count -= 1
        if self.count >= self.size:
            d: defer.Deferred[HTTPClientProtocol | None] = defer.Deferred()
            self.waiters.append(d)
            p = await d
            if p is not None:
                return p
            # None: a slot was freed for us to connect in; count already includes us
        else:
            self.count += 1
        try:
            return await self._connect()
        except Exception:
            self._free_slot()
            raise

    async def _connect(self) -> HTTPClientProtocol:
        bind = (self.source, 0) if self.source else None
        tcp = TCP4ClientEndpoint(AtOnce(self.reactor), self.ep.host, self.ep.port, timeout=self.connect_timeout,
                                 bindAddress=bind)
        proto = HTTPClientProtocol()
        factory = Factory.forProtocol(lambda: proto)
        try:
            await tcp.connect(tls.WholeWrites(self.creator, True, factory) if self.creator else factory)
        except Exception as e:
            self.mark_up(False, str(e))
            raise NotSent(f"cannot connect to {self.ep.name} ({self.ep.host}:{self.ep.port}): {e}") from None
        if self.creator is None:
            proto.handshakeCompleted()  # plain HTTP: the connection is ready as soon as it is made
        timer = self.reactor.callLater(self.connect_timeout, proto.transport.abortConnection)
        try:
            await proto.ready
        except TransportError as e:
            self.mark_up(False, str(e))
            raise NotSent(f"{self.ep.name}: {e}") from None
        finally:
            if timer.active():
                timer.cancel()
        self.mark_up(True)
        return proto

    def release(self, p: HTTPClientProtocol) -> None:
        if p.idle and not self.retired:
            if self.waiters:
                self.waiters.popleft().callback(p)
            else:
                self.idle.append(p)
            return
        if p.transport is not None:
            p.transport.abortConnection()
        self._free_slot()

    def _free_slot(self) -> None:
        if self.waiters:
            self.waiters.popleft().callback(None)  # the waiter connects in the freed slot
        else:
            self.count -= 1

    def mark_up(self, up: bool, why: str = "") -> None:
        if up is not self.up:
            logs.link(self.ep.name, self.ep.url, up, why)
        self.up = up
        metrics.LINK_UP.labels(self.ep.name).set(1 if up else 0)

    def close(self) -> None:
        self.retired = True
        for p in self.idle:
            p.transport.loseConnection()
        self.idle.clear()


class BureauLink:
    def __init__(self, reactor: Any, cfg: BureauSide) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.secrets = _secrets(cfg)  # the gateway's, read from their files with the certificates
        self.pools = [self._pool(ep) for ep in cfg.endpoints]
        self.expires = tls.expiry(cfg.tls)  # certificate name -> Unix time; for status and metrics
        _show_security(cfg)

    def _pool(self, ep: Endpoint) -> _Pool:
        creator = tls.client_options(self.cfg.tls, ep.server_name) if self.cfg.tls else None
        pool = _Pool(self.reactor, ep, creator, self.cfg.concurrency, self.cfg.connect_timeout,
                     self.cfg.source_address)
        if self.cfg.profile.style == "jilin":
            pool.tokens = TokenCache(lambda: self._fetch_token(pool), self.reactor.seconds,
                                     float(self.cfg.profile.setting("refresh_before")))
        return pool

    def reconfigure(self, cfg: BureauSide) -> None:
        """New endpoints, certificates or secrets for new connections; trades in flight finish on the old
        ones. Raises TLSConfigError, leaving everything as it was, if the new ones cannot be used."""
        old, self.cfg = self.cfg, cfg
        try:
            secrets = _secrets(cfg)
            pools = [self._pool(ep) for ep in cfg.endpoints]
            expires = tls.expiry(cfg.tls)
        except tls.TLSConfigError:
            self.cfg = old
            raise
        for pool in self.pools:
            pool.close()
        self.pools, self.expires, self.secrets = pools, expires, secrets
        _show_security(cfg)

    @property
    def security(self) -> dict[str, str]:
        """How the link is secured and framed, for `fep status`."""
        return {"link_security": self.cfg.link_security, "profile": self.cfg.profile.style,
                "url_layout": self.cfg.profile.url_layout}

    @property
    def endpoint_names(self) -> tuple[str, ...]:
        return tuple(p.ep.name for p in self.pools)

    @property
    def down(self) -> bool:
        """Every endpoint failed its last attempt: deferrable trades wait, the rest fail fast."""
        return all(p.up is False for p in self.pools)

    async def send(self, infno: str, body: bytes, timeout: float, trade_path: str | None = None,
                   on_late: LateHandler | None = None, endpoint: str | None = None,
                   base_path: str | None = None) -> Delivery:
        """Send to the first endpoint that takes it, or with `endpoint` to that one only. Raises NotSent
        or Unknown (whose `endpoint` says where it may have arrived).

        Pin a resend, or a reversal, to where the original may have arrived: another endpoint may be
        another bureau system that never saw it. A pinned send never fails over.

        An answer that comes after `timeout` (within the late grace) goes to `on_late`: the caller has
        already been told Unknown and acted on it; the late answer is kept for reconciliation. `base_path`, where
        set, stands for the endpoint's own path (a region's path for 异地 trades: remote.path)."""
        reasons = []
        for pool in self._candidates(endpoint):
            try:
                return await self._send_to(pool, infno, body, timeout, trade_path, on_late, base_path)
            except NotSent as e:  # provably never left: the next endpoint may take it
                reasons.append(str(e))
        raise NotSent("; ".join(reasons))

    async def _send_to(self, pool: _Pool, infno: str, body: bytes, timeout: float, trade_path: str | None,
                       on_late: LateHandler | None, base_path: str | None = None) -> Delivery:
        """One endpoint; a token the gateway no longer takes is fetched anew and the trade sent again, once."""
        for attempt in (1, 2):
            token = await pool.tokens.get() if pool.tokens else None
            framed = await self._frame(pool.ep, infno, body, trade_path, token, base_path)
            conn = await pool.acquire()
            try:
                return await self._exchange(pool, conn, infno, framed, timeout, on_late)
            except gateway.Refused as e:
                if not (e.token and pool.tokens and token and attempt == 1):
                    raise NotSent(f"{pool.ep.name}: {e}") from None
                pool.tokens.invalidate(token)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _fetch_token(self, pool: _Pool) -> tuple[str, float]:
        """The password grant at the gateway's token endpoint, on one of the pool's connections."""
        framed = gateway.token_request(self.cfg.profile, self.secrets)
        conn = await pool.acquire()
        d = conn.request(framed.path, framed.body, {"Host": pool.ep.server_name, **framed.headers})
        try:
            resp = await d.addTimeout(self.cfg.connect_timeout + 10, self.reactor)
        except Exception as e:
            conn.reusable = False
            pool.release(conn)
            raise NotSent(f"{pool.ep.name}: no token from {framed.path}: {e or type(e).__name__}") from None
        pool.release(conn)
        try:
            return gateway.token_answer(resp.status, resp.body)
        except gateway.Refused as e:
            raise NotSent(f"{pool.ep.name}: {e}") from None

    def _candidates(self, endpoint: str | None) -> list[_Pool]:
        if endpoint is None:
            return sorted(self.pools, key=lambda p: p.up is False)  # endpoints that are up first
        pinned = [p for p in self.pools if p.ep.name == endpoint]
        if not pinned:
            raise NotSent(f"endpoint {endpoint} is not configured (any more); nothing was sent")
        return pinned

    def _frame(self, ep: Endpoint, infno: str, body: bytes, trade_path: str | None,
               token: str | None, base_path: str | None = None) -> defer.Deferred[gateway.Framed]:
        """The request as the region's gateway wants it, a file in the region's form. Jilin's SM2 signature
        costs ~13 ms of CPU (pure Python), SM4 grows with the input, and a 9101 form decodes and re-encodes the
        whole upload: those are framed off the reactor thread."""
        multipart = self.cfg.file_upload == "multipart" and b'"fsUploadIn"' in body
        profile = self.cfg.profile

        def call() -> gateway.Framed:
            nonce = uuid.uuid4().hex if gateway.uses_nonce(profile) else ""
            framed = gateway.frame(profile, infno, body, base_path=base_path or ep.path, trade_path=trade_path,
                                   now=time.time(), nonce=nonce, secrets=self.secrets, token=token)
            # signatures are over headers, so the form is the last step (under Jilin's encryption the envelope
            # is sealed and goes as it is)
            form = fileform.upload_form(framed.body) if multipart else None
            return framed if form is None else \
                gateway.Framed(framed.path, {**framed.headers, "Content-Type": form[1]}, form[0])
        if profile.style == "jilin" or multipart:
            return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), call)
        return defer.succeed(call())

    def _exchange(self, pool: _Pool, conn: HTTPClientProtocol, infno: str, framed: gateway.Framed, timeout: float,
                  on_late: LateHandler | None) -> defer.Deferred[Delivery]:
        ep = pool.ep
        headers = {"Host": ep.server_name, **framed.headers, "X-Fep-Infno": infno}
        result: defer.Deferred[Delivery] = defer.Deferred()
        started = time.perf_counter()

        late_abort: list[Any] = []  # the late-grace abort, once armed

        def expire() -> None:
            # Whatever comes on this connection now is the late answer: it is never given to another
            # request, so neither a stray answer nor the abort below can reach another trade.
            conn.reusable = False
            late_abort.append(self.reactor.callLater(self.cfg.late_grace, conn.transport.abortConnection))
            result.errback(Unknown(f"{ep.name}: no answer within {timeout:g} s", ep.name))

        timer = self.reactor.callLater(timeout, expire)

        def done() -> None:
            for call in late_abort:
                if call.active():
                    call.cancel()
            pool.release(conn)

        def answered(resp: ClientResponse) -> None:
            done()
            if timer.active():
                timer.cancel()
                try:
                    result.callback(self._delivery(pool, resp, time.perf_counter() - started))
                except (Unknown, gateway.Refused) as e:
                    result.errback(e)
            elif on_late is not None:
                on_late(resp.body)

        def failed(f: Failure) -> None:
            done()
            if not timer.active():
                return  # the caller was told at the timeout
            timer.cancel()
            e = f.value
            if isinstance(e, TransportError) and not e.sent:
                pool.mark_up(False, str(e))
                result.errback(NotSent(f"{ep.name}: {e}"))
            else:
                result.errback(Unknown(f"{ep.name}: {e}", ep.name))

        conn.request(framed.path, framed.body, headers).addCallbacks(answered, failed)
        return result

    def _delivery(self, pool: _Pool, resp: ClientResponse, seconds: float) -> Delivery:
        ep = pool.ep
        pool.seconds.observe(seconds)
        try:
            resp.body = gateway.unframe(self.cfg.profile, resp.status, resp.body, self.secrets)
        except gateway.Unreadable as e:
            raise Unknown(f"{ep.name}: {e}", ep.name) from None
        if resp.status != 200:
            raise Unknown(f"{ep.name}: HTTP {resp.status} instead of an envelope", ep.name)
        if resp.headers.get("content-type", "").startswith(("application/octet-stream", "application/zip")):
            resp.body = envelope.file_answer(resp.body, resp.headers.get("content-disposition", ""))
        try:
            answer = envelope.parse_bureau_answer(resp.body)
        except envelope.BadAnswer as e:
            raise Unknown(f"{ep.name}: {e}", ep.name) from None
        return Delivery(answer, resp.body, ep.name, seconds)

    def close(self) -> None:
        for p in self.pools:
            p.close()


def _secrets(cfg: BureauSide) -> dict[str, tls.Secret]:
    secrets = tls.load_secrets(cfg.profile.secrets)
    try:
        gateway.check(cfg.profile, secrets)
    except gateway.BadSecret as e:
        raise tls.TLSConfigError(str(e)) from None
    return secrets


def _show_security(cfg: BureauSide) -> None:
    for mode in LINK_SECURITY:
        metrics.LINK_SECURITY.labels(mode).set(1 if mode == cfg.link_security else 0)
    if cfg.link_security != "mutual_tls":
        log.warn("the bureau link is {mode}, not mutual TLS, as bureau.link_security says", mode=cfg.link_security)
