"""The engine: the one place that decides what happens to a trade.

It moves trades through the machine in fep.states, one durable journal write per transition:
the request is journalled (SENT) before the first byte leaves, the answer (ANSWERED) before the HIS
hears it. An unknown outcome is resolved as conf/trades.yaml says (2601, resend, dedicated cancel,
person), repeated with backoff until the bureau settles it. Deferrable trades wait in QUEUED while the
bureau is unreachable and are replayed in order per insured person. Money-moving trades of one person
go one at a time. Recovery on start is reading states: nothing is guessed.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Any, AsyncIterator

from twisted.internet import defer, task
from twisted.logger import Logger

from fep import envelope, metrics
from fep.bureau import BureauLink, Delivery, NotSent, Unknown
from fep.trades import Kind, OnUnknown, TradeDef
from fep.config import Config
from fep.journal import IllegalTransition, Journal, NewTrade, TradeRow
from fep.codebook import CodeBook
from fep.msgid import well_formed
from fep.replies import Reply, reply
from fep.states import IN_FORCE, State

log = Logger()
S = State
SETTLE_WAIT = 5.0  # seconds a settlement waits for the person's queued uploads before it is refused
SIGN_IN_RETRY = 10.0  # seconds between sign-in attempts while they fail (each is a journalled 9001)


class Refused(Exception):
    """fep will not take this request; nothing was journalled for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Engine:
    def __init__(self, reactor: Any, cfg: Config, journal: Journal, link: BureauLink,
                 codes: CodeBook | None = None) -> None:
        self.reactor = reactor
        self.codes = codes
        self.cfg = cfg
        self.trades = cfg.trades
        self.journal = journal
        self.link = link
        self._lanes: dict[str, defer.DeferredLock] = {}
        self._driving: set[str] = set()
        self._queues: dict[str, deque[str]] = {}  # psn_no -> msgids in QUEUED or parked, in arrival order
        self._draining: set[str] = set()
        self._sign_no = ""
        self._signed_on: date | None = None
        self._signing: defer.Deferred[None] | None = None
        self._sign_in_after = 0.0  # monotonic time before which a failed sign-in is not tried again
        self._poll: task.LoopingCall | None = None
        self._confirm_timers: dict[str, Any] = {}
        self._fresh: set[str] = set()  # resolving trades journalled by this process and not yet sent

    # ---- start and stop ------------------------------------------------------------------------
    async def start(self) -> None:
        """Recovery: read every open trade's state and pick it up. Runs before the listeners open."""
        parked = await self.journal.select("state='NEEDS_ATTENTION' AND related IS NULL")
        rows = sorted(await self.journal.open_trades() + parked, key=lambda r: r.id)
        for row in rows:
            await self._recover(row)
        self._poll = task.LoopingCall(self._tick)
        self._poll.clock = self.reactor
        self._poll.start(1.0, now=False)
        defer.ensureDeferred(self._ensure_signed_in())

    async def _recover(self, row: TradeRow) -> None:
        if row.related:  # a resolving trade is driven by the trade it resolves
            return
        if row.state is S.SENT:
            await self.journal.transition(row.msgid, "lost", note="fep stopped while it was at the bureau")
            row.state = S.UNKNOWN
        if self.trades.get(row.infno).deferrable and row.state is not S.AWAITING_CONFIRM:
            # Queued, parked or unresolved: later deferred work of the person waits behind it.
            self._queues.setdefault(row.psn_no or "", deque()).append(row.msgid)
        if row.state in (S.UNKNOWN, S.RESOLVING):
            self._spawn(self._resolve(row.msgid))
        elif row.state is S.AWAITING_CONFIRM:
            self._arm_confirm(row.msgid, row.deadline or time.time())

    def reconfigure(self, cfg: Config) -> None:
        """A reload: trades already under way keep the definitions they started with."""
        self.cfg, self.trades = cfg, cfg.trades

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for timer in self._confirm_timers.values():
            if timer.active():
                timer.cancel()

    def _tick(self) -> None:
        """Once a second: replay the queues (while the link is down, one of them probes it); sign in
        again when the day changes."""
        if self.link.down:
            if self._queues and not self._draining:
                # Probe with a different person each time: one whose head is parked sends nothing.
                psn = next(iter(self._queues))
                self._queues[psn] = self._queues.pop(psn)
                self._kick(psn)
        else:
            self._kick_all()
        if self._signed_on != date.today():
            defer.ensureDeferred(self._ensure_signed_in())

    def _kick_all(self) -> None:
        for psn in list(self._queues):
            self._kick(psn)

    # ---- HIS entry points ----------------------------------------------------------------------
    async def submit(self, req: envelope.HisRequest) -> Reply:
        started = time.perf_counter()
        answer_by = time.time() + self.cfg.his.answer_budget  # what the HIS was told it may wait
        trade = self.trades.get(req.infno)
        trade.validate(req.input)
        msgid = req.msgid if req.msgid and well_formed(req.msgid) else None
        psn = envelope.find_psn_no(req.input)
        if trade.person_ordered and psn:
            if trade.moves_money and self._queues.get(psn):  # before the lane: the uploads need it to go
                await self._after_deferred_work(trade, msgid, psn, answer_by)
            async with self._lane(psn):
                result = await self._submit(trade, req, msgid, psn, answer_by)
        else:
            result = await self._submit(trade, req, msgid, psn, answer_by)
        metrics.TRADES.labels(trade.infno, result.body.get("fep_state", "?")).inc()
        metrics.TRADE_SECONDS.labels(trade.infno).observe(time.perf_counter() - started)
        return result

    async def lookup(self, msgid: str) -> Reply:
        row = await self.journal.get(msgid)
        if row is None:
            raise Refused(404, f"no trade with msgid {msgid} in the journal")
        return self._reply(row)

    async def confirm(self, msgid: str) -> Reply:
        """The HIS recorded a settlement that has a confirmation window."""
        row = await self.journal.get(msgid)
        if row is None:
            raise Refused(404, f"no trade with msgid {msgid} in the journal")
        if row.state is S.AWAITING_CONFIRM:
            try:
                await self.journal.transition(msgid, "confirm", note="confirmed by the HIS")
            except IllegalTransition:
                pass  # the window closed in the meantime; the reply shows what happened
            timer = self._confirm_timers.pop(msgid, None)
            if timer is not None and timer.active():
                timer.cancel()
        elif row.state is not S.CONFIRMED:
            raise Refused(409, f"trade {msgid} is {row.state}, not awaiting confirmation")
        return self._reply(await self.journal.get(msgid))

    # ---- what a person does (admin socket) ---------------------------------------------------------
    async def reverse(self, omsgid: str, oinfno: str | None = None, psn_no: str | None = None) -> Reply:
        """Undo a trade the bureau holds but this box does not hold as done (单边账), by 2601.

        The 2601 is a trade of its own, through the normal path: journalled, and resent with its msgid
        until the bureau answers. It obeys refund order like a cancel."""
        row = await self.journal.get(omsgid)
        if row is not None:
            if row.state in IN_FORCE and row.setl_id:
                raise Refused(409, f"{omsgid} is settled in the journal ({row.setl_id}): refund it with its cancel "
                                   f"(2208/2305) from the HIS; fep reverse is for trades the journal does not hold")
            oinfno, psn_no = oinfno or row.infno, psn_no or row.psn_no
        if not oinfno or not psn_no:
            raise Refused(400, f"{omsgid} is not in the journal: give its trade number and psn_no "
                               f"(they are in the reconciliation detail)")
        if self.trades.get(oinfno).kind is not Kind.UNDO_MONEY:  # undoing a cancel is not a refund
            await self._check_later_settlements(psn_no, _msgid_time(omsgid), f"the reversal of {omsgid}")
        req = envelope.HisRequest("2601", None, {"infno": "2601", "opter": "fep-admin", "opter_name": "fep admin",
                                                 "input": {"data": {"psn_no": psn_no, "omsgid": omsgid,
                                                                    "oinfno": oinfno}}})
        return await self.submit(req)

    async def replay(self, msgid: str) -> Reply:
        """A person sends a parked trade on: a deferred item back to its queue, or a resolution tried afresh."""
        row = await self.journal.get(msgid)
        if row is None or row.state is not S.NEEDS_ATTENTION:
            raise Refused(409, f"{msgid} is {row.state if row else 'not in the journal'}, not NEEDS_ATTENTION")
        trade = self.trades.get(row.infno)
        if trade.deferrable and not row.resolver and row.answer:
            await self.journal.transition(msgid, "release", note="released by a person", attempts=0)
            self._kick(row.psn_no or "")
        else:
            await self.journal.transition(msgid, "reopen", note="reopened by a person", attempts=0)
            self._spawn(self._resolve(msgid))
        return self._reply(await self.journal.get(msgid))

    async def status(self) -> dict[str, Any]:
        counts = await self.journal.count_by_state()
        oldest = await self.journal.select("state='QUEUED' ORDER BY id LIMIT 1")
        parked = await self.journal.select("state='NEEDS_ATTENTION' ORDER BY id")
        return {
            "endpoints": [{"name": p.ep.name, "url": p.ep.url, "up": p.up} for p in self.link.pools],
            "signed_in": self._signed_on == date.today(), "sign_no": self._sign_no,
            "trades_by_state": counts,
            "queued": counts.get(S.QUEUED, 0),
            "oldest_queued_seconds": round(time.time() - oldest[0].created, 1) if oldest else None,
            "needs_attention": [{"msgid": r.msgid, "infno": r.infno, "since": _when(r.updated), "note": r.note}
                                for r in parked],
        }

    # ---- the normal path ------------------------------------------------------------------------
    async def _submit(self, trade: TradeDef, req: envelope.HisRequest, msgid: str | None,
                      psn: str | None, answer_by: float) -> Reply:
        digest = envelope.payload_hash(req.envelope)  # what the HIS sent, before fep maps anything
        if trade.map_codes and self.codes is not None:
            self.codes.map_fees(trade, req.input)
        if trade.kind is Kind.UNDO_MONEY and psn and not await self._journalled(msgid):
            await self._check_refund_order(req.input, psn)
        await self._ensure_signed_in()
        queue_it = trade.deferrable and (self.link.down or bool(self._queues.get(psn or "")))
        new = NewTrade(trade.infno, msgid, psn, S.QUEUED if queue_it else S.SENT, digest,
                       self._complete(req.envelope))
        acc = await self.journal.accept(new)
        if not acc.created:
            return await self._resubmitted(trade, acc.row, digest, answer_by)
        if queue_it:
            self._enqueue(acc.row)
            return self._reply(acc.row)
        return await self._forward(trade, acc.row, answer_by)

    def _complete(self, his_envelope: dict[str, Any]) -> dict[str, Any]:
        """Fill what the box owns; keep what the HIS says of itself."""
        inst = self.cfg.institution
        env = dict(his_envelope)
        env.pop("msgid", None)
        env.update(fixmedins_code=inst.fixmedins_code, fixmedins_name=inst.fixmedins_name,
                   sign_no=self._sign_no, inf_time=envelope.inf_time(datetime.now()))
        for key, value in (("mdtrtarea_admvs", inst.mdtrtarea_admvs), ("recer_sys_code", inst.recer_sys_code),
                           ("infver", inst.infver), ("insuplc_admdvs", ""), ("opter_type", "1"),
                           ("opter", "fep"), ("opter_name", "fep")):
            if not env.get(key):
                env[key] = value
        return env

    def _refreshed(self, row: TradeRow) -> str:
        """A trade that never left is sent with today's session, not the one it was accepted under."""
        env = row.envelope
        env.update(sign_no=self._sign_no, inf_time=envelope.inf_time(datetime.now()))
        return envelope.dumps(env).decode("utf-8")

    async def _resubmitted(self, trade: TradeDef, row: TradeRow, digest: str, answer_by: float) -> Reply:
        if row.payload_hash != digest:
            raise Refused(422, f"msgid {row.msgid} was already used for a different trade ({row.infno}); "
                               f"a msgid names one trade forever")
        if row.state is S.NOT_SENT:  # it never left the box: this submission may send it
            request = self._refreshed(row)
            await self.journal.transition(row.msgid, "retry", note="sent again by the HIS", request=request)
            row.request, row.state = request, S.SENT
            return await self._forward(trade, row, answer_by)
        return self._reply(row, resubmitted=True)

    async def _forward(self, trade: TradeDef, row: TradeRow, answer_by: float | None = None) -> Reply:
        """Send a journalled trade (state SENT) and record what became of it.

        Timeouts are layered: the bureau's (per trade) lies inside what the HIS was told it may wait. A
        trade that waited for its person's lane until the bureau's timeout no longer fits is not sent."""
        left = answer_by - time.time() if answer_by is not None else trade.timeout
        if left < trade.timeout:
            return await self._not_sent(trade, row, f"only {left:.1f} s of the HIS's {self.cfg.his.answer_budget:g} s "
                                                    f"were left, and the bureau may take {trade.timeout:g} s")
        try:
            delivery = await self._send(trade, row)
        except NotSent as e:
            return await self._not_sent(trade, row, str(e))
        except Unknown as e:
            return await self._lost(trade, row, str(e))
        return await self._answered(trade, row, delivery)

    async def _lost(self, trade: TradeDef, row: TradeRow, why: str) -> Reply:
        """It was sent and no valid answer came: record it, and start resolving it."""
        await self.journal.transition(row.msgid, "lost", note=why)
        queue = self._queues.setdefault(row.psn_no or "", deque())
        if trade.deferrable and row.msgid not in queue:  # until resolved, the person's later work waits
            queue.append(row.msgid)  # (a replayed item is at the head already)
        metrics.UNKNOWN_OUTCOMES.labels(trade.infno).inc()
        log.warn("{infno} {msgid}: outcome unknown: {why}", infno=trade.infno, msgid=row.msgid, why=why)
        return await self._start_resolving(trade, row.msgid, why)

    def _send(self, trade: TradeDef, row: TradeRow) -> defer.Deferred[Delivery]:
        return defer.ensureDeferred(self.link.send(trade.infno, row.request.encode("utf-8"), trade.timeout,
                                                   trade.path, on_late=lambda body: self._late(row, body)))

    def _late(self, row: TradeRow, body: bytes) -> None:
        """An answer after fep gave up waiting never changes what was decided; it is kept for reconciliation."""
        metrics.LATE_ANSWERS.labels(row.infno).inc()
        log.warn("{infno} {msgid}: late answer from the bureau stored; the decision already taken stands",
                 infno=row.infno, msgid=row.msgid)
        self._spawn(self.journal.store_late_answer(row.msgid, body.decode("utf-8", "replace")))

    async def _not_sent(self, trade: TradeDef, row: TradeRow, why: str) -> Reply:
        if trade.deferrable:
            await self.journal.transition(row.msgid, "requeue", note=f"bureau unreachable: {why}")
            row.state = S.QUEUED
            self._enqueue(row)
            return self._reply(row)
        failure = envelope.local_failure(f"bureau unreachable, nothing was sent: {why}", datetime.now())
        answer = envelope.dumps(failure).decode("utf-8")
        await self.journal.transition(row.msgid, "not_sent", note=why, answer=answer)
        row.state, row.answer, row.note = S.NOT_SENT, answer, why
        return self._reply(row)

    async def _answered(self, trade: TradeDef, row: TradeRow, delivery: Delivery, his_waiting: bool = True) -> Reply:
        """Store the bureau's answer. `his_waiting`: the HIS is hearing this answer now; when it is not
        (a replay, a resend), a refused deferrable trade is parked for a person instead of just stored."""
        ans = delivery.answer
        fields: dict[str, Any] = {"answer": delivery.body.decode("utf-8"), "endpoint": delivery.endpoint}
        if ans.ok and trade.moves_money:
            fields.update(_settlement(trade, row, ans))
        event = "answer"
        if ans.ok and trade.confirm_within:
            event, fields["deadline"] = "answer_held", time.time() + trade.confirm_within
        elif not ans.ok and not his_waiting and trade.deferrable:
            event = "give_up"  # nobody hears this refusal: parked, later items of the person wait
            fields["note"] = f"the bureau refused the replayed trade: {ans.err_msg}"
        note = fields.pop("note", None)
        await self.journal.transition(row.msgid, event, note=note, **fields)
        if not ans.ok and self._not_signed_in(ans):
            self._signed_on, self._sign_in_after = None, 0.0  # sign in again before the next trade
        if event == "answer_held":
            self._arm_confirm(row.msgid, fields["deadline"])
        row.answer, row.endpoint, row.note = fields["answer"], delivery.endpoint, note
        row.state = {"answer": S.ANSWERED, "answer_held": S.AWAITING_CONFIRM, "give_up": S.NEEDS_ATTENTION}[event]
        row.deadline = fields.get("deadline", row.deadline)
        result = self._reply(row, answer=ans.raw)
        if row.state is S.ANSWERED:  # the common case: pass the bureau's bytes through, fep's fields added
            result.raw = envelope.splice(delivery.body, {k: v for k, v in result.body.items() if k.startswith("fep_")})
        return result

    async def _after_deferred_work(self, trade: TradeDef, msgid: str | None, psn: str, answer_by: float) -> None:
        """A settlement goes after the person's earlier uploads, never past them: the bureau would settle
        without their fees. It waits a little while they go; if one is parked, or they are still not
        through after SETTLE_WAIT, the HIS hears what is in the way. A bureau that is unreachable is not
        waited for: the settlement then fails as not sent, like any other."""
        if await self._journalled(msgid):
            return  # a resubmission: it gets what the first submission got
        waited_until = min(answer_by - trade.timeout, time.time() + SETTLE_WAIT)
        self._kick(psn)  # the uploads go now if they can
        while self._queues.get(psn):
            if self.link.down and psn not in self._draining:
                return  # the bureau is unreachable: the settlement fails as not sent; money never waits
            head = await self.journal.get(self._queues[psn][0])
            if head is not None and head.state is S.NEEDS_ATTENTION or time.time() >= waited_until:
                queue = self._queues.get(psn) or deque()
                what = f"{head.infno} {head.msgid} is {head.state}" if head else "the first is unknown"
                raise Refused(409, f"{len(queue)} earlier trade(s) of this person have not reached the bureau "
                                   f"({what}); the settlement would not include them. Send it again once they "
                                   f"are delivered")
            self._kick(psn)
            await task.deferLater(self.reactor, 0.05)

    # ---- refund order (逐笔按序退款) ----------------------------------------------------------------
    async def _settlements_in_force(self, psn: str) -> list[TradeRow]:
        """The person's settlements the bureau holds and that are not cancelled, oldest first."""
        money = {t.infno for t in self.trades.defs.values() if t.kind is Kind.MONEY}
        in_force = ", ".join(f"'{s.value}'" for s in IN_FORCE)
        rows = await self.journal.select(
            f"psn_no=? AND state IN ({in_force}) AND setl_id IS NOT NULL ORDER BY id", [psn])
        cancelled = {r.cancels for r in rows if r.cancels}
        return [r for r in rows if r.infno in money and r.setl_id not in cancelled]

    async def _check_refund_order(self, input_: dict[str, Any], psn: str) -> None:
        """A cancel is refused while a later settlement of the same person is still in force."""
        setl_id = str(next((n.get("setl_id") for n in input_.values() if isinstance(n, dict)), "") or "")
        settlements = await self._settlements_in_force(psn)
        ids = [r.setl_id for r in settlements]
        if setl_id not in ids:
            return  # not settled through this box: the bureau decides
        _refuse_if_later(settlements[ids.index(setl_id) + 1:], setl_id)

    async def _check_later_settlements(self, psn: str, second: float, what: str) -> None:
        """`second`: when the trade was made, to the second (a msgid's stamp); only what came after that
        whole second is provably later."""
        _refuse_if_later([r for r in await self._settlements_in_force(psn) if r.created >= second + 1], what)

    # ---- unknown outcomes ------------------------------------------------------------------------
    async def _start_resolving(self, trade: TradeDef, msgid: str, why: str) -> Reply:
        """Called with the trade in UNKNOWN. The HIS hears at once what is being done about it."""
        if trade.on_unknown is OnUnknown.PERSON:
            await self.journal.transition(msgid, "give_up", note=f"outcome unknown ({why}); a person decides")
        elif trade.on_unknown in (OnUnknown.REVERSE, OnUnknown.CANCEL):
            row = await self.journal.get(msgid)
            await self._journal_resolver(msgid, self._resolving_trade(trade, row), f"outcome unknown ({why})")
        self._spawn(self._resolve(msgid))
        return self._reply(await self.journal.get(msgid))

    async def _journal_resolver(self, msgid: str, child: NewTrade, note: str, event: str = "resolve",
                                **fields: Any) -> None:
        acc = await self.journal.resolve_with(msgid, child, note, event, **fields)
        self._fresh.add(acc.row.msgid)

    def _resolving_trade(self, trade: TradeDef, row: TradeRow) -> NewTrade:
        orig = row.envelope
        if trade.on_unknown is OnUnknown.REVERSE:
            infno = "2601"
            input_ = {"data": {"psn_no": row.psn_no or "", "omsgid": row.msgid, "oinfno": row.infno}}
        else:
            infno = trade.cancel.infno  # type: ignore[union-attr]
            input_ = trade.cancel_input(orig["input"])
        # The reversal travels in the original's envelope: same insured place, same operator.
        env = self._complete({k: v for k, v in orig.items() if k in (
            "insuplc_admdvs", "mdtrtarea_admvs", "recer_sys_code", "infver", "opter_type", "opter",
            "opter_name")} | {"infno": infno, "input": input_})
        return NewTrade(infno, None, row.psn_no, S.SENT, envelope.payload_hash(env), env, related=row.msgid)

    async def _resolve(self, msgid: str) -> None:
        """Drive one unknown outcome to a final state, with backoff, across restarts."""
        if msgid in self._driving:
            return
        self._driving.add(msgid)
        try:
            while True:
                row = await self.journal.get(msgid)
                if row is None or row.state not in (S.UNKNOWN, S.RESOLVING):
                    return
                trade = self.trades.get(row.infno)
                if trade.on_unknown is OnUnknown.RESEND:
                    done = await self._resend(trade, row)
                else:
                    done = await self._attempt_resolver(trade, row)
                if done:
                    return
        except Exception:
            log.failure("resolving {msgid} failed; it stays open and is picked up at the next start", msgid=msgid)
        finally:
            self._driving.discard(msgid)

    def _backoff(self, tries: int) -> float:
        steps = self.cfg.resolution.backoff
        return steps[min(tries, len(steps) - 1)] if steps else 1.0

    async def _pause(self, tries: int) -> None:
        delay = self._backoff(tries)
        if delay > 0:
            await task.deferLater(self.reactor, delay)

    async def _resend(self, trade: TradeDef, row: TradeRow) -> bool:
        """Send the same msgid again: the bureau answers a repeated msgid with its first answer."""
        if row.attempts >= self.cfg.resolution.max_tries:
            await self.journal.transition(row.msgid, "give_up", note=f"no answer after {row.attempts} tries")
            return True
        await self._pause(row.attempts)
        async with self._lane_for(trade, row):
            await self.journal.transition(row.msgid, "resend", note="sent again with the same msgid",
                                          attempts=row.attempts + 1)
            row.state, row.attempts = S.SENT, row.attempts + 1
            try:
                delivery = await self._send(trade, row)
            except (NotSent, Unknown) as e:
                await self.journal.transition(row.msgid, "lost", note=str(e))
                return False
            await self._answered(trade, row, delivery, his_waiting=False)
        if trade.deferrable:
            self._kick(row.psn_no or "")
        return True

    async def _attempt_resolver(self, trade: TradeDef, row: TradeRow) -> bool:
        """One try of the resolving trade (2601 or the dedicated cancel) of `row`."""
        if row.state is S.UNKNOWN:  # stopped between "lost" and "resolve"
            await self._journal_resolver(row.msgid, self._resolving_trade(trade, row), "resolving")
            return False
        child = await self.journal.get(row.resolver or "")
        assert child is not None, f"{row.msgid} is RESOLVING without a resolving trade"
        child_def = self.trades.get(child.infno)
        if child.state is S.ANSWERED:  # the bureau refused the last one: a fresh try, new msgid
            refusal = f"{child.infno} {child.msgid} refused: {envelope.loads(child.answer or '{}').get('err_msg')}"
            if row.attempts >= self.cfg.resolution.max_tries:
                await self.journal.transition(row.msgid, "give_up", note=f"{row.attempts} tries; last {refusal}")
                return True
            await self._pause(row.attempts)
            await self._journal_resolver(row.msgid, self._resolving_trade(trade, row), f"{refusal}; trying again",
                                         event="reattempt", attempts=row.attempts + 1)
            return False
        if child.attempts >= self.cfg.resolution.max_tries and child.state is not S.SENT:
            await self.journal.transitions(
                (child.msgid, "give_up", f"no answer after {child.attempts} tries", {}),
                (row.msgid, "give_up", f"{child.infno} {child.msgid} got no answer after {child.attempts} tries",
                 {}))
            return True
        async with self._lane_for(trade, row):
            if child.msgid in self._fresh:  # journalled just now, never sent: send as it is
                self._fresh.discard(child.msgid)
            else:
                if child.state is S.SENT:  # found so after a restart: it may have arrived
                    await self.journal.transition(child.msgid, "lost", note="fep stopped while it was sent")
                await self._pause(child.attempts)
                await self.journal.transition(child.msgid, "resend", note="sent again with the same msgid",
                                              attempts=child.attempts + 1)
            try:
                delivery = await self._send(child_def, child)
            except (NotSent, Unknown) as e:
                await self.journal.transition(child.msgid, "lost", note=str(e))
                return False
        return await self._resolver_answered(row, child, delivery)

    async def _resolver_answered(self, row: TradeRow, child: TradeRow, delivery: Delivery) -> bool:
        ans = delivery.answer
        child_fields = {"answer": delivery.body.decode("utf-8"), "endpoint": delivery.endpoint}
        if ans.ok:
            parent = (row.msgid, "undone", f"undone by {child.infno} {child.msgid}", {})
        elif child.infno == "2601" and any(s in ans.err_msg for s in self.cfg.bureau.reversal_not_found):
            parent = (row.msgid, "not_needed", f"the bureau has no record of it ({ans.err_msg})", {})
        else:
            await self.journal.transitions((child.msgid, "answer", ans.err_msg, child_fields))
            log.warn("{infno} {msgid} refused by the bureau: {err}; trying again", infno=child.infno,
                     msgid=child.msgid, err=ans.err_msg)
            return False
        await self.journal.transitions((child.msgid, "answer", None, child_fields), parent)
        metrics.RESOLUTIONS.labels(parent[1]).inc()
        return True

    # ---- store and forward ------------------------------------------------------------------------
    def _enqueue(self, row: TradeRow) -> None:
        self._queues.setdefault(row.psn_no or "", deque()).append(row.msgid)
        if not self.link.down:  # while it is down, the tick's probe finds out when it is back
            self._kick(row.psn_no or "")

    def _kick(self, psn: str) -> None:
        if psn in self._draining or not self._queues.get(psn):
            return
        self._draining.add(psn)
        self._spawn(self._drain(psn))

    async def _drain(self, psn: str) -> None:
        """Send one person's queued trades in arrival order; stop at the first that cannot go."""
        try:
            q = self._queues.get(psn, deque())
            while q:
                row = await self.journal.get(q[0])
                if row is None or row.state is not S.QUEUED:
                    if row is not None and row.state in (S.NEEDS_ATTENTION, S.UNKNOWN, S.RESOLVING, S.SENT):
                        return  # parked or being resolved: later items of this person wait behind it
                    q.popleft()
                    continue
                trade = self.trades.get(row.infno)
                await self._ensure_signed_in()
                request = self._refreshed(row)
                await self.journal.transition(row.msgid, "dequeue", note="replayed", request=request,
                                              attempts=row.attempts + 1)
                row.request, row.state, row.attempts = request, S.SENT, row.attempts + 1
                try:
                    delivery = await self._send(trade, row)
                except NotSent as e:
                    await self.journal.transition(row.msgid, "requeue", note=f"bureau unreachable: {e}")
                    return
                except Unknown as e:
                    await self._lost(trade, row, str(e))
                    return
                await self._answered(trade, row, delivery, his_waiting=False)
                if row.state is S.NEEDS_ATTENTION:
                    return
                q.popleft()
                self._kick_all()  # the link is back: every waiting person drains now, not at the next tick
            self._queues.pop(psn, None)
        except Exception:
            log.failure("replaying the queue of a person failed; it is tried again")
        finally:
            self._draining.discard(psn)

    # ---- confirmation window -----------------------------------------------------------------------
    def _arm_confirm(self, msgid: str, deadline: float) -> None:
        delay = max(0.0, deadline - time.time())
        self._confirm_timers[msgid] = self.reactor.callLater(delay, self._spawn, self._unconfirmed(msgid))

    async def _unconfirmed(self, msgid: str) -> None:
        """The HIS did not confirm in time: it failed to record the settlement, so it is undone."""
        self._confirm_timers.pop(msgid, None)
        row = await self.journal.get(msgid)
        if row is None or row.state is not S.AWAITING_CONFIRM:
            return
        trade = self.trades.get(row.infno)
        try:
            await self._journal_resolver(msgid, self._resolving_trade(trade, row), "the HIS did not confirm in time")
        except IllegalTransition:
            return  # confirmed at the last moment
        await self._resolve(msgid)

    # ---- sign-in (9001) ------------------------------------------------------------------------------
    async def _ensure_signed_in(self) -> None:
        if self._signed_on == date.today() or time.monotonic() < self._sign_in_after:
            return
        if self._signing is None:
            self._signing = defer.ensureDeferred(self._sign_in())
        signing = self._signing
        await signing

    async def _sign_in(self) -> None:
        try:
            trade = self.trades.get("9001")
            env = self._complete({"infno": "9001", "input": {"signIn": dict(self.cfg.bureau.signin)}})
            acc = await self.journal.accept(NewTrade("9001", None, None, S.SENT, envelope.payload_hash(env), env))
            result = await self._forward(trade, acc.row)
            body = result.body
            sign_no = ((body.get("output") or {}).get("signinoutb") or {}).get("sign_no")
            if body.get("infcode") == 0 and sign_no:
                self._sign_no, self._signed_on = str(sign_no), date.today()
                metrics.SIGNED_IN.set(1)
                log.info("signed in to the bureau, sign_no {sign_no}", sign_no=self._sign_no)
            else:
                metrics.SIGNED_IN.set(0)
                self._sign_in_after = time.monotonic() + SIGN_IN_RETRY
                log.warn("sign-in (9001) failed: {err}; tried again in {s:g} s", err=body.get("err_msg"),
                         s=SIGN_IN_RETRY)
        finally:
            self._signing = None

    def _not_signed_in(self, ans: envelope.BureauAnswer) -> bool:
        return any(s in ans.err_msg for s in self.cfg.bureau.not_signed_in)

    # ---- helpers ----------------------------------------------------------------------------------------
    @asynccontextmanager
    async def _lane(self, psn: str) -> AsyncIterator[None]:
        """Money-moving trades of one insured person, one at a time, in arrival order."""
        lock = self._lanes.setdefault(psn, defer.DeferredLock())
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._lanes.pop(psn, None)

    @asynccontextmanager
    async def _lane_for(self, trade: TradeDef, row: TradeRow) -> AsyncIterator[None]:
        if trade.person_ordered and row.psn_no:
            async with self._lane(row.psn_no):
                yield
        else:
            yield

    async def _journalled(self, msgid: str | None) -> bool:
        """A resubmission: checks made for new trades (refund order, pending uploads) do not apply."""
        return msgid is not None and await self.journal.get(msgid) is not None

    def _reply(self, row: TradeRow, **kw: Any) -> Reply:
        return reply(row, self.trades.get(row.infno).moves_money, **kw)

    def _spawn(self, coro: Any) -> defer.Deferred[Any]:
        d = defer.ensureDeferred(coro)
        d.addErrback(lambda f: log.failure("background work failed", f))
        return d



def _refuse_if_later(later: list[TradeRow], what: str) -> None:
    if later:
        order = ", ".join(f"{r.setl_id} ({r.infno}, msgid {r.msgid})" for r in reversed(later))
        raise Refused(409, f"refunds go last settlement first: cancel {order} before {what}")


def _msgid_time(msgid: str) -> float:
    """When a msgid of the national layout was made; 0 (the beginning) when it does not follow it."""
    try:
        return datetime.strptime(msgid[12:26], "%Y%m%d%H%M%S").timestamp()
    except ValueError:
        return 0.0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _settlement(trade: TradeDef, row: TradeRow, ans: envelope.BureauAnswer) -> dict[str, Any]:
    """What reconciliation and refund order need from a successful settlement or cancel."""
    setlinfo = (ans.output or {}).get("setlinfo") if isinstance(ans.output, dict) else None
    fields: dict[str, Any] = {}
    if isinstance(setlinfo, dict) and setlinfo.get("setl_id"):
        fields["setl_id"] = str(setlinfo["setl_id"])
    if trade.kind is Kind.UNDO_MONEY:
        data = row.envelope["input"].get("data") or {}
        if data.get("setl_id"):
            fields["cancels"] = str(data["setl_id"])
    return fields
