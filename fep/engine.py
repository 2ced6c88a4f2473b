"""The engine: the normal path of a trade, and the rooms it hands the rest to.

take -> journal -> send -> answered | lost | not sent, one durable write per transition: the request is
journalled (SENT) before the first byte leaves, the answer (ANSWERED) before the HIS hears it. The
rooms own the rest, each one kind of state:
- fep.resolver: an unknown outcome, until REVERSED / NOT_NEEDED / NEEDS_ATTENTION;
- fep.lanes: per person, one send at a time and deferred work in arrival order;
- fep.session: the sign_no every send carries;
- fep.confirm: the confirmation window; fep.refunds: refund order.
Every first send of a trade, whatever path it comes by (fresh, or a resubmission of one not sent),
passes the same checks. Recovery on start reads states: nothing is guessed.
"""

from __future__ import annotations

import concurrent.futures
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from fep import envelope, metrics, refunds
from fep.bureau import BureauLink, Delivery, NotSent, Unknown
from fep.codebook import CodeBook
from fep.config import Config
from fep.confirm import ConfirmWindows, NotAwaiting
from fep.journal import (Accepted, ArchivedKey, Fenced, IllegalTransition, Journal, JournalError, KeyInArchive,
                         NewTrade, TradeRow, answer_with_place, pack)
from fep.lanes import LaneBusy, Lanes, Step
from fep.msgid import well_formed
from fep.places import InsuredPlaces
from fep.replies import Reply, lookup_view, outcome, passed_on, reply
from fep.resolver import DRIVEN, Markers, Resolver
from fep.sender import Sender, recorded
from fep.session import Session, SignInFailed
from fep.states import FINAL, IN_FORCE, State
from fep.trades import FromHis, Kind, OnUnknown, TradeDef, UnknownTrade

if TYPE_CHECKING:
    import msgspec

log = Logger()
S = State
SETTLE_WAIT = 5.0  # seconds a settlement waits for the person's queued uploads before it is refused
MIN_SEND = 1.0  # seconds of the HIS's answer_within a send needs at least; with less left it is not sent
Write = Callable[[State], Awaitable[Accepted]]  # journals the trade for its first send, in the given state


class Refused(Exception):
    """fep will not take this request; nothing was journalled for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _not_past(waiting: list[str], what: str) -> Refused:
    """A settlement refused because the person's earlier uploads have not reached the bureau."""
    return Refused(409, f"{len(waiting)} earlier trade(s) of this person have not reached the bureau ({what}); the "
                        f"settlement would not include them. Send it again once they are delivered")


