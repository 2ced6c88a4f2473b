"""Each room of the engine alone, on the bench of tests/rooms.py: a real journal on a temp file, a Clock
for time, a scripted bureau link. Milliseconds each."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from twisted.internet import defer, task

from fep import envelope, refunds, session as session_room
from fep.confirm import ConfirmWindows, NotAwaiting
from fep.journal import NewTrade, TradeRow
from fep.lanes import LaneBusy, Lanes, Step
from fep.session import Session, SignInFailed
from fep.states import State
from tests.rooms import (NOT_SIGNED_IN, START, Bench, Desk, Hang, Policy, bench, late, lost, not_sent, ok,  # noqa: F401
                         refused, settled, visit)

S = State


# ==== lanes: one send at a time per person; deferred work in arrival order ==========================
class Gate:
    """Something at the bureau until the test lets it answer."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self._open: dict[str, defer.Deferred[None]] = {}

    async def at_bureau(self, lanes: Lanes, psn: str, what: str, within: float | None = None) -> str:
        async with lanes.sending(psn, what, within=within):
            self.log.append(f"{what} sent")
            self._open[what] = d = defer.Deferred()
            await d
            self.log.append(f"{what} answered")
        return what

    def answer(self, what: str) -> None:
        self._open.pop(what).callback(None)


