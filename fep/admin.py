"""The admin side: a JSON API on a Unix socket only root and the `fep` group can open (for the `fep`
command), and Prometheus metrics on a loopback TCP port. A thin adapter over the engine."""

from __future__ import annotations

import pwd
import socket
import struct
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote

from prometheus_client.twisted import MetricsResource
from twisted.internet import defer, endpoints, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from fep import envelope, metrics, sockets
from fep.clearing import Clearing, ClearingError, group_of
from fep.engine import Engine, Refused
from fep.http11 import HTTPServerProtocol, Request, Response
from fep.journal import COLUMNS, TradeFilter, TradeRow
from fep.states import State, UNRESOLVED

log = Logger()
LIST_COLUMNS = [c for c in COLUMNS if c not in ("request", "answer", "late_answer", "payload_hash")]


def _time(value: str) -> float:
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, fmt).timestamp()
        except ValueError:
            pass
        except (OverflowError, OSError):  # a date the clock cannot hold (0001-01-01): was a 500
            raise Refused(400, f"the time {value!r} is out of range") from None
    raise Refused(400, f"cannot read the time {value!r}: use YYYY-MM-DD or YYYY-MM-DD HH:MM:SS")


MAX_LIMIT = 100_000  # rows one `fep trades` lists


def _msgid(req: Request, parts: list[str]) -> str:
    """The msgid a call names (POST /reverse/MSGID): its absence was an IndexError, a 500."""
    if len(parts) != 2 or not parts[1]:
        raise Refused(400 if len(parts) < 2 or not parts[1] else 404,
                      f"{req.method} /{parts[0]}/MSGID names one trade: got {req.path}")
    return parts[1]


def _object(req: Request) -> dict[str, Any]:
    """A call's JSON body, which must be an object (a list or a number was an AttributeError, a 500)."""
    try:
        body = envelope.loads(req.body) if req.body and req.body.strip() else {}
    except ValueError as e:
        raise Refused(400, f"the body of {req.method} {req.path} is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise Refused(400, f"the body of {req.method} {req.path} must be a JSON object, got {type(body).__name__}")
    return body


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Refused(400, f"{key} must be a string, got {envelope.dumps(value).decode()[:40]}")


def summary(row: TradeRow, full: bool = False) -> dict[str, Any]:
    out = {c: getattr(row, c) for c in (COLUMNS if full else LIST_COLUMNS)}
    out["created"] = datetime.fromtimestamp(row.created).strftime("%Y-%m-%d %H:%M:%S")
    out["updated"] = datetime.fromtimestamp(row.updated).strftime("%Y-%m-%d %H:%M:%S")
    if full:
        out["request"] = envelope.loads(row.request)
        for secret in envelope.SECRET_FIELDS:
            out["request"].pop(secret, None)
        out["answer"] = envelope.loads(row.answer) if row.answer else None
        out["late_answer"] = envelope.loads(row.late_answer) if row.late_answer else None
    return out


class AdminService:
    def __init__(self, engine: Engine, reload: Callable[[], Awaitable[str]],
                 extra: dict[str, Callable[[Request], Awaitable[Any]]] | None = None) -> None:
        self.engine = engine
        self._reload = reload
        self.extra = extra or {}  # routes other parts of fep add (reconciliation, catalog)

    async def handle(self, req: Request) -> Response:
        try:
            return Response(200, envelope.dumps(await self._route(req)))
        except Refused as e:
            return Response(e.status, envelope.dumps({"error": str(e)}))
        except ValueError as e:
            return Response(400, envelope.dumps({"error": str(e)}))

    async def _route(self, req: Request) -> Any:
        path, _, query = req.path.partition("?")
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        key = f"{req.method} {parts[0]}"
        if key == "GET status":
            return await self.status()
        if key == "GET trades" and len(parts) == 1:
            return await self.trades(args)
        if key == "GET trades":
            return await self.show(_msgid(req, parts))
        if key == "POST reverse":
            body = _object(req)
            return (await self.engine.reverse(_msgid(req, parts), _text(body, "infno"), _text(body, "psn_no"))).body
        if key == "POST replay":
            return (await self.engine.replay(_msgid(req, parts))).body
        if key == "POST drop":
            msgid, body = _msgid(req, parts), _object(req)
            return (await self.engine.drop(msgid, _text(body, "reason") or "")).body
        if key == "POST reload":
            return {"result": await self._reload()}
        if key in self.extra:
            return await self.extra[key](req)
        raise Refused(404, f"no admin call {req.method} {path}")

    async def status(self) -> dict[str, Any]:
        status = await self.engine.status()
        status["certificates"] = certificate_expiry(self.engine)
        last = await self.engine.journal.runs("reconcile")
        status["last_reconciliation"] = {k: last[0][k] for k in ("stmt_date", "run_at", "balanced", "unbalanced")
                                         } if last else None
        return status

    async def trades(self, args: dict[str, str]) -> list[dict[str, Any]]:
        state = args.get("state")
        if state is not None and state not in State.__members__:
            raise Refused(400, f"no state {state!r}; states are {', '.join(State.__members__)}")
        try:
            limit = int(args.get("limit", 100))
        except ValueError:
            raise Refused(400, f"limit must be a number, got {args['limit']!r}") from None
        if not 1 <= limit <= MAX_LIMIT:  # SQLite's integers end at 2^63: a bigger one was an OverflowError, a 500
            raise Refused(400, f"limit must be from 1 to {MAX_LIMIT}, got {limit}")
        rows = await self.engine.journal.find(TradeFilter(
            state=State(state) if state else None, psn_no=args.get("psn_no"), infno=args.get("infno"),
            since=_time(args["since"]) if "since" in args else None,
            until=_time(args["until"]) if "until" in args else None, limit=limit))
        return [summary(r) for r in rows]

    async def show(self, msgid: str) -> dict[str, Any]:
        row = await self.engine.journal.get(msgid)
        if row is None:
            raise Refused(404, f"no trade with msgid {msgid} in the journal")
        out = summary(row, full=True)
        out["history"] = [{"at": datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], "event": ev,
                           "state": st, "note": note} for at, ev, st, note in await self.engine.journal.history(msgid)]
        related = await self.engine.journal.resolving_trades(msgid)
        out["resolving_trades"] = [summary(r) for r in related]
        return out