class Engine:
    def __init__(self, reactor: Any, cfg: Config, journal: Journal, link: BureauLink,
                 codes: CodeBook | None = None, now: Callable[[], float] = time.time,
                 archived: Callable[[str], Awaitable[TradeRow | None]] | None = None) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self._archived = archived  # an archived trade by its msgid (fep.archive); None: nothing is archived
        self.trades = cfg.trades
        self.journal = journal
        self.link = link
        self.codes = codes
        self._now = now
        self.session = Session(now, self._sign_in, cfg.bureau.not_signed_in)
        self.sender = Sender(link, self.session, journal, now, self._late, lambda: self.cfg.remote_route)
        self.lanes = Lanes(reactor, self._replay)
        self.places = InsuredPlaces(journal)
        self.resolver = Resolver(reactor, journal, self.sender, self.lanes, lambda: self.trades,
                                 lambda: self.cfg.resolution, self._markers, self._complete, self._after_answer)
        self.windows = ConfirmWindows(reactor, now, journal, self.resolver.unconfirmed)
        self._poll: task.LoopingCall | None = None
        self._link_was_down = False
        # msgid -> resubmissions waiting for the answer the first submission of it is getting now
        self._waiting: dict[str, list[defer.Deferred[None]]] = {}
        # One node of several sharing a journal (fep.leader): "leader" or "standby"; "single" alone.
        self.role = "single"
        self.leader: str | None = None  # who leads, as this node last read it (shared journals); None: unknown
        self.standby_note: str | None = None  # why a standby does not lead, besides another node leading

    # ---- start and stop ------------------------------------------------------------------------
    async def start(self) -> None:
        """Recovery: read every open trade's state and pick it up. Runs before the listeners open."""
        self.places.forget()  # (a takeover: the other node journalled 1101s meanwhile)
        for row in await self.journal.to_recover():
            await self._recover(row)
        self._poll = task.LoopingCall(self._tick)
        self._poll.clock = self.reactor
        self._poll.start(1.0, now=False)
        _spawn(self.session.ensure())

    async def _recover(self, row: TradeRow) -> None:
        if row.related:  # a resolving trade is driven by the trade it resolves
            return
        trade = self.trades.get(row.infno)
        if row.state is S.SENT:
            row = await self.journal.transition(row.msgid, "lost", note="fep stopped while it was at the bureau",
                                                attempts=row.attempts + 1)
            await self.resolver.lost(trade, row)
            return
        if trade.deferrable and row.state is not S.AWAITING_CONFIRM:
            self.lanes.defer(row.psn_no or "", row.msgid)  # queued, parked or unresolved: later work waits behind it
        if row.state in DRIVEN:
            self.resolver.resume(row.msgid)
        elif row.state is S.AWAITING_CONFIRM:
            self.windows.arm(row)

    def reconfigure(self, cfg: Config) -> None:
        """A reload: the next step of every trade reads the new definitions."""
        self.cfg, self.trades = cfg, cfg.trades
        self.session.markers = cfg.bureau.not_signed_in

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self.windows.stop()

    def _tick(self) -> None:
        """Once a second: replay the queues (while the link is down, one person's head probes it), wake
        resolutions when the link is back, and sign in when the day has changed."""
        if self.link.down:
            self._link_was_down = True
            people = self.lanes.people()
            if people and not any(self.lanes.draining(p) for p in people):
                self.lanes.rotate(people[0])  # the next probe asks with another person's head
                self.lanes.kick(people[0])
        else:
            self._link_up()
        if not self.session.signed_in:
            _spawn(self.session.ensure())

    def _link_up(self) -> None:
        """The link answers: after an outage, resolutions wake; every person's queue goes on."""
        if self._link_was_down:
            self._link_was_down = False
            self.resolver.link_back()
        self.lanes.kick_all()

    def _markers(self) -> Markers:
        return Markers(self.cfg.bureau.reversal_not_found, self.cfg.bureau.transient, self.cfg.bureau.late_grace)

    # ---- HIS entry points ----------------------------------------------------------------------
    def must_lead(self, then: str = "send trades there") -> None:
        """A standby takes no trade, nor a person's action: it names the leader and what to do `then`. Lookups
        it answers from the journal."""
        if self.role == "standby":
            raise Refused(envelope.STANDBY, f"this fep node stands by; {self.who_leads(then)} (nothing was "
                                            f"accepted here)")

    def who_leads(self, then: str = "send trades there") -> str:
        """A standby's word on the leader: named when known, else that it cannot be told (never a stale name),
        and why this node does not lead when that is more than another leading."""
        if self.leader:
            said = f"the leader is {self.leader}: {then}"
        else:
            said = "no leader is known here" if self.standby_note else "the leader is being chosen"
        return said + (f"; this node does not lead: {self.standby_note}" if self.standby_note else "")

    def leads(self, node: str) -> None:
        self.role, self.leader, self.standby_note = "leader", node, None

    def stands_by(self, leader: str | None = None, note: str | None = None) -> None:
        """This node of a pair does not lead: `leader` leads (None: not known here), and `note` says why this
        node does not, when that is more than another leading."""
        self.role, self.leader, self.standby_note = "standby", leader, note

    async def submit(self, req: envelope.HisRequest) -> Reply:
        self.must_lead()
        started = time.perf_counter()
        trade = self.trades.get(req.infno)
        if trade.from_his is FromHis.SESSION:
            return await self._session_answer(trade)
        if trade.from_his is FromHis.REVERSAL:
            result = await self._reversal_asked(trade, req)
        else:
            result = await self._take(trade, req)
        metrics.child(metrics.TRADES, trade.infno, outcome(result.head)).inc()
        metrics.child(metrics.TRADE_SECONDS, trade.infno).observe(time.perf_counter() - started)
        return result

    async def lookup(self, key: str) -> Reply:
        """`key`: the HIS's own msgid, or the one fep answered with. The HIS hears state and codes only
        (replies.lookup_view): a msgid is all a lookup needs, and msgids can be guessed."""
        return lookup_view(self._reply(await self._row(key)))

    async def confirm(self, key: str) -> Reply:
        """The HIS recorded a settlement that has a confirmation window. Like a lookup, it needs only a
        msgid: the HIS hears state and codes."""
        self.must_lead()
        row = await self._row(key)
        try:
            return lookup_view(self._reply(await self.windows.confirm(row.msgid)))
        except NotAwaiting as e:
            raise Refused(409, str(e)) from None

    # ---- the normal path --------------------------------------------------------------------------
    async def _take(self, trade: TradeDef, req: envelope.HisRequest, related: str | None = None) -> Reply:
        answer_by = self._now() + self.cfg.his.answer_within  # fep answers the HIS by then
        his_msgid = req.msgid  # the HIS's key, whatever its form
        # One read: the trade under the HIS's msgid, or else fep's; it runs while the digest is computed (a 3.5 MB
        # upload's takes 8 ms). A key the journal's filter of keys has never seen is new and needs none (a
        # tenth of fep's CPU a trade); keys can reach the archive behind the filter, so the accept searches it
        # (KeyInArchive), and a refusal is not said before the key is looked up after all (below).
        looked_up = bool(his_msgid) and self.journal.keys.may_hold(his_msgid)  # type: ignore[arg-type]
        lookup = defer.ensureDeferred(self._named(his_msgid)) if looked_up else None  # type: ignore[arg-type]
        # ... and the HIS's input bytes are compressed for the journal meanwhile (ISA-L lets go of the GIL)
        packed = pack(req.input_json) if req.input_json is not None else None
        digest = envelope.payload_hash(req.envelope, self._as_sent(trade, req))  # before fep maps anything
        known = await lookup if lookup is not None else None
        if known is not None and self._sent_again(known, his_msgid, digest):  # type: ignore[arg-type]
            return await self._resubmitted(trade, known, digest, answer_by)
        try:
            return await self._new(trade, req, related, digest, packed, answer_by, looked_up)
        except Exception:
            # Not looked up (the filter called the key new), and no trade was made: a key that names one after
            # all (keys reach the archive behind the filter) hears that trade, not its checks' refusal
            if not looked_up and his_msgid and (again := await self._sent_after_all(trade, his_msgid, digest,
                                                                                   answer_by)) is not None:
                return again
            raise

    async def _sent_after_all(self, trade: TradeDef, key: str, digest: envelope.Digest,
                              answer_by: float) -> Reply | None:
        """The lookup the filter of keys spared, made after all: the answer to the trade `key` names when this
        submission is that trade sent again; None: it is not (a new trade may go under `key`)."""
        known = await self._named(key)
        if known is not None and self._sent_again(known, key, digest):
            return await self._resubmitted(trade, known, digest, answer_by)
        return None

    async def _new(self, trade: TradeDef, req: envelope.HisRequest, related: str | None, digest: envelope.Digest,
                   packed: concurrent.futures.Future[bytes] | None, answer_by: float, looked_up: bool) -> Reply:
        """A submission no trade of the journal is known to be under: checked, journalled, sent."""
        his_msgid = req.msgid
        # the bureau sees the HIS's msgid too when it is well formed and unused, fep's own number otherwise
        msgid = his_msgid if his_msgid and well_formed(his_msgid) else None
        trade.validate(req.input)  # after the look-up: a trade journalled before a field was required is known
        if self.journal.cannot_write:
            raise Refused(503, f"journal cannot write: {self.journal.cannot_write}; nothing was accepted, send it "
                               f"again later")
        input_json = req.input_json  # the HIS's own bytes go on, unless fep changes the input
        if trade.map_codes and self.codes is not None and self.codes.map_fees(trade, req.input):
            input_json = None
        if trade.check_diagnoses and self.codes is not None:
            self.codes.check_diagnoses(trade, req.input)
        psn = envelope.find_psn_no(req.input)
        env = self._complete(req.envelope)
        if trade.insuplc == "fill" and psn and not str(env["insuplc_admdvs"] or "").strip():
            # blanks are empty: an HIS keeping it in a CHAR(6) column pads "none" to six spaces
            env["insuplc_admdvs"] = await self._insured_place(trade, psn)

        async def write(state: State) -> Accepted:
            env["sign_no"] = self.session.sign_no
            acc = await self._accept(NewTrade(trade.infno, msgid, psn, state, digest, env, related=related,
                                              his_msgid=his_msgid, input_json=input_json,
                                              packed_input=packed if input_json is not None else None,
                                              looked_up=looked_up))
            if not acc.created and not _same(acc.row, digest):  # sent twice at once, the other first: changed
                raise _reused(acc.row)
            return acc

        try:
            return await self._first_send(trade, psn, req.input, answer_by, write)
        except KeyInArchive:  # nothing was journalled: decide as if the filter had said "maybe"
            again = await self._sent_after_all(trade, his_msgid, digest, answer_by)  # type: ignore[arg-type]
            if again is not None:
                return again
            looked_up = True  # (write reads it: the input stays as mapped once)
            return await self._first_send(trade, psn, req.input, answer_by, write)

    async def _first_send(self, trade: TradeDef, psn: str | None, input_: dict[str, Any], answer_by: float,
                          write: Write) -> Reply:
        """The checks every first send passes, then the journal write, then the send.

        A deferrable trade waits in its person's queue while the bureau is unreachable or earlier work of
        the person is still queued. A settlement goes after the person's queued uploads. A cancel obeys
        refund order. The person's lane is waited for only while the bureau's timeout still fits in what
        the HIS was told it may wait."""
        if trade.deferrable and (self.link.down or self.lanes.waiting(psn)):
            return await self._queue(write)
        if trade.moves_money and psn and (behind := await self._after_deferred_work(trade, psn, answer_by)):
            return await self._held_back(trade, write, behind)
        try:
            async with self.lanes.sending(psn if trade.person_ordered else None, f"{trade.infno} {trade.name}",
                                          within=answer_by - self._now() - MIN_SEND) as name:
                if trade.deferrable and self.lanes.waiting(psn):  # an earlier upload became unknown meanwhile
                    return await self._queue(write)
                if trade.moves_money and psn and (waiting := self.lanes.waiting(psn)):  # the same, for money:
                    raise _not_past(waiting, "they became unknown or queued while this waited for its turn")
                if trade.kind is Kind.UNDO_MONEY and psn:
                    await self._check_refund_order(input_, psn)
                elif trade.kind is Kind.MONEY and psn:
                    await self._check_no_undo_pending(psn)
                await self.session.ensure()
                acc = await write(S.SENT)
                if not acc.created:
                    return self._reply(acc.row, resubmitted=True)
                name(f"{trade.infno} {acc.row.msgid}")
                return await self._answering(acc.row.msgid, self._forward(trade, acc.row, answer_by))
        except LaneBusy as e:  # the HIS hears what it waited for, and that nothing left the box
            return await self._held_back(trade, write, f"{e}, and fep answers the HIS within "
                                                       f"{self.cfg.his.answer_within:g} s")

    async def _held_back(self, trade: TradeDef, write: Write, why: str) -> Reply:
        """A first send fep will not make: journalled, and answered as not sent, saying why."""
        acc = await write(S.SENT)
        if not acc.created:
            return self._reply(acc.row, resubmitted=True)
        return await self._not_sent(trade, acc.row, why)

    async def _answering(self, msgid: str, forward: Awaitable[Reply]) -> Reply:
        """While the first submission of `msgid` waits for the bureau, a resubmission of it (an HIS that
        timed out and retried with its msgid) waits for the same answer instead of hearing "in progress"."""
        self._waiting[msgid] = []
        try:
            return await forward
        finally:
            for d in self._waiting.pop(msgid):
                if not d.called:  # (one that timed out was answered "in progress" already)
                    d.callback(None)

    async def _first_answer(self, row: TradeRow, answer_by: float) -> TradeRow:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting[row.msgid].append(d)
        d.addTimeout(max(answer_by - self._now() - MIN_SEND, 0), self.reactor)
        try:
            await d
        except defer.TimeoutError:
            return row  # still at the bureau: the HIS hears "in progress" in time, and asks again
        return await self.journal.get(row.msgid)  # type: ignore[return-value]

    async def _queue(self, write: Write) -> Reply:
        acc = await write(S.QUEUED)
        if acc.created:  # (work that names no person shares one lane, "")
            self.lanes.defer(acc.row.psn_no or "", acc.row.msgid)
        return self._reply(acc.row, resubmitted=not acc.created)

    @staticmethod
    def _sent_again(known: TradeRow, key: str, digest: envelope.Digest) -> bool:
        """Whether a submission under `key` is the trade `known` sent again: under its HIS msgid, or under the
        fep_msgid an HIS that sends none was answered with. False: a new trade under a number fep used for
        one of its own. Refused when fep gave the number to another HIS trade (as its fep_msgid): taking it
        as a new key would make "the trade msgid X" mean two trades (a 2601 naming it could undo the wrong one)."""
        if known.his_msgid == key or known.his_msgid is None and _same(known, digest):
            return True
        if known.his_msgid is not None:
            raise Refused(422, f"msgid {key} is the msgid fep gave another trade; a msgid names one trade "
                               f"forever: send this one under a msgid of your own")
        return False

    def _as_sent(self, trade: TradeDef, req: envelope.HisRequest) -> msgspec.Raw | None:
        """The input's bytes as the HIS wrote them, when fep will send them so (no fee code to fill): the
        payload's digest is taken of them."""
        if trade.map_codes and self.codes is not None and not self.codes.leaves_as_sent(trade, req.input):
            return None
        return req.input_json

    async def _resubmitted(self, trade: TradeDef, row: TradeRow, digest: envelope.Digest,
                           answer_by: float) -> Reply:
        if not _same(row, digest):
            raise _reused(row)
        if row.state is S.SENT and row.msgid in self._waiting:  # the first is at the bureau: hear its answer
            row = await self._first_answer(row, answer_by)
        if row.state is not S.NOT_SENT:
            return self._reply(row, resubmitted=True)
        if row.archived:
            raise _archived_unsent(row)

        async def retry(state: State) -> Accepted:  # it never left the box: this submission may send it
            try:
                return Accepted(await self.journal.transition(row.msgid, "retry", note="sent again by the HIS",
                                                              request=await self.sender.refreshed(row)), True)
            except IllegalTransition:  # a concurrent resubmission took it first, or the archive run moved it
                now = await self.journal.get(row.msgid)
                if now is None:
                    raise _archived_unsent(row) from None
                return Accepted(now, False)

        try:
            return await self._first_send(trade, row.psn_no, row.envelope["input"], answer_by, retry)
        except Refused as e:  # still not sent, and the journal still holds it so: the HIS hears both
            return Reply(self._reply(row).body | {"err_msg": str(e), "fep_note": str(e),
                                                  "fep_reason": envelope.REASONS.get(e.status, "refused")})

    async def _forward(self, trade: TradeDef, row: TradeRow, answer_by: float) -> Reply:
        """Send a journalled trade (state SENT) while the HIS waits, and record what became of it. The wait
        for the bureau ends in time for fep to answer the HIS by `answer_by`."""
        left = answer_by - self._now()
        if left < MIN_SEND:
            return await self._not_sent(trade, row, f"only {left:.1f} s were left of the {self.cfg.his.answer_within:g} s "
                                                    f"fep answers the HIS within")
        try:
            delivery = await self.sender.deliver(trade, row, timeout=round(min(trade.timeout, left), 1))
        except NotSent as e:
            return await self._not_sent(trade, row, str(e))
        except Unknown as e:
            row = await self.journal.transition(row.msgid, "lost", note=str(e), attempts=row.attempts + 1,
                                                endpoint=e.endpoint)
            return self._reply(await self.resolver.lost(trade, row))
        return await self._answered(trade, row, delivery)

    async def _not_sent(self, trade: TradeDef, row: TradeRow, why: str) -> Reply:
        if trade.deferrable:
            row = await self.journal.transition(row.msgid, "requeue", note=f"bureau unreachable: {why}")
            self.lanes.defer(row.psn_no or "", row.msgid)
            return self._reply(row)
        failure = envelope.local_failure(f"bureau unreachable, nothing was sent: {why}",
                                         datetime.fromtimestamp(self._now()), trade.output)
        return self._reply(await self.journal.transition(row.msgid, "not_sent", note=why,
                                                         answer=envelope.dumps(failure).decode("utf-8")))

    async def _answered(self, trade: TradeDef, row: TradeRow, delivery: Delivery) -> Reply:
        ans = delivery.answer
        fields = recorded(trade, row, delivery)
        if ans.ok and trade.confirm_within:
            row = await self.journal.transition(row.msgid, "answer_held", deadline=self._now() + trade.confirm_within,
                                                **fields)
            self.windows.arm(row)
        elif ans.ok and trade.insuplc == "remember" and (place := _place_in(ans.output)):  # (else left unparsed)
            row = await self.journal.run(answer_with_place(row.msgid, fields, *place))
            self.places.journalled(*place)
        else:
            row = await self.journal.transition(row.msgid, "answer", **fields)
        if ans.ok:
            await self._after_answer(trade, row)
        if row.state is S.ANSWERED:  # the common case: the bureau's bytes passed through, fep's fields added
            return passed_on(row, ans)
        return self._reply(row, answer=ans.raw)

    async def _after_answer(self, trade: TradeDef, row: TradeRow) -> None:
        """A successful cancel of a settlement still in its confirmation window: the HIS evidently recorded
        that settlement (it cancelled it by its setl_id), so the window closes as confirmed, not undone."""
        if trade.kind is not Kind.UNDO_MONEY or not row.cancels or not row.psn_no:
            return
        for s in await self.journal.settlements_of(row.psn_no, self._money_infnos()):
            if s.setl_id == row.cancels and s.state is S.AWAITING_CONFIRM:
                try:
                    await self.windows.confirm(s.msgid, f"cancelled by {row.infno} {row.msgid}")
                except NotAwaiting:
                    pass  # its window closed first: the cancel and the undo are both in the journal

    async def _insured_place(self, trade: TradeDef, psn: str) -> str:
        """The person's insured region (参保地) from their last 1101, for an envelope the HIS left without
        one: the bureau routes a 异地 patient's trade by it. "" where fep has none and may forward it so."""
        place = await self.places.of(psn)
        if place is None and self.cfg.remote_without_1101 == "refuse":
            raise Refused(400, f"{trade.infno} {trade.name}: insuplc_admdvs (参保地医保区划) is empty and fep has no "
                               f"1101 answer of this person to fill it from: call 1101 (人员信息获取) for the "
                               f"person first, or send insuplc_admdvs")
        return place or ""

    async def _accept(self, new: NewTrade) -> Accepted:
        try:
            return await self.journal.accept(new)
        except JournalError as e:
            raise Refused(503, f"{e}; nothing was accepted, send it again later") from None
        except Fenced as e:  # another node took the lead a moment ago: nothing was journalled here
            raise Refused(envelope.STANDBY, f"{e}; nothing was accepted: send it to the leader") from None

    def _complete(self, his_envelope: dict[str, Any]) -> dict[str, Any]:
        """Fill what the box owns; keep what the HIS says of itself."""
        inst = self.cfg.institution
        env = dict(his_envelope)
        env.pop("msgid", None)
        env.update(fixmedins_code=inst.fixmedins_code, fixmedins_name=inst.fixmedins_name,
                   sign_no=self.session.sign_no, inf_time=envelope.inf_time(self._now()))
        for key, value in (("mdtrtarea_admvs", inst.mdtrtarea_admvs), ("recer_sys_code", inst.recer_sys_code),
                           ("infver", inst.infver), ("insuplc_admdvs", ""), ("opter_type", inst.opter_type),
                           ("opter", inst.opter), ("opter_name", inst.opter_name)):
            if not env.get(key):
                env[key] = value
        return env

    def _late(self, row: TradeRow, body: bytes) -> None:
        """An answer after fep stopped waiting never undoes a decision by itself: it is kept, and a late
        success of money fep judged not at the bureau is undone again (fep.resolver)."""
        metrics.LATE_ANSWERS.labels(row.infno).inc()
        log.warn("{infno} {msgid}: late answer from the bureau stored", infno=row.infno, msgid=row.msgid)

        async def keep() -> None:
            await self.resolver.late_answer(await self.journal.store_late_answer(row.msgid,
                                                                                 body.decode("utf-8", "replace")))

        _spawn(keep())

    # ---- deferred work (store and forward) -----------------------------------------------------------
    async def _replay(self, msgid: str) -> Step:
        """Send the head of a person's queue (the lanes' drain calls this)."""
        row = await self.journal.get(msgid)
        if row is None or row.state in FINAL:
            return Step.NEXT
        if row.state is not S.QUEUED:
            return Step.HOLD  # parked or being resolved: later items of this person wait behind it
        trade = self.trades.get(row.infno)
        request = await self.sender.refreshed(row)
        async with self.lanes.sending(row.psn_no, f"{trade.infno} {msgid} (replayed)"):
            row = await self.journal.transition(msgid, "dequeue", note="replayed", request=request)
            try:
                delivery = await self.sender.deliver(trade, row)
            except NotSent as e:
                await self.journal.transition(msgid, "requeue", note=f"bureau unreachable: {e}")
                return Step.LATER
            except Unknown as e:
                row = await self.journal.transition(msgid, "lost", note=str(e), attempts=row.attempts + 1,
                                                    endpoint=e.endpoint)
                await self.resolver.lost(trade, row)
                return Step.HOLD
        if self._link_was_down:  # this was the probe, and the bureau answered it: the other queues go now,
            self._link_up()  # not at the next tick a second later
        return await self._replayed(trade, row, delivery)

    async def _replayed(self, trade: TradeDef, row: TradeRow, delivery: Delivery) -> Step:
        """Nobody hears a replay's answer: a success goes on, "not now" waits, a business refusal parks."""
        ans = delivery.answer
        fields = recorded(trade, row, delivery)
        if ans.ok:
            await self.journal.transition(row.msgid, "answer", **fields)
            return Step.NEXT
        if self._markers().transient_refusal(ans):
            await self.journal.transition(row.msgid, "requeue", note=f"the bureau said not now: {ans.err_msg}")
            return Step.LATER
        await self.journal.transition(row.msgid, "give_up", note=f"the bureau refused the queued {trade.infno}: "
                                                                  f"{ans.err_msg}", **fields)
        return Step.HOLD

    async def _after_deferred_work(self, trade: TradeDef, psn: str, answer_by: float) -> str | None:
        """A settlement goes after the person's earlier uploads, never past them: the bureau would settle
        without their fees. It waits a little while they go; if one is parked, or they are still not
        through after SETTLE_WAIT, the HIS hears what is in the way. A bureau that is unreachable is not
        waited for (money never waits): returned is why the settlement is not sent. Sent to find out,
        it would reach a bureau that came back meanwhile ahead of the uploads still queued."""
        waited_until = min(answer_by - MIN_SEND, self._now() + SETTLE_WAIT)
        self.lanes.kick(psn)  # the uploads go now if they can
        while waiting := self.lanes.waiting(psn):
            if self.link.down and not self.lanes.draining(psn):
                return (f"the bureau is unreachable and {len(waiting)} earlier upload(s) of this person wait in "
                        f"fep's queue; the settlement would not include them")
            head = await self.journal.get(waiting[0])
            if head is not None and head.state is S.NEEDS_ATTENTION or self._now() >= waited_until:
                what = f"{head.infno} {head.msgid} is {head.state}" if head else "the first is unknown"
                raise _not_past(waiting, what)
            self.lanes.kick(psn)
            await task.deferLater(self.reactor, 0.05)

    # ---- refund order (逐笔按序退款) ----------------------------------------------------------------
    def _money_infnos(self, *kinds: Kind) -> list[str]:
        kinds = kinds or (Kind.MONEY, Kind.UNDO_MONEY)
        return [t.infno for t in self.trades.defs.values() if t.kind in kinds]

    async def _settlements(self, psn: str) -> list[TradeRow]:
        """The person's settlements the bureau holds and no cancel has undone, in the bureau's order."""
        return refunds.in_force(await self.journal.settlements_of(psn, self._money_infnos()),
                                frozenset(self._money_infnos(Kind.MONEY)))

    async def _check_refund_order(self, input_: dict[str, Any], psn: str) -> None:
        """A cancel waits for every later settlement of the person to be cancelled, including one whose
        outcome is not known yet (the bureau may hold it), and for the person's other cancels to be known."""
        setl_id = str(next((n.get("setl_id") for n in input_.values() if isinstance(n, dict)), "") or "")
        settlements = await self._settlements(psn)
        target = next((r for r in settlements if r.setl_id == setl_id), None)
        pending = [r for r in await self.journal.pending_money_of(psn, self._money_infnos())
                   if r.infno in self._money_infnos(Kind.UNDO_MONEY) or target is None or r.created > target.created]
        try:
            refunds.check_cancel(settlements, setl_id)
            refunds.check_known(pending, f"the cancel of {setl_id}")
        except refunds.OutOfOrder as e:
            raise Refused(409, str(e)) from None

    async def _check_no_undo_pending(self, psn: str) -> None:
        """A settlement waits while a cancel or an asked-for reversal of the person is not known yet: sent
        again later, it would undo an older settlement past this one."""
        undoing = [r for r in await self.journal.pending_money_of(psn, self._money_infnos())
                   if r.infno in self._money_infnos(Kind.UNDO_MONEY) or r.state is S.REVOKING]
        try:
            refunds.check_known(undoing, "a new settlement")
        except refunds.OutOfOrder as e:
            raise Refused(409, str(e)) from None

    # ---- reversals asked for (the HIS's 2601, `fep reverse`) -------------------------------------------
    async def _reversal_asked(self, trade: TradeDef, req: envelope.HisRequest) -> Reply:
        if req.msgid and (known := await self._named(req.msgid)) is not None:
            digest = envelope.payload_hash(req.envelope)
            if self._sent_again(known, req.msgid, digest):
                return await self._resubmitted(trade, known, digest, self._now() + self.cfg.his.answer_within)
        trade.validate(req.input)
        data = req.input.get("data") or {}
        return await self.reverse(str(data["omsgid"]), str(data["oinfno"]), str(data["psn_no"]), req)

    async def reverse(self, omsgid: str, oinfno: str | None = None, psn_no: str | None = None,
                      req: envelope.HisRequest | None = None) -> Reply:
        """Undo a trade by 2601. One the journal holds as done goes to REVOKING and is REVERSED when the
        bureau acknowledges (or stands, if the bureau refuses). One parked, judged not at the bureau, or
        given up, which the bureau holds after all (reconciliation found it), is resolved afresh. One the
        journal does not hold (单边账: settled behind fep's back) is reversed by a 2601 of its own, resent
        until answered. Each obeys refund order like a cancel."""
        self.must_lead()
        row = await self._named(omsgid)  # the HIS names its trade by its own msgid
        if row is None:
            return await self._reverse_unknown(omsgid, oinfno, psn_no, req)
        omsgid = row.msgid
        if row.archived:
            raise Refused(409, f"{omsgid} is {row.state} and archived: a trade is archived only once it is final "
                               f"and its day reconciled and balanced, so there is nothing of it to reverse")
        if psn_no and row.psn_no and psn_no != row.psn_no:
            raise Refused(400, f"{omsgid} is not a trade of {psn_no}")  # (whose it is stays unsaid: msgids are guessed)
        if row.state in DRIVEN or row.state in (S.SENT, S.QUEUED):
            raise Refused(409, f"fep is still finding out what became of {omsgid} ({row.state}): its outcome is at "
                               f"GET /fep/trades/{omsgid}; it is undone by itself if the bureau holds it")
        if row.state in (S.NOT_SENT, S.REVERSED):
            raise Refused(409, f"{omsgid} is {row.state}: the bureau holds nothing of it to reverse")
        if self.trades.get(row.infno).kind is Kind.MONEY:
            await self._check_reversal(row.psn_no or "", omsgid, row.created)
        if row.state not in IN_FORCE:  # NEEDS_ATTENTION, NOT_NEEDED, DROPPED: the bureau may hold it
            if self.trades.get(row.infno).on_unknown not in (OnUnknown.REVERSE, OnUnknown.CANCEL):
                raise Refused(409, f"{omsgid} ({row.infno}) is {row.state} and not undone by a reversal: send it on "
                                   f"with fep replay, or leave it dropped")
            return self._reply(await self.resolver.reopen(row, f"a reversal was asked for ({row.state})"))
        child = self.resolver.reversal_of(row, req.msgid if req else None,
                                          envelope.payload_hash(req.envelope) if req else None)
        try:
            return self._reply(await self.resolver.revoke(row, child, "a reversal was asked for",
                                                          timeout=self.cfg.his.answer_within))
        except IllegalTransition as e:
            raise Refused(409, f"{omsgid} moved on meanwhile ({e.state}); nothing was sent") from None

    async def _reverse_unknown(self, omsgid: str, oinfno: str | None, psn_no: str | None,
                               req: envelope.HisRequest | None) -> Reply:
        if not oinfno or not psn_no:
            raise Refused(400, f"{omsgid} is not in the journal: give its trade number and psn_no "
                               f"(they are in the reconciliation detail)")
        try:
            original = self.trades.get(oinfno)
        except UnknownTrade as e:  # an operator's typo (--infno 9999): was a KeyError, a 500
            raise Refused(400, f"cannot reverse {omsgid} as trade {oinfno}: {e}") from None
        if original.kind is not Kind.UNDO_MONEY:  # undoing a cancel is not a refund
            await self._check_reversal(psn_no, omsgid, _msgid_time(omsgid))
        req = req or envelope.HisRequest("2601", None, {
            "infno": "2601", "input": {"data": {"psn_no": psn_no, "omsgid": omsgid, "oinfno": oinfno}}})
        return await self._take(self.trades.get("2601"), req)

    async def _check_reversal(self, psn: str, omsgid: str, made_at: float) -> None:
        try:
            refunds.check_reversal(await self._settlements(psn), omsgid, made_at)
        except refunds.OutOfOrder as e:
            raise Refused(409, str(e)) from None

    # ---- what a person does (admin socket) ---------------------------------------------------------
    async def replay(self, msgid: str) -> Reply:
        """A person sends a parked trade on, after fixing its cause: an upload the bureau refused goes back
        to the head of its queue; a trade whose outcome is unknown is resolved afresh."""
        self.must_lead("run it there")
        row = await self._parked(msgid)
        if row.related:  # a resolving trade is replayed through the trade it resolves
            return await self.replay(row.related)
        trade = self.trades.get(row.infno)
        if trade.deferrable and row.answer:
            row = await self.journal.transition(msgid, "release", note="released by a person", attempts=0)
            self.lanes.kick(row.psn_no or "")
        else:
            row = await self.resolver.reopen(row)
        return self._reply(row)

    async def drop(self, msgid: str, reason: str) -> Reply:
        """A person gives a parked trade up, saying why; the person's later uploads then go on."""
        self.must_lead("run it there")
        row = await self._parked(msgid)
        if row.related:
            raise Refused(409, f"{msgid} resolves {row.related}: drop or replay that one")
        if not reason.strip():
            raise Refused(400, "say why the trade is dropped (--reason): it stays in the journal's history")
        row = await self.journal.transition(msgid, "drop", note=f"dropped by a person: {reason.strip()}")
        if self.trades.get(row.infno).deferrable:
            self.lanes.done(row.psn_no or "", msgid)
            self.lanes.kick(row.psn_no or "")
        return self._reply(row)

    async def _parked(self, msgid: str) -> TradeRow:
        row = await self.journal.get(msgid)  # a person names it by the msgid `fep status` shows
        if row is None:
            raise Refused(404, f"no trade with msgid {msgid} in the journal")
        if row.state is not S.NEEDS_ATTENTION:
            raise Refused(409, f"{msgid} is {row.state}, not NEEDS_ATTENTION")
        return row

    def role_view(self) -> dict[str, Any]:
        """This node's part in a pair, as `fep status` shows it: read from memory, answered at once."""
        return {"role": self.role, "leader": self.leader, "standby_note": self.standby_note}

    async def status(self) -> dict[str, Any]:
        counts = await self.journal.count_by_state()
        oldest = await self.journal.oldest({S.QUEUED})
        parked = await self.journal.parked()
        return {
            "endpoints": [{"name": p.ep.name, "url": p.ep.url, "up": p.up} for p in self.link.pools],
            "signed_in": self.session.signed_in, "sign_no": self.session.sign_no,
            "journal_cannot_write": self.journal.cannot_write,
            "journal_keys": self.journal.keys.state,
            **self.role_view(),
            "trades_by_state": counts,
            "queued": counts.get(S.QUEUED, 0),
            "oldest_queued_seconds": round(self._now() - oldest, 1) if oldest else None,
            "needs_attention": [{"msgid": r.msgid, "infno": r.infno, "since": _when(r.updated), "note": r.note}
                                for r in parked],
        }

    async def _session_answer(self, trade: TradeDef) -> Reply:
        """The HIS signs in or out: fep holds the bureau session, so it answers with that, and sends nothing."""
        sign_no = await self.session.ensure()
        if not self.session.signed_in:
            raise Refused(503, "fep is not signed in to the bureau yet (it signs in by itself); try again shortly")
        when = datetime.fromtimestamp(self._now())
        ack = envelope.local_failure("", when, trade.output)
        ack.update(infcode=0, err_msg=None, output={trade.output: {"sign_no": sign_no,
                                                                    "sign_time": when.strftime("%Y-%m-%d %H:%M:%S")}})
        note = f"answered by fep, which holds the bureau session; {trade.infno} is never sent for the HIS"
        return Reply(envelope.typed(envelope.answer(ack, msgid="", state="LOCAL", note=note, infno=trade.infno),
                                    self.cfg.his.infcode_type))

    # ---- sign-in (9001), through the normal path ---------------------------------------------------
    async def _sign_in(self) -> str:
        trade = self.trades.get("9001")
        env = self._complete({"infno": "9001", "input": {"signIn": dict(self.cfg.bureau.signin)}})
        acc = await self._accept(NewTrade("9001", None, None, S.SENT, envelope.payload_hash(env), env))
        body = (await self._forward(trade, acc.row, self._now() + trade.timeout)).body
        sign_no = ((body.get("output") or {}).get("signinoutb") or {}).get("sign_no")
        if not envelope.succeeded(body) or not sign_no:
            raise SignInFailed(str(body.get("err_msg")))
        return str(sign_no)

    # ---- helpers ----------------------------------------------------------------------------------------
    async def _row(self, key: str) -> TradeRow:
        """The trade the HIS means by `key` (its own msgid, or fep's)."""
        row = await self._named(key)
        if row is None:
            raise Refused(404, f"no trade with msgid {key} in the journal")
        return row

    async def _named(self, key: str) -> TradeRow | None:
        """The trade the HIS means by `key` (its own msgid, or fep's), read from the archive when it is there."""
        found = await self.journal.for_his(key)
        if not isinstance(found, ArchivedKey):
            return found
        row = await self._archived(found.msgid) if self._archived is not None else None
        if row is None:  # its month's file is gone: the key still names that trade, never a new one
            raise Refused(422, f"msgid {found.msgid} names a trade fep archived whose month's file cannot be read "
                               f"here (restore it beside the journal); a msgid names one trade forever: a new trade "
                               f"needs a new msgid")
        row.archived = True
        return row

    def _reply(self, row: TradeRow, **kw: Any) -> Reply:
        return reply(row, self.trades.get(row.infno), infcode_type=self.cfg.his.infcode_type, **kw)