class Replays:
    """The lanes' `deliver`: records what it was asked to send; answers with the scripted step per msgid
    (NEXT when nothing is scripted)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.steps: dict[str, list[Step]] = {}

    async def __call__(self, msgid: str) -> Step:
        self.sent.append(msgid)
        steps = self.steps.get(msgid)
        return steps.pop(0) if steps else Step.NEXT


def test_a_person_has_one_trade_at_the_bureau_at_a_time_and_nobody_else_waits_for_them(bench: Bench) -> None:
    lanes, gate = Lanes(bench.clock, Replays()), Gate()
    first = defer.ensureDeferred(gate.at_bureau(lanes, "ZHANG", "2207 zhang's settlement"))
    second = defer.ensureDeferred(gate.at_bureau(lanes, "ZHANG", "2208 zhang's cancel"))
    other = defer.ensureDeferred(gate.at_bureau(lanes, "LI", "2207 li's settlement"))
    # Zhang's cancel waits for his settlement to come back; Li's settlement goes at once.
    assert gate.log == ["2207 zhang's settlement sent", "2207 li's settlement sent"]
    gate.answer("2207 li's settlement")
    assert bench.run(other) == "2207 li's settlement"
    assert "2208 zhang's cancel sent" not in gate.log
    gate.answer("2207 zhang's settlement")
    assert bench.run(first) and gate.log[-1] == "2208 zhang's cancel sent"
    gate.answer("2208 zhang's cancel")
    assert bench.run(second) == "2208 zhang's cancel"


def test_a_persons_deferred_work_drains_in_the_order_it_arrived(bench: Bench) -> None:
    replays = Replays()
    lanes = Lanes(bench.clock, replays)
    for msgid in ("zhang-2203", "zhang-2204-a", "zhang-2204-b"):
        lanes.defer("ZHANG", msgid)
    lanes.defer("LI", "li-2204")
    lanes.defer("ZHANG", "zhang-2203")  # a second defer of the same work changes nothing
    assert lanes.waiting("ZHANG") == ["zhang-2203", "zhang-2204-a", "zhang-2204-b"]
    lanes.kick_all()
    bench.settle()
    assert replays.sent == ["zhang-2203", "zhang-2204-a", "zhang-2204-b", "li-2204"]
    assert lanes.waiting("ZHANG") == [] and lanes.people() == []


def test_work_that_holds_the_queue_stops_the_drain_and_later_work_waits_behind_it(bench: Bench) -> None:
    replays = Replays()
    lanes = Lanes(bench.clock, replays)
    replays.steps["zhang-2204-a"] = [Step.HOLD, Step.HOLD]  # parked: the bureau refused it
    for msgid in ("zhang-2204-a", "zhang-2204-b"):
        lanes.defer("ZHANG", msgid)
    lanes.kick("ZHANG")
    bench.settle()
    assert replays.sent == ["zhang-2204-a"] and lanes.waiting("ZHANG") == ["zhang-2204-a", "zhang-2204-b"]
    lanes.kick("ZHANG")  # the next tick: still parked
    bench.settle()
    assert replays.sent == ["zhang-2204-a", "zhang-2204-a"]
    lanes.done("ZHANG", "zhang-2204-a")  # a person dropped it: the rest goes on
    lanes.kick("ZHANG")
    bench.settle()
    assert replays.sent[-1] == "zhang-2204-b" and lanes.waiting("ZHANG") == []


def test_an_unreachable_bureau_stops_the_drain_and_the_next_kick_resumes_it_at_the_same_head(bench: Bench) -> None:
    replays = Replays()
    lanes = Lanes(bench.clock, replays)
    replays.steps["zhang-2203"] = [Step.LATER]
    for msgid in ("zhang-2203", "zhang-2204"):
        lanes.defer("ZHANG", msgid)
    lanes.kick("ZHANG")
    bench.settle()
    assert replays.sent == ["zhang-2203"] and lanes.waiting("ZHANG") == ["zhang-2203", "zhang-2204"]
    assert not lanes.draining("ZHANG") and lanes.people() == ["ZHANG"]
    lanes.kick("ZHANG")
    bench.settle()
    assert replays.sent == ["zhang-2203", "zhang-2203", "zhang-2204"] and lanes.people() == []


def test_a_lane_with_nothing_left_is_forgotten_however_many_people_came(bench: Bench) -> None:
    replays = Replays()
    lanes, gate = Lanes(bench.clock, replays), Gate()
    for n in range(2000):
        psn = f"P{n:05d}"
        sending = defer.ensureDeferred(gate.at_bureau(lanes, psn, f"2207 of {psn}"))
        busy = defer.ensureDeferred(gate.at_bureau(lanes, psn, f"2208 of {psn}", within=0.5))
        lanes.defer(psn, f"{psn}-2204")
        lanes.kick(psn)
        bench.wait(0.5)  # the cancel gives up waiting
        with pytest.raises(LaneBusy):
            bench.run(busy)
        gate.answer(f"2207 of {psn}")
        bench.run(sending)
    assert len(replays.sent) == 2000 and lanes.people() == []
    assert lanes._lanes == {}  # nothing kept per person once they are through
    assert bench.clock.getDelayedCalls() == []


def test_a_trade_that_cannot_get_the_persons_slot_in_time_is_told_what_holds_it(bench: Bench) -> None:
    lanes = Lanes(bench.clock, Replays())
    holding: defer.Deferred[None] = defer.Deferred()

    async def settlement() -> None:
        async with lanes.sending("ZHANG", "2207 门诊结算") as name:
            name("2207 H43010000001202611230900000001")  # once it has its msgid
            await holding

    first = defer.ensureDeferred(settlement())
    with pytest.raises(LaneBusy, match="2207 H43010000001202611230900000001 is still at the bureau"):
        bench.run(Gate().at_bureau(lanes, "ZHANG", "2208 门诊结算撤销", within=5.0), advance=1.0)
    assert bench.clock.seconds() - START == pytest.approx(5.0)
    holding.callback(None)
    bench.run(first)
    assert lanes._lanes == {}


# ==== session: one sign_no a day ====================================================================
class SignIns:
    """A fake 9001 for the session alone: answers `after` seconds later on the clock (None: at once),
    with SIGN0001, SIGN0002, ... or, while `failing`, with SignInFailed."""

    def __init__(self, bench: Bench, after: float | None = 0.2) -> None:
        self.bench, self.after = bench, after
        self.asked = 0
        self.failing = False

    def __call__(self) -> defer.Deferred[str]:
        self.asked += 1
        n, failing = self.asked, self.failing

        def answer() -> str:
            if failing:
                raise SignInFailed("9001 refused: 操作员不存在")
            return f"SIGN{n:04d}"

        if self.after is None:
            return defer.maybeDeferred(answer)
        return task.deferLater(self.bench.clock, self.after, answer)


def test_many_trades_at_once_sign_in_once_and_all_go_under_that_sign_no(bench: Bench) -> None:
    sign_ins = SignIns(bench)
    session = Session(bench.now, sign_ins, NOT_SIGNED_IN)
    morning = [defer.ensureDeferred(session.ensure()) for _ in range(50)]
    assert bench.run(defer.gatherResults(morning), advance=0.1) == ["SIGN0001"] * 50
    assert sign_ins.asked == 1 and session.signed_in
    bench.wait(3600)  # later that day
    assert bench.run(defer.gatherResults([defer.ensureDeferred(session.ensure()) for _ in range(10)])) == \
        ["SIGN0001"] * 10
    assert sign_ins.asked == 1


def test_a_failed_sign_in_is_not_tried_again_before_retry_after(bench: Bench) -> None:
    sign_ins = SignIns(bench)
    sign_ins.failing = True
    session = Session(bench.now, sign_ins, NOT_SIGNED_IN)
    assert bench.run(session.ensure(), advance=0.1) == ""  # no session yet: the trade goes without one
    failed_at = bench.now()
    assert sign_ins.asked == 1 and not session.signed_in
    for _ in range(20):  # trades keep coming while the bureau refuses sign-in: none of them signs in
        bench.wait((session_room.RETRY_AFTER - 0.1) / 20)
        assert bench.run(session.ensure()) == ""
    assert sign_ins.asked == 1
    sign_ins.failing = False
    bench.wait(failed_at + session_room.RETRY_AFTER - bench.now())
    assert bench.run(session.ensure(), advance=0.1) == "SIGN0002"
    assert sign_ins.asked == 2 and session.signed_in


def test_forgetting_a_stale_sign_no_changes_nothing_forgetting_the_current_one_signs_in_again(bench: Bench) -> None:
    sign_ins = SignIns(bench)
    session = Session(bench.now, sign_ins, NOT_SIGNED_IN)
    assert bench.run(session.ensure(), advance=0.1) == "SIGN0001"
    session.forget("SIGN0000")  # a trade sent under yesterday's session was refused: not ours to undo
    assert session.signed_in and bench.run(session.ensure()) == "SIGN0001" and sign_ins.asked == 1
    assert session.refused("签到信息不存在，请重新签到") and not session.refused("原交易不存在")
    session.forget("SIGN0001")  # the bureau does not know the current one
    assert not session.signed_in
    assert bench.run(session.ensure(), advance=0.1) == "SIGN0002" and sign_ins.asked == 2


def test_the_first_trade_after_midnight_signs_in_again(bench: Bench) -> None:
    sign_ins = SignIns(bench)
    session = Session(bench.now, sign_ins, NOT_SIGNED_IN)
    bench.wait_until(datetime(2026, 11, 23, 23, 59, 50))
    assert bench.run(session.ensure(), advance=0.1) == "SIGN0001"
    bench.wait_until(datetime(2026, 11, 23, 23, 59, 59))
    assert session.signed_in and bench.run(session.ensure()) == "SIGN0001"
    bench.wait_until(datetime(2026, 11, 24, 0, 0, 1))
    assert not session.signed_in
    assert bench.run(session.ensure(), advance=0.1) == "SIGN0002" and sign_ins.asked == 2


def test_a_sign_in_that_answers_at_once_does_not_keep_the_session_from_signing_in_again(bench: Bench) -> None:
    """A sign_in whose awaitable has already fired (e.g. a journal that fails at once) is still a sign-in."""
    sign_ins = SignIns(bench, after=None)
    session = Session(bench.now, sign_ins, NOT_SIGNED_IN)
    assert bench.run(session.ensure()) == "SIGN0001"
    session.forget("SIGN0001")
    assert bench.run(session.ensure()) == "SIGN0002" and sign_ins.asked == 2


# ==== refunds: last settlement first, in the bureau's order =========================================
MONEY = ("2207", "2208", "2304", "2305")
SETTLING = frozenset({"2207", "2304"})


def settle_in_journal(bench: Bench, psn: str, setl_id: str, setl_time: str, infno: str = "2207") -> TradeRow:
    """A settlement the bureau answered, journalled as the engine records it."""
    row = bench.accept(infno, {"psn_no": psn, "mdtrt_id": f"M-{setl_id}"})
    answer = envelope.dumps({"infcode": 0, "output": {"setlinfo": {"setl_id": setl_id, "setl_time": setl_time}}})
    return bench.run(bench.journal.transition(row.msgid, "answer", answer=answer.decode(), setl_id=setl_id))


def cancel_in_journal(bench: Bench, psn: str, settlement: TradeRow, setl_id: str) -> TradeRow:
    row = bench.accept("2208", {"psn_no": psn, "setl_id": settlement.setl_id, "mdtrt_id": "M"})
    answer = envelope.dumps({"infcode": 0, "output": {"setlinfo": {"setl_id": setl_id, "setl_time": ""}}})
    return bench.run(bench.journal.transition(row.msgid, "answer", answer=answer.decode(), setl_id=setl_id,
                                              cancels=settlement.setl_id))


def in_force(bench: Bench, psn: str) -> list[TradeRow]:
    return refunds.in_force(bench.run(bench.journal.settlements_of(psn, MONEY)), SETTLING)


def test_the_bureaus_order_is_its_settlement_time_then_its_id_never_the_journals_row_order(bench: Bench) -> None:
    # The morning's 2207 met a dead link and was settled only at 10:05; the 10:01 one was journalled after it.
    late_one = settle_in_journal(bench, "ZHANG", "S0000000009", "2026-11-23 10:05:00")
    early = settle_in_journal(bench, "ZHANG", "S0000000011", "2026-11-23 10:01:00")
    same_second_low = settle_in_journal(bench, "ZHANG", "S0000000010", "2026-11-23 10:03:00")
    same_second_high = settle_in_journal(bench, "ZHANG", "S0000000100", "2026-11-23 10:03:00")
    settle_in_journal(bench, "LI", "S0000000001", "2026-11-23 11:00:00")  # another person's
    assert [r.msgid for r in in_force(bench, "ZHANG")] == [early.msgid, same_second_low.msgid,
                                                          same_second_high.msgid, late_one.msgid]


def test_only_the_bureaus_last_settlement_of_the_person_may_be_cancelled(bench: Bench) -> None:
    first = settle_in_journal(bench, "ZHANG", "S1", "2026-11-23 10:05:00")  # settled last, journalled first
    settle_in_journal(bench, "ZHANG", "S2", "2026-11-23 10:01:00")
    settlements = in_force(bench, "ZHANG")
    with pytest.raises(refunds.OutOfOrder, match=f"cancel S1 \\(2207, msgid {first.msgid}\\) before S2"):
        refunds.check_cancel(settlements, "S2")
    refunds.check_cancel(settlements, "S1")  # the last one: fine
    refunds.check_cancel(settlements, "S-settled-elsewhere")  # not fep's: the bureau decides


def test_cancelled_settlements_do_not_count_for_refund_order(bench: Bench) -> None:
    first = settle_in_journal(bench, "ZHANG", "S1", "2026-11-23 10:01:00")
    last = settle_in_journal(bench, "ZHANG", "S2", "2026-11-23 10:05:00")
    with pytest.raises(refunds.OutOfOrder):
        refunds.check_cancel(in_force(bench, "ZHANG"), "S1")
    cancel_in_journal(bench, "ZHANG", last, "C2")
    assert [r.msgid for r in in_force(bench, "ZHANG")] == [first.msgid]  # the cancel is no settlement either
    refunds.check_cancel(in_force(bench, "ZHANG"), "S1")


def test_a_reversal_of_a_trade_fep_does_not_hold_waits_for_what_the_bureau_settled_after_it(bench: Bench) -> None:
    settle_in_journal(bench, "ZHANG", "S1", "2026-11-23 10:01:00")
    settlements = in_force(bench, "ZHANG")
    made = datetime(2026, 11, 23, 10, 0, 30).timestamp()  # a 2207 settled behind fep's back, before S1
    with pytest.raises(refunds.OutOfOrder, match="cancel S1 .* before the reversal of H43"):
        refunds.check_reversal(settlements, "H43010000001202611231000300001", made)
    # made in the same second as S1 or after: S1 is not provably later
    refunds.check_reversal(settlements, "H43010000001202611231001000001",
                           datetime(2026, 11, 23, 10, 1, 0).timestamp() + 0.5)
    refunds.check_reversal(settlements, "H43010000001202611231002000001",
                           datetime(2026, 11, 23, 10, 2, 0).timestamp())


# ==== confirm: the HIS confirms a held settlement within its window =================================
WINDOW = 60.0


class Undo:
    """What the resolver does when a window closes (the `expired` callback): journal the 2601 that undoes
    the settlement, moving it to RESOLVING."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.closed: list[TradeRow] = []

    async def __call__(self, row: TradeRow) -> None:
        self.closed.append(row)
        env = {"infno": "2601", "input": {"data": {"psn_no": row.psn_no, "omsgid": row.msgid, "oinfno": row.infno}}}
        await self.bench.journal.resolve_with(row.msgid, NewTrade("2601", None, row.psn_no, S.SENT,
                                                                  envelope.payload_hash(env), env, related=row.msgid),
                                              "the HIS did not confirm in time")