def certificate_expiry(engine: Engine) -> dict[str, float]:
    """Seconds until each certificate expires, from the dates read when they were (re)loaded."""
    now = time.time()
    return {name: round(at - now) for name, at in engine.link.expires.items()}


class MetricsRefresher:
    """Gauges that are counts over the journal, refreshed every few seconds rather than per trade. They
    are read on the journal's reader threads, from the counts its triggers keep and from its index of
    states: a few index lookups, whatever the journal's size, and nothing on the writer."""

    def __init__(self, reactor: Any, engine: Engine) -> None:
        self.engine = engine
        self.loop = task.LoopingCall(lambda: defer.ensureDeferred(self._refresh()))
        self.loop.clock = reactor

    async def _refresh(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a failed refresh leaves the gauges as they were; the next one tries again
            log.failure("metrics refresh failed")

    async def refresh(self) -> None:
        journal = self.engine.journal
        counts = await journal.count_by_state()
        for state in State:
            metrics.TRADES_IN_STATE.labels(state.value).set(counts.get(state, 0))
        metrics.REPLAY_DEPTH.set(counts.get(State.QUEUED, 0))
        now = time.time()
        for gauge, states in ((metrics.REPLAY_OLDEST, {State.QUEUED}), (metrics.UNKNOWN_OLDEST, UNRESOLVED)):
            oldest = await journal.oldest(states)
            gauge.set(now - oldest if oldest else 0)
        metrics.JOURNAL_CANNOT_WRITE.set(1 if journal.cannot_write else 0)
        for name, seconds in certificate_expiry(self.engine).items():
            metrics.CERT_EXPIRY.labels(name).set(seconds)


def clearing_routes(clearing: Clearing) -> dict[str, Callable[[Request], Awaitable[Any]]]:
    """`fep clearing`: POST /clearing/apply|cancel|remote|paid (a JSON body naming the month, and the group
    where one is meant), GET /clearing/status?month=YYYY-MM. Applications, cancels and payments keep who
    made them: the socket's peer."""

    async def post(req: Request) -> Any:
        what, body = req.path.strip("/").split("/")[1:2], _object(req)
        month, by = _text(body, "month") or "", req.peer or "unknown"
        try:
            if what == ["apply"]:
                return await clearing.apply(month, by)
            if what == ["cancel"]:
                return await clearing.cancel(month, group_of(_text(body, "group")), by)
            if what == ["remote"]:
                return await clearing.remote(month)
            if what == ["paid"]:
                return await clearing.paid(month, group_of(_text(body, "group")), body.get("amount"),
                                           _text(body, "note") or "", by)
        except ClearingError as e:
            raise Refused(409, str(e)) from None
        raise Refused(404, "clearing calls: POST /clearing/apply|cancel|remote|paid, GET /clearing/status?month=")

    async def get(req: Request) -> Any:
        path, _, query = req.path.partition("?")
        if path.strip("/") != "clearing/status":
            raise Refused(404, "clearing calls: POST /clearing/apply|cancel|remote|paid, GET /clearing/status?month=")
        try:
            return await clearing.status({k: v[-1] for k, v in parse_qs(query).items()}.get("month", ""))
        except ClearingError as e:
            raise Refused(400, str(e)) from None

    return {"POST clearing": post, "GET clearing": get}


class AdminProtocol(HTTPServerProtocol):
    """Each request carries who is at the other end of the admin socket, as the kernel says (SO_PEERCRED):
    what a person enters by hand (a disbursement) keeps it."""

    def connectionMade(self) -> None:
        self._peer = peer_of(self.transport.getHandle())
        super().connectionMade()


def peer_of(sock: socket.socket) -> str:
    """"uid 1001 (zhang)" of a Unix-socket peer."""
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return ""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


async def listen(reactor: Any, service: AdminService, unix: Path, metrics_host: str, metrics_port: int,
                 group: str = "fep") -> None:
    unix.parent.mkdir(parents=True, exist_ok=True)
    if unix.exists():
        unix.unlink()
    factory = Factory.forProtocol(lambda: AdminProtocol(service.handle, max_body=1 << 20))
    await endpoints.UNIXServerEndpoint(reactor, str(unix), mode=0o660).listen(factory)
    sockets.chown_group(unix, group)  # only root and admin.unix_group (not the HIS socket's group) may open it
    root = Resource()
    root.putChild(b"metrics", MetricsResource())
    await endpoints.TCP4ServerEndpoint(reactor, metrics_port, interface=metrics_host).listen(Site(root))
