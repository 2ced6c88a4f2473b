"""The admin side: a JSON API on a Unix socket only root and the `fep` group can open (for the `fep`
command), and Prometheus metrics on a loopback TCP port. A thin adapter over the engine.

Every call that changes something (any POST) is an operator action: it goes into the audit trail with the
caller's uid, read from the socket's peer credentials (SO_PEERCRED), before it runs. A scrape of /metrics is
not logged: Prometheus scrapes every few seconds, and such lines would drown the ones that matter."""

from __future__ import annotations

import hashlib
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
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from fep import days, envelope, metrics, reconcile, replies, sockets
from fep.archive import Archive
from fep.audit import AuditTrail, user_name
from fep.clearing import Clearing, ClearingError, group_of
from fep.engine import Engine, Refused
from fep.http11 import HTTPServerProtocol, Request, Response
from fep.jobs import Job, Jobs
from fep.journal import COLUMNS, EVER, TradeFilter, TradeRow
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


def _until(value: str) -> float:
    """The end of a range: a day named alone (YYYY-MM-DD) means all of it, as the finance office means it."""
    end = _time(value)
    return end if len(value) != 10 else days.span(datetime.fromtimestamp(end).date())[1]


MAX_LIMIT = 100_000  # rows one `fep trades` lists
WAIT_HEADER = "x-fep-wait"  # seconds the caller waits for the answer; longer work goes on as a job (fep.jobs)


def _wait(req: Request) -> float | None:
    """The caller's wait, or None: it waits for the answer however long the work takes (as before jobs)."""
    text = req.headers.get(WAIT_HEADER)
    if text is None:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        raise Refused(400, f"the X-Fep-Wait header must be seconds, got {text!r}") from None


def _limit(args: dict[str, str]) -> int:
    try:
        limit = int(args.get("limit", 100))
    except ValueError:
        raise Refused(400, f"limit must be a number, got {args['limit']!r}") from None
    if not 1 <= limit <= MAX_LIMIT:  # SQLite's integers end at 2^63: a bigger one was an OverflowError, a 500
        raise Refused(400, f"limit must be from 1 to {MAX_LIMIT}, got {limit}")
    return limit


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


def _action(req: Request) -> tuple[str, dict[str, Any]]:
    """What an operator asked for, as the audit trail keeps it: the call and its arguments. A body that is not a
    JSON object (a mapping CSV) is kept as its size and digest: what was loaded can be matched to a file."""
    parts = [unquote(p) for p in req.path.partition("?")[0].strip("/").split("/")]
    action = " ".join(parts[:2]) if parts[0] == "catalog" else parts[0]
    args: dict[str, Any] = {"msgid": parts[1]} if len(parts) == 2 and parts[0] != "catalog" else {}
    try:
        body = envelope.loads(req.body) if req.body and req.body.strip() else {}
    except ValueError:
        body = None
    if isinstance(body, dict):
        args.update(body)
    else:
        args["body"] = {"bytes": len(req.body), "lines": req.body.count(b"\n"),
                        "sha256": hashlib.sha256(req.body).hexdigest()}
    return action, args


def _outcome(status: int, doc: Any) -> str:
    """What the audit trail keeps: fep's refusal, the bureau's (a 200 carrying its infcode, as a reversal the
    bureau refused: nothing was undone), or ok."""
    if status == 200 and isinstance(doc, dict) and replies.outcome(doc) == "refused":
        return f"refused by the bureau (infcode {doc.get('infcode')}): {doc.get('err_msg') or ''}".rstrip()
    if status == 200:
        return "ok"
    error = doc.get("error") if isinstance(doc, dict) else None
    return f"refused ({status}): {error}" if error else f"refused ({status})"


def _merged(journal: list[TradeRow], archived: list[TradeRow]) -> list[TradeRow]:
    """One row per trade. A trade is in both after a restore (a backup made before the archive job moved it
    became the journal again, and its archive file stayed): the journal's row is the live one."""
    live = {r.msgid for r in journal}
    return journal + [r for r in archived if r.msgid not in live]