def held_settlement(bench: Bench, windows: ConfirmWindows) -> TradeRow:
    """A 2207 the bureau settled, held until the HIS confirms it recorded it, its window armed."""
    row = bench.accept("2207", {"psn_no": "ZHANG", "mdtrt_id": "M1"})
    row = bench.run(bench.journal.transition(row.msgid, "answer_held", deadline=bench.now() + WINDOW, setl_id="S1",
                                             answer='{"infcode":0,"output":{}}'))
    windows.arm(row)
    return row


def test_a_confirm_in_the_window_holds_the_settlement_and_the_window_never_closes(bench: Bench) -> None:
    undo = Undo(bench)
    windows = ConfirmWindows(bench.clock, bench.now, bench.journal, undo)
    row = held_settlement(bench, windows)
    bench.wait(WINDOW - 1)
    assert bench.run(windows.confirm(row.msgid)).state is S.CONFIRMED
    assert bench.clock.getDelayedCalls() == []  # the window's timer is cancelled
    bench.wait(2 * WINDOW)
    assert undo.closed == [] and bench.row(row.msgid).state is S.CONFIRMED


def test_a_window_that_closes_unconfirmed_has_the_settlement_undone(bench: Bench) -> None:
    undo = Undo(bench)
    windows = ConfirmWindows(bench.clock, bench.now, bench.journal, undo)
    row = held_settlement(bench, windows)
    bench.wait(WINDOW - 0.1)
    assert undo.closed == []
    bench.wait(0.1)
    assert [r.msgid for r in undo.closed] == [row.msgid] and undo.closed[0].state is S.AWAITING_CONFIRM
    assert bench.row(row.msgid).state is S.RESOLVING and bench.failures == []


