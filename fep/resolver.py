"""Resolution: the one place that decides what became of a trade whose outcome is unknown.

UNKNOWN -> RESOLVING -> REVERSED | NOT_NEEDED | NEEDS_ATTENTION, by the trade's `on_unknown` policy:
resend the same msgid (the bureau answers a repeat with its first answer), reverse it by 2601, cancel it
with its dedicated undo, or park it for a person. A reversal asked for by the HIS or a person (REVOKING)
is driven the same way. Each step is one durable write; the drive survives restarts because it reads
only the journal's states.

- Tries count only sends whose outcome stayed unknown and refusals of a resolving trade; a send that
  provably never left counts nothing, so an outage of any length ends with the trade resolved.
- The person's lane is held only while a trade is at the bureau, never during a backoff.
- Resends and repeats of a resolving trade go to the endpoint the original went to.
- A late success of a trade judged NOT_NEEDED (the 2601 found no record) reopens it: it is reversed again.
  One of a REVERSED trade is the answer its acknowledged 2601 erased: stored, nothing flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger

from fep import envelope, metrics
from fep.bureau import Delivery, NotSent, Unknown
from fep.config import Resolution
from fep.journal import IllegalTransition, Journal, Move, NewTrade, TradeRow
from fep.lanes import Lanes
from fep.msgid import well_formed
from fep.sender import Sender, recorded
from fep.states import State, sources
from fep.trades import Kind, OnUnknown, TradeBook, TradeDef

log = Logger()
S = State
DRIVEN = frozenset({S.UNKNOWN, S.RESOLVING, S.REVOKING})


@dataclass(frozen=True)
class Markers:
    """What the bureau's refusals mean (bureau config)."""
    not_found: tuple[str, ...]  # err_msg fragments of a 2601's "the original is not there"
    transient: tuple[str, ...]  # err_msg fragments of "not now": busy, a timeout inside the bureau
    # Seconds after a trade was lost during which the bureau may still be processing it: a 2601's "not
    # there" is believed only after them (bureau.late_grace, how long fep listens for a late answer).
    settle_after: float = 0.0

    def transient_refusal(self, answer: envelope.BureauAnswer) -> bool:
        return not answer.ok and any(m in answer.err_msg for m in self.transient)


DONE = None  # a step's result: the trade is where it ends (for now)


@dataclass(frozen=True)
class Again:
    """A step's result: drive again after `delay`; `unsent`: nothing left the box (no try was spent)."""
    delay: float
    unsent: bool = False