def _place_in(output: Any) -> tuple[str, str] | None:
    """(psn_no, insuplc_admdvs) a 1101 answer names (`insuplc: remember`); its insuinfo is a list or one object."""
    if not isinstance(output, dict):
        return None
    psn = (output.get("baseinfo") or {}).get("psn_no") if isinstance(output.get("baseinfo"), dict) else None
    insuinfo = output.get("insuinfo")
    places = [i.get("insuplc_admdvs") for i in (insuinfo if isinstance(insuinfo, list) else [insuinfo])
              if isinstance(i, dict) and i.get("insuplc_admdvs")]
    return (str(psn), str(places[0])) if psn and places else None


def _spawn(coro: Any) -> defer.Deferred[Any]:
    return defer.ensureDeferred(coro).addErrback(lambda f: log.failure("background work failed", f))


def _msgid_time(msgid: str) -> float:
    """When a msgid of the national layout was made; 0 (the beginning) when it does not follow it."""
    try:
        return datetime.strptime(msgid[12:26], "%Y%m%d%H%M%S").timestamp()
    except ValueError:
        return 0.0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _same(row: TradeRow, digest: envelope.Digest) -> bool:
    """Whether a submission is the journalled trade's payload again."""
    return envelope.same_payload(row.payload_hash, digest, lambda: envelope.loads(row.request_bytes)["input"])


def _archived_unsent(row: TradeRow) -> Refused:
    return Refused(422, f"msgid {row.his_msgid or row.msgid} names a trade fep never sent, archived since: a msgid "
                        f"names one trade forever, so send it again under a new msgid")


def _reused(row: TradeRow) -> Refused:
    return Refused(422, f"msgid {row.his_msgid or row.msgid} was already used for a different trade ({row.infno}); "
                        f"a msgid names one trade forever")