class AdminService:
    def __init__(self, engine: Engine, reload: Callable[[], Awaitable[str]],
                 extra: dict[str, Callable[[Request], Awaitable[Any]]] | None = None,
                 archive: Archive | None = None, audit: AuditTrail | None = None) -> None:
        self.engine = engine
        self._reload = reload
        self.extra = extra or {}  # routes other parts of fep add (reconciliation, catalog)
        self.started = time.time()
        self.archive = archive  # where finished trades older than journal.keep_days are read
        self.audit = audit  # where operator actions are kept (fep run always gives one)
        self.jobs = Jobs(engine.journal)

    async def handle(self, req: Request, uid: int | None = None) -> Response:
        """The answer; or, for work that outlasts the caller's X-Fep-Wait, 202 and the job it goes on as.
        `uid`: the caller's, from the socket's peer credentials, for the audit trail."""
        try:
            wait = _wait(req)
        except Refused as e:
            return Response(e.status, envelope.dumps({"error": str(e)}))
        if wait is None or req.path.startswith("/jobs"):
            status, doc = await self._audited(req, uid, wait)
            return Response(status, envelope.dumps(doc))
        job = Job(f"{req.method} {req.path.partition('?')[0]}")
        job.run(lambda: self._audited(req, uid, None))
        if await job.wait(self.engine.reactor, wait):
            return Response(job.status or 500, envelope.dumps(job.result))
        await self.jobs.add(job)
        return Response(202, envelope.dumps(job.summary()))

    async def _audited(self, req: Request, uid: int | None, wait: float | None) -> tuple[int, Any]:
        """An operator's action is kept before it runs and its outcome when it ends (a job's too)."""
        if req.method == "GET" or self.audit is None:
            return await self._answer(req, wait)
        action, args = _action(req)
        entry = await self.audit.begin(uid, action, args)
        status, doc = 500, {"error": f"internal error in fep during {req.method} {req.path} (logged)"}
        try:
            status, doc = await self._answer(req, wait)
        finally:  # whatever ended it: an action that failed inside fep is not left "under way"
            await self.audit.end(entry, uid, action, args, _outcome(status, doc))
        return status, doc

    async def _answer(self, req: Request, wait: float | None) -> tuple[int, Any]:
        try:
            return 200, await self._route(req, wait)
        except Refused as e:
            return e.status, {"error": str(e)}
        except ValueError as e:
            return 400, {"error": str(e)}

    async def _route(self, req: Request, wait: float | None = None) -> Any:
        path, _, query = req.path.partition("?")
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        key = f"{req.method} {parts[0]}"
        if key == "GET status" and args.get("only") == "role":  # keepalived's check: nothing read, answered at once
            return self.engine.role_view()
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
        if key == "GET audit":
            return await self.audit_entries(args)
        if key == "GET jobs" and len(parts) == 1:
            return [j.summary() | {"result": None} for j in self.jobs.jobs.values()]
        if key == "GET jobs":
            return await self.job(parts[1] if len(parts) == 2 else "/".join(parts[1:]), wait or 0)
        if key in self.extra:
            return await self.extra[key](req)
        raise Refused(404, f"no admin call {req.method} {path}")

    async def status(self) -> dict[str, Any]:
        status = await self.engine.status()
        status["certificates"] = certificate_expiry(self.engine)
        oldest = await self.engine.journal.oldest(UNRESOLVED)
        status["oldest_unresolved_seconds"] = round(time.time() - oldest, 1) if oldest else None
        status["bureau_link"] = self.engine.link.security  # server_tls or plain_http show here, and in the metrics
        last = await self.engine.journal.runs("reconcile")
        status["last_reconciliation"] = {**{k: last[0].get(k) for k in ("stmt_date", "run_at", "balanced", "unbalanced")},
                                         "unresolved": len(last[0].get("unresolved", []))} if last else None
        # each watched day by its latest run: reconciling another day hides no difference (fep.health)
        status["days_not_balanced"] = reconcile.not_balanced(await reconcile.latest_of_each_day(self.engine.journal))
        # What `fep status --check` needs to tell a reconciliation that did not run (fep.health).
        status["reconcile_daily_at"] = self.engine.cfg.reconcile_at
        status["up_seconds"] = round(time.time() - self.started)
        return status

    async def trades(self, args: dict[str, str]) -> list[dict[str, Any]]:
        state = args.get("state")
        if state is not None and state not in State.__members__:
            raise Refused(400, f"no state {state!r}; states are {', '.join(State.__members__)}")
        limit = _limit(args)
        f = TradeFilter(state=State(state) if state else None, psn_no=args.get("psn_no"), infno=args.get("infno"),
                        since=_time(args["since"]) if "since" in args else None,
                        until=_until(args["until"]) if "until" in args else None, limit=limit)
        rows = await self.engine.journal.find(f)
        if self.archive is not None:  # the newest `limit` of the journal's and the archive files' together
            rows = sorted(_merged(rows, await self.archive.find(f)), key=lambda r: (r.created, r.id))[-limit:]
        return [summary(r) for r in rows]

    async def job(self, text: str, wait: float) -> dict[str, Any]:
        """A job's state, waiting up to `wait` seconds for it to finish."""
        job = self.jobs.get(int(text)) if text.isdigit() else None
        if job is None:
            raise Refused(404, f"no job {text} (jobs are kept in memory: a restart of fep forgets them, not their "
                               f"results)")
        await job.wait(self.engine.reactor, wait)
        return job.summary()

    async def show(self, msgid: str) -> dict[str, Any]:
        journal = self.engine.journal
        row = await journal.get(msgid)
        if row is not None:
            history, related = await journal.history(msgid), await journal.resolving_trades(msgid)
            where = None
        elif self.archive is not None and (found := await self.archive.get(msgid)) is not None:
            row, history, related, where = found
        else:
            raise Refused(404, f"no trade with msgid {msgid} in the journal or its archive")
        out = summary(row, full=True)
        out["archive"] = where  # the archive file (or archived_trades) it was read from; None: the journal
        out["history"] = [{"at": datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], "event": ev,
                           "state": st, "note": note} for at, ev, st, note in history]
        out["resolving_trades"] = [summary(r) for r in related]
        return out

    async def audit_entries(self, args: dict[str, str]) -> list[dict[str, Any]]:
        since = _time(args["since"]) if "since" in args else EVER[0]
        until = _until(args["until"]) if "until" in args else EVER[1]
        if self.audit is None:
            raise Refused(404, "this fep keeps no audit trail")
        return await self.audit.between(since, until, _limit(args))


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
        self._restored = False
        self._busy: defer.Deferred[None] | None = None  # the refresh under way
        self.loop = task.LoopingCall(self._refresh)
        self.loop.clock = reactor

    def _refresh(self) -> defer.Deferred[None]:
        self._busy = defer.ensureDeferred(self.refresh()).addErrback(self._failed)
        return self._busy

    @staticmethod
    def _failed(f: Failure) -> None:  # a failed refresh leaves the gauges as they were; the next one tries again
        log.failure("metrics refresh failed", f)

    async def stop(self) -> None:
        """No more refreshes; returns once the one under way (reading the journal) is done, so the journal can
        close without it failing."""
        if self.loop.running:
            self.loop.stop()
        busy, self._busy = self._busy, None
        if busy is not None and not busy.called:
            await busy

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
        metrics.RECONCILE_DAILY.set(1 if self.engine.cfg.reconcile_at else 0)
        if not self._restored:
            await self._restore_reconciliation()

    async def _restore_reconciliation(self) -> None:
        """The last reconciliation's time and result from the journal, once: a restart must not read as
        "never reconciled" (FepReconciliationNotRun). Each run sets them from then on (fep.reconcile)."""
        last = await self.engine.journal.runs("reconcile")
        if last and "run_at" in last[0]:  # a run kept by an early release may lack the time and the counts
            metrics.RECONCILED_AT.set(datetime.strptime(last[0]["run_at"], "%Y-%m-%d %H:%M:%S").timestamp())
        reconcile.show_groups(await reconcile.latest_of_each_day(self.engine.journal))
        self._restored = True


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process on the other end of a Unix socket, as the kernel knows it (SO_PEERCRED)."""
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except OSError:
        return None
    return uid


class AdminConnection(HTTPServerProtocol):
    """One connection to the admin socket: its calls are made as the uid that opened it."""

    def __init__(self, service: AdminService) -> None:
        self.uid: int | None = None
        super().__init__(lambda req: service.handle(req, self.uid), max_body=1 << 20)

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.uid = peer_uid(self.transport.getHandle())
        # what a person enters by hand (a disbursement) keeps who entered it: "uid 1001 (zhang)"
        self._peer = "" if self.uid is None else f"uid {self.uid} ({user_name(self.uid)})"
        super().connectionMade()


class QuietSite(Site):
    def log(self, request: Any) -> None:
        """A scrape is not an event: no access line."""


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


async def listen(reactor: Any, service: AdminService, unix: Path, metrics_host: str, metrics_port: int,
                 group: str = "fep") -> None:
    unix.parent.mkdir(parents=True, exist_ok=True)
    if unix.exists():
        unix.unlink()
    factory = Factory.forProtocol(lambda: AdminConnection(service))
    await endpoints.UNIXServerEndpoint(reactor, str(unix), mode=0o660).listen(factory)
    sockets.chown_group(unix, group)  # only root and admin.unix_group (not the HIS socket's group) may open it
    root = Resource()
    root.putChild(b"metrics", MetricsResource())
    await endpoints.TCP4ServerEndpoint(reactor, metrics_port, interface=metrics_host).listen(QuietSite(root))