class Resolver:
    def __init__(self, clock: Any, journal: Journal, sender: Sender, lanes: Lanes, trades: Callable[[], TradeBook],
                 policy: Callable[[], Resolution], markers: Callable[[], Markers],
                 complete: Callable[[dict[str, Any]], dict[str, Any]],
                 answered: Callable[[TradeDef, TradeRow], Awaitable[None]] | None = None) -> None:
        """`trades`, `policy`, `markers`: read at each use, so a reload applies to the next step.
        `complete` fills the box's envelope fields of a resolving trade; `answered` hears of every success
        a resend gets, as the normal path's answers are heard."""
        self._clock = clock
        self._journal = journal
        self._sender = sender
        self._lanes = lanes
        self._trades = trades
        self._policy = policy
        self._markers = markers
        self._complete = complete
        self._answered = answered
        self._driving: set[str] = set()
        self._sleeping: dict[defer.Deferred[None], Any] = {}  # pauses after a not-sent try: end when the link is back

    # ---- entry points -------------------------------------------------------------------------------
    async def lost(self, trade: TradeDef, row: TradeRow) -> TradeRow:
        """The one path for an unknown outcome, however the trade was sent (first send, replay, found SENT
        at start). The first step is journalled before this returns, so the HIS hears what is being done."""
        metrics.UNKNOWN_OUTCOMES.labels(trade.infno).inc()
        log.warn("{infno} {msgid}: outcome unknown: {why}", infno=trade.infno, msgid=row.msgid, why=row.note)
        if trade.deferrable:
            self._lanes.defer(row.psn_no or "", row.msgid)  # until it is resolved, the person's later uploads wait
        if trade.on_unknown is OnUnknown.PERSON:
            row = await self._journal.transition(row.msgid, "give_up", note=f"outcome unknown ({row.note}); "
                                                 f"a person decides (on_unknown: person)")
        elif trade.on_unknown in (OnUnknown.REVERSE, OnUnknown.CANCEL):
            row, _ = await self._undo(trade, row, f"outcome unknown ({row.note})")
        self.resume(row.msgid)
        return row

    async def unconfirmed(self, row: TradeRow) -> None:
        """The confirmation window closed: the HIS failed to record the settlement, so it is undone."""
        try:
            await self._undo(self._trades().get(row.infno), row, "the HIS did not confirm in time")
        except IllegalTransition:
            return  # confirmed at the last moment
        self.resume(row.msgid)

    async def revoke(self, row: TradeRow, child: NewTrade, why: str, timeout: float) -> TradeRow:
        """A reversal asked for (by the HIS's 2601 or `fep reverse`) of a trade the journal holds as done.
        The 2601 is journalled with the original's move to REVOKING, in one write, and sent at once, the
        bureau waited for at most `timeout`; returns the 2601's row as it then is. A settlement still in its
        confirmation window was never confirmed: it is undone like one whose window closed, whatever the
        bureau answers this 2601."""
        if row.state is S.AWAITING_CONFIRM:
            row, reversal = await self._journal.resolve_with(row.msgid, child, why, deadline=self._settled_by())
        else:
            row, reversal = await self._journal.resolve_with(row.msgid, child, why, event="revoke")
        await self._run(lambda: self._send_resolving(row, reversal, timeout))
        self.resume(row.msgid)
        return await self._journal.get(reversal.msgid)  # type: ignore[return-value]

    async def late_answer(self, row: TradeRow) -> None:
        """An answer came after fep stopped waiting. A success of money fep has judged not at the bureau
        (NOT_NEEDED) means the bureau did settle it after all: undo it again, and alert. Which states a late
        success reopens is the trade machine's to say (fep.states)."""
        if not _late_success(self._trades().get(row.infno), row) or row.state not in sources("late_success"):
            return
        await self._reopen_late(row)

    async def reopen(self, row: TradeRow, why: str = "reopened by a person") -> TradeRow:
        """Resolve a parked trade afresh (or one judged not at the bureau that the bureau holds after all),
        its tries counted from zero. A trade whose policy is `person` is sent once more with its msgid; if
        that too gets no answer it is parked again."""
        row = await self._journal.transition(row.msgid, "reopen", note=why, attempts=0)
        trade = self._trades().get(row.infno)
        if trade.on_unknown is not OnUnknown.PERSON:
            self.resume(row.msgid)
        elif await self._run(lambda: self._resend(trade, row)) is not DONE:
            await self._journal.transition(row.msgid, "give_up", note="the resend a person asked for got no answer")
        return await self._journal.get(row.msgid)  # type: ignore[return-value]

    def resume(self, msgid: str) -> None:
        """Drive `msgid` to a final state in the background (once, however often this is called)."""
        if msgid not in self._driving:
            defer.ensureDeferred(self._drive(msgid))

    def link_back(self) -> None:
        """The bureau answers again: pauses after not-sent tries end now."""
        for d, call in list(self._sleeping.items()):
            if call.active():
                call.cancel()
                d.callback(None)

    # ---- the drive ------------------------------------------------------------------------------------
    async def _drive(self, msgid: str) -> None:
        self._driving.add(msgid)
        unsent = 0  # not-sent tries in a row: they pace the retries but spend no try
        try:
            while True:
                again = await self._run(lambda: self._step(msgid))
                if again is DONE:
                    return
                unsent = unsent + 1 if again.unsent else 0
                await self._pause(self._backoff(unsent) if again.unsent else again.delay, wake=again.unsent)
        finally:
            self._driving.discard(msgid)

    async def _run(self, step: Callable[[], Any]) -> Again | None:
        """One step; a failure (the journal, a bug) is logged and the step is tried again later, never
        left until the next restart."""
        try:
            return await step()
        except Exception:
            if self._journal.closing:  # fep is stopping: the next start picks the trade up from its state
                return DONE
            log.failure("a resolution step failed; it is tried again")
            return Again(self._backoff(len(self._policy().backoff)))

    async def _step(self, msgid: str) -> Again | None:
        row = await self._journal.get(msgid)
        if row is None or row.state not in DRIVEN:
            return DONE
        trade = self._trades().get(row.infno)
        if row.state is S.UNKNOWN:
            if trade.on_unknown in (OnUnknown.REVERSE, OnUnknown.CANCEL):
                await self._undo(trade, row, "resolving")  # stopped between "lost" and "resolve", or reopened
                return Again(0)
            if trade.on_unknown is OnUnknown.PERSON:
                await self._journal.transition(msgid, "give_up", note="outcome unknown; a person decides")
                return DONE
            return await self._resend(trade, row)
        child = await self._journal.get(row.resolver or "")
        if child is None:
            raise AssertionError(f"{msgid} is {row.state} without its resolving trade {row.resolver}")
        if child.state is S.ANSWERED:  # the bureau refused the last resolving trade: a fresh one
            return await self._reattempt(trade, row, child)
        if child.state in (S.SENT, S.UNKNOWN):
            return await self._send_resolving(row, child)
        await self._give_up(row, child, f"its resolving trade {child.msgid} is {child.state}")
        return DONE

    # ---- resend (on_unknown: resend) --------------------------------------------------------------------
    async def _resend(self, trade: TradeDef, row: TradeRow) -> Again | None:
        if row.attempts >= self._policy().max_tries:
            await self._journal.transition(row.msgid, "give_up", note=f"no answer after {row.attempts} tries")
            return DONE
        request = await self._sender.refreshed(row)
        async with self._lanes.sending(row.psn_no if trade.person_ordered else None,
                                       f"{trade.infno} {row.msgid} (sent again)"):
            row = await self._journal.transition(row.msgid, "resend", note="sent again with the same msgid",
                                                 request=request)
            outcome = await self._exchange(trade, row, row.endpoint)
        if not isinstance(outcome, Delivery):
            return outcome
        ans = outcome.answer
        if self._markers().transient_refusal(ans):  # "not now" is no answer to a resend: still unknown
            await self._journal.transition(row.msgid, "unsent", note=f"the bureau said not now: {ans.err_msg}")
            return Again(0, unsent=True)
        fields = recorded(trade, row, outcome)
        if not ans.ok and trade.deferrable:  # a promise the bureau refuses: a person must see it
            await self._journal.transition(row.msgid, "give_up", note=f"the bureau refused the promised "
                                           f"{trade.infno}: {ans.err_msg}", **fields)
            return DONE
        row = await self._journal.transition(row.msgid, "answer", note="answered on a resend", **fields)
        if trade.deferrable:
            self._lanes.done(row.psn_no or "", row.msgid)
            self._lanes.kick(row.psn_no or "")
        if ans.ok and self._answered is not None:
            await self._answered(trade, row)
        return DONE

    async def _exchange(self, trade: TradeDef, row: TradeRow, endpoint: str | None,
                        timeout: float | None = None) -> Delivery | Again:
        """Send `row` (SENT); a not-sent or unknown outcome is journalled and becomes the next Again."""
        try:
            return await self._sender.deliver(trade, row, endpoint, timeout)
        except NotSent as e:
            await self._journal.transition(row.msgid, "unsent", note=f"not sent: {e}")
            return Again(0, unsent=True)
        except Unknown as e:
            row = await self._journal.transition(row.msgid, "lost", note=str(e), attempts=row.attempts + 1,
                                                 endpoint=e.endpoint)
            return Again(self._backoff(row.attempts))

    # ---- resolving trades (2601, a dedicated cancel) ---------------------------------------------------------
    async def _undo(self, trade: TradeDef, row: TradeRow, why: str, event: str = "resolve",
                    **fields: Any) -> tuple[TradeRow, TradeRow]:
        if event == "resolve":
            fields["deadline"] = self._settled_by()
        return await self._journal.resolve_with(row.msgid, self._resolving_trade(trade, row), why, event, **fields)

    def _settled_by(self) -> float:
        """Until when a trade lost now may still be settled by the bureau (a RESOLVING row's `deadline`)."""
        return self._clock.seconds() + self._markers().settle_after

    def _resolving_trade(self, trade: TradeDef, row: TradeRow) -> NewTrade:
        if trade.on_unknown is OnUnknown.CANCEL and trade.cancel is not None:
            return self._in_envelope_of(row, trade.cancel.infno, trade.cancel_input(row.envelope["input"]))
        return self.reversal_of(row)

    def reversal_of(self, row: TradeRow, his_msgid: str | None = None, digest: str | None = None) -> NewTrade:
        """The 2601 that undoes `row`, naming the msgid the bureau knows it by; `his_msgid` and `digest`:
        the HIS's own, when the HIS asked for it."""
        child = self._in_envelope_of(row, "2601", {"data": {"psn_no": row.psn_no or "", "omsgid": row.msgid,
                                                            "oinfno": row.infno}})
        if his_msgid is not None:
            child.msgid = his_msgid if well_formed(his_msgid) else None
            child.his_msgid, child.payload_hash = his_msgid, digest or child.payload_hash
        return child

    def _in_envelope_of(self, row: TradeRow, infno: str, input_: dict[str, Any]) -> NewTrade:
        """A resolving trade travels in the original's envelope: same insured place, same operator."""
        env = self._complete({k: v for k, v in row.envelope.items() if k in (
            "insuplc_admdvs", "mdtrtarea_admvs", "recer_sys_code", "infver", "opter_type", "opter",
            "opter_name")} | {"infno": infno, "input": input_})
        return NewTrade(infno, None, row.psn_no, S.SENT, envelope.payload_hash(env), env, related=row.msgid)

    async def _send_resolving(self, row: TradeRow, child: TradeRow, timeout: float | None = None) -> Again | None:
        """One try of the resolving trade; it goes where the original went."""
        child_def = self._trades().get(child.infno)
        if child.state is S.UNKNOWN:
            if child.attempts >= self._policy().max_tries:
                await self._give_up(row, child, f"{child.infno} {child.msgid} got no answer after "
                                                f"{child.attempts} tries")
                return DONE
            request = await self._sender.refreshed(child)
        async with self._lanes.sending(row.psn_no, f"{child.infno} {child.msgid} (undoing {row.msgid})"):
            if child.state is S.UNKNOWN:
                child = await self._journal.transition(child.msgid, "resend", note="sent again with the same msgid",
                                                       request=request)
            outcome = await self._exchange(child_def, child, row.endpoint, timeout)
        if not isinstance(outcome, Delivery):
            return outcome
        return await self._resolving_answered(row, child, outcome)

    async def _resolving_answered(self, row: TradeRow, child: TradeRow, delivery: Delivery) -> Again | None:
        ans = delivery.answer
        if self._markers().transient_refusal(ans) and child.attempts:  # "not now" is no answer to a resend
            await self._journal.transition(child.msgid, "unsent", note=f"the bureau said not now: {ans.err_msg}")
            return Again(0, unsent=True)
        answered = (child.msgid, "answer", None if ans.ok else ans.err_msg, recorded(self._trades().get(child.infno),
                                                                                   child, delivery))
        if ans.ok:
            await self._journal.transitions(answered, (row.msgid, "undone", f"undone by {child.infno} {child.msgid}",
                                                       {}))
            metrics.RESOLUTIONS.labels("undone").inc()
            return DONE
        if row.state is S.REVOKING:  # the reversal asked for was refused: the settlement stands
            await self._journal.transitions(answered, (row.msgid, "stands", f"the bureau refused its reversal "
                                                       f"{child.msgid}: {ans.err_msg}", {}))
            metrics.RESOLUTIONS.labels("stands").inc()
            return DONE
        if child.infno == "2601" and any(m in ans.err_msg for m in self._markers().not_found):
            wait = (row.deadline or 0) - self._clock.seconds()
            if wait > 0:  # the bureau may still be processing the original: ask again once it cannot be
                await self._journal.transitions(answered)
                return Again(wait)
            _, row = await self._journal.transitions(answered, (row.msgid, "not_needed",
                                                                f"the bureau has no record of it ({ans.err_msg})", {}))
            metrics.RESOLUTIONS.labels("not_needed").inc()
            if _late_success(self._trades().get(row.infno), row):  # it arrived meanwhile: settled after all
                await self._reopen_late(row)
                return Again(0)  # this drive goes on with it
            return DONE
        await self._journal.transitions(answered)
        log.warn("{infno} {msgid} refused by the bureau: {err}; trying again", infno=child.infno,
                 msgid=child.msgid, err=ans.err_msg)
        return Again(self._backoff(row.attempts))

    async def _reattempt(self, trade: TradeDef, row: TradeRow, child: TradeRow) -> Again | None:
        refusal = f"{child.infno} {child.msgid} refused: {envelope.loads(child.answer or '{}').get('err_msg')}"
        if row.attempts >= self._policy().max_tries:
            await self._give_up(row, child, f"{row.attempts} tries; last {refusal}")
            return DONE
        await self._undo(trade, row, f"{refusal}; trying again", event="reattempt", attempts=row.attempts + 1)
        return Again(0)

    async def _give_up(self, row: TradeRow, child: TradeRow, why: str) -> None:
        moves = [(row.msgid, "give_up", why, {})]
        if child.state in (S.SENT, S.UNKNOWN):
            moves.insert(0, (child.msgid, "give_up", why, {}))
        await self._journal.transitions(*moves)
        metrics.RESOLUTIONS.labels("give_up").inc()

    async def _reopen_late(self, row: TradeRow) -> None:
        history = [event for _, event, _, _ in await self._journal.history(row.msgid)]
        note = "the bureau's late answer says it settled after fep had judged it: it is undone again"
        moves: list[Move] = [(row.msgid, "late_success", note, {})]
        if "late_success" in history:  # said settled, then "no record" again when reversed: a person checks
            moves.append((row.msgid, "give_up", "the bureau answered it settled, yet has no record of it "
                                                "when reversed: check with the bureau", {}))
        row = (await self._journal.transitions(*moves))[-1]
        metrics.LATE_SUCCESSES.labels(row.infno).inc()
        log.error("{infno} {msgid}: a late success arrived after fep judged it done; it is undone again",
                  infno=row.infno, msgid=row.msgid)
        self.resume(row.msgid)

    # ---- pacing --------------------------------------------------------------------------------------
    def _backoff(self, tries: int) -> float:
        steps = self._policy().backoff
        return steps[min(max(tries, 0), len(steps) - 1)] if steps else 1.0

    async def _pause(self, delay: float, wake: bool) -> None:
        if delay <= 0:
            return
        d: defer.Deferred[None] = defer.Deferred()
        call = self._clock.callLater(delay, d.callback, None)
        if wake:
            self._sleeping[d] = call
        try:
            await d
        finally:
            self._sleeping.pop(d, None)


def _late_success(trade: TradeDef, row: TradeRow) -> bool:
    if not row.late_answer or not (trade.moves_money and trade.kind is Kind.MONEY):
        return False
    try:
        return envelope.parse_bureau_answer(row.late_answer.encode("utf-8")).ok
    except envelope.BadAnswer:
        return False