def test_a_confirm_after_the_window_closed_is_refused(bench: Bench) -> None:
    undo = Undo(bench)
    windows = ConfirmWindows(bench.clock, bench.now, bench.journal, undo)
    row = held_settlement(bench, windows)
    bench.wait(WINDOW + 5)
    with pytest.raises(NotAwaiting, match=f"trade {row.msgid} is RESOLVING, not awaiting confirmation"):
        bench.run(windows.confirm(row.msgid))
    assert bench.row(row.msgid).state is S.RESOLVING


def test_confirming_twice_is_fine(bench: Bench) -> None:
    windows = ConfirmWindows(bench.clock, bench.now, bench.journal, Undo(bench))
    row = held_settlement(bench, windows)
    first = bench.run(windows.confirm(row.msgid))
    again = bench.run(windows.confirm(row.msgid))  # the HIS did not hear the first answer
    assert first.state is again.state is S.CONFIRMED and again.msgid == row.msgid


def test_a_confirm_racing_the_close_is_refused_like_one_after_the_close(bench: Bench) -> None:
    """The window closes (its timer has fired) and the HIS's confirm comes in the same instant, before the
    undo is journalled: the window is closed, so the confirm is NotAwaiting and the settlement is undone."""
    undo = Undo(bench)
    windows = ConfirmWindows(bench.clock, bench.now, bench.journal, undo)
    row = held_settlement(bench, windows)
    bench.clock.advance(WINDOW)  # the window closes now ...
    racing = defer.ensureDeferred(windows.confirm(row.msgid))  # ... and the confirm arrives, by a hair later
    with pytest.raises(NotAwaiting):
        bench.run(racing)
    bench.settle()
    assert bench.row(row.msgid).state is S.RESOLVING and len(undo.closed) == 1
