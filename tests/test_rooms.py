"""Each room of the engine alone, on the bench of tests/rooms.py: a real journal on a temp file, a Clock
for time, a scripted bureau link. Milliseconds each."""

from __future__ import annotations

from datetime import datetime

import pytest
from twisted.internet import defer, task

from fep import envelope, refunds, session as session_room
from fep.confirm import ConfirmWindows, NotAwaiting
from fep.journal import NewTrade, TradeRow
from fep.lanes import LaneBusy, Lanes, Step
from fep.session import Session, SignInFailed
from fep.states import State
from tests.rooms import (NOT_SIGNED_IN, START, Bench, Desk, Policy, bench, late, lost, not_sent,  # noqa: F401
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


# ==== resolver: what became of a trade whose outcome is unknown =====================================
@pytest.fixture
def desk(bench: Bench) -> Desk:
    return Desk(bench)


def sends(desk: Desk, infno: str) -> list[tuple[str, str | None]]:
    """Each send of `infno`: (msgid, the endpoint it was pinned to)."""
    return [(c.msgid, c.endpoint) for c in desk.link.sent(infno)]


def test_a_lost_settlement_is_reversed_where_it_went_even_when_another_endpoint_is_up(desk: Desk) -> None:
    desk.link.unreachable = {"bureau-a"}  # bureau-a is down: the 2207 goes to bureau-b ...
    desk.link.script("2207", lost())  # ... and no answer comes back
    row = desk.run(desk.his_sends("2207", **visit()))
    assert row.state is S.RESOLVING and row.endpoint == "bureau-b"
    desk.link.unreachable.clear()  # bureau-a is back before the 2601 goes: it must not go there
    desk.bench.settle(advance=1)
    [reversal] = desk.link.sent("2601")
    assert reversal.endpoint == reversal.went_to == "bureau-b"
    assert reversal.data == {"psn_no": "P0001", "omsgid": row.msgid, "oinfno": "2207"}
    assert reversal.msgid == row.resolver


def test_a_2601_the_bureau_acknowledges_reverses_the_settlement(desk: Desk) -> None:
    desk.link.script("2207", lost())
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=1)
    original, reversal = desk.bench.row(row.msgid), desk.bench.row(row.resolver or "")
    assert original.state is S.REVERSED and reversal.state is S.ANSWERED and reversal.related == row.msgid
    assert desk.bench.events(row.msgid) == ["accept", "lost", "resolve", "undone"]
    assert envelope.loads(reversal.answer or "")["infcode"] == 0


def test_a_2601_that_finds_no_original_means_the_settlement_never_happened(desk: Desk) -> None:
    desk.link.script("2207", lost())
    desk.link.script("2601", refused("原交易不存在"))
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=1)
    original = desk.bench.row(row.msgid)
    assert original.state is S.NOT_NEEDED and "no record" in (original.note or "")
    assert len(desk.link.sent("2601")) == 1


def test_a_late_success_after_not_needed_reopens_it_and_a_new_2601_reverses_it(desk: Desk) -> None:
    desk.link.script("2207", late(settled("S1"), after=5))  # the bureau settles it, and says so 5 s late
    desk.link.script("2601", refused("原交易不存在"))  # the first 2601 overtook the settlement at the bureau
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle()
    assert desk.bench.row(row.msgid).state is S.NOT_NEEDED
    desk.bench.settle(advance=1)  # the late answer arrives
    original = desk.bench.row(row.msgid)
    first, second = desk.resolving(row.msgid)
    assert original.state is S.REVERSED and original.resolver == second.msgid != first.msgid
    assert envelope.loads(original.late_answer or "")["output"]["setlinfo"]["setl_id"] == "S1"
    assert sends(desk, "2601") == [(first.msgid, "bureau-a"), (second.msgid, "bureau-a")]
    assert desk.bench.events(row.msgid) == ["accept", "lost", "resolve", "not_needed", "late_answer", "late_success",
                                            "resolve", "undone"]


def test_a_late_success_after_the_bureau_acknowledged_the_reversal_is_kept_and_flips_nothing(desk: Desk) -> None:
    # The 2601 found the settlement and erased it; the answer the bureau had made before is only late news.
    desk.link.script("2207", late(settled("S1"), after=5))
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle()
    assert desk.bench.row(row.msgid).state is S.REVERSED
    desk.bench.settle(advance=5)  # the late answer arrives
    original = desk.bench.row(row.msgid)
    assert original.state is S.REVERSED
    assert envelope.loads(original.late_answer or "")["output"]["setlinfo"]["setl_id"] == "S1"
    assert len(desk.link.sent("2601")) == 1
    assert desk.bench.events(row.msgid) == ["accept", "lost", "resolve", "undone", "late_answer"]


def test_a_late_success_that_came_while_the_2601_was_out_is_reversed_when_the_2601_finds_nothing(
        desk: Desk) -> None:
    desk.link.script("2207", late(settled("S1"), after=1))
    desk.link.script("2601", refused("原交易不存在", after=3))  # answered after the late success came
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=1)
    original = desk.bench.row(row.msgid)
    assert original.state is S.REVERSED, (original.state, desk.bench.events(row.msgid))
    assert len(desk.resolving(row.msgid)) == 2


def test_an_outage_of_any_length_spends_no_tries_and_ends_reversed_when_the_link_is_back(desk: Desk) -> None:
    desk.link.script("2207", lost())
    desk.link.script("2601", *[not_sent() for _ in range(1000)])  # then the link is back: answered
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=60)
    original, reversal = desk.bench.row(row.msgid), desk.bench.row(row.resolver or "")
    assert original.state is S.REVERSED and not desk.link.down
    assert sends(desk, "2601") == [(reversal.msgid, "bureau-a")] * 1001  # one 2601, never left until the last
    assert reversal.attempts == 0 and original.attempts == 1  # only the 2207's own lost send counted
    assert len(desk.resolving(row.msgid)) == 1


def test_the_persons_lane_is_free_while_the_reversal_waits_to_try_again(bench: Bench) -> None:
    desk = Desk(bench, Policy(max_tries=3, backoff=(0, 30, 60)))
    desk.link.script("2207", lost(), settled("S2"))
    desk.link.script("2601", not_sent())  # the 2601 finds the bureau unreachable: it tries again in 30 s
    row = desk.run(desk.his_sends("2207", **visit(1)))
    bench.settle()
    assert bench.row(row.resolver or "").state is S.UNKNOWN and bench.clock.getDelayedCalls()
    paused_at = bench.now()
    # The same patient's next visit is settled during the pause, without waiting for it (no clock moves).
    second = desk.run(desk.his_sends("2207", **visit(2)))
    assert second.state is S.ANSWERED and second.setl_id == "S2" and bench.now() == paused_at
    bench.settle(advance=5)
    assert bench.row(row.msgid).state is S.REVERSED
    assert [c.at - paused_at for c in desk.link.sent("2601")] == [0, 30]


def test_a_2601_refused_for_the_session_signs_in_again_and_goes_again_under_the_new_sign_no(desk: Desk) -> None:
    desk.link.script("2207", lost())
    desk.link.script("2601", refused("签到信息不存在，请重新签到"))  # the bureau restarted and forgot fep's session
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=1)
    reversal = desk.bench.row(row.resolver or "")
    assert desk.bench.row(row.msgid).state is S.REVERSED
    assert [(c.msgid, c.sign_no) for c in desk.link.sent("2601")] == [(reversal.msgid, "SIGN0001"),
                                                                      (reversal.msgid, "SIGN0002")]
    assert len(desk.link.sent("9001")) == 2 and desk.session.sign_no == "SIGN0002"
    assert "resign" in desk.bench.events(reversal.msgid) and reversal.envelope["sign_no"] == "SIGN0002"
    assert reversal.attempts == 0  # a session fault spends no try


def test_a_busy_bureau_is_no_answer_to_a_resent_cancel_it_is_resent_until_the_real_answer(desk: Desk) -> None:
    desk.link.script("2207", settled("S1"))
    settlement = desk.run(desk.his_sends("2207", **visit()))
    desk.link.script("2208", lost(), refused("系统繁忙，请稍后再试"), settled("C1"))
    cancel = desk.run(desk.his_sends("2208", psn_no="P0001", setl_id="S1", mdtrt_id=visit()["mdtrt_id"]))
    assert cancel.state is S.UNKNOWN
    desk.bench.settle()  # the resend was answered "busy": still unknown, nothing stored as its answer
    waiting = desk.bench.row(cancel.msgid)
    assert waiting.state is S.UNKNOWN and waiting.answer is None and "系统繁忙" in (waiting.note or "")
    desk.bench.settle(advance=1)
    done = desk.bench.row(cancel.msgid)
    assert done.state is S.ANSWERED and envelope.loads(done.answer or "")["infcode"] == 0
    assert done.setl_id == "C1" and done.cancels == settlement.setl_id == "S1"
    assert sends(desk, "2208") == [(cancel.msgid, None), (cancel.msgid, "bureau-a"), (cancel.msgid, "bureau-a")]


def test_a_journal_failure_in_a_step_does_not_stop_the_resolution(desk: Desk) -> None:
    # The write that records the acknowledged 2601 fails once: the 2601 is sent again with its msgid (the
    # bureau answers a repeat with its first answer) and the write is made then.
    desk.journal.fail_once("transitions", when=lambda *moves: any(m[1] == "undone" for m in moves))
    desk.link.script("2207", lost())
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=1)
    assert len(desk.journal.faults_raised) == 1
    assert desk.bench.row(row.msgid).state is S.REVERSED
    assert sends(desk, "2601") == [(row.resolver, "bureau-a")] * 2
    assert any("resolution step failed" in f for f in desk.bench.failures)


def test_a_2601_that_never_gets_an_answer_is_given_to_a_person_after_max_tries(desk: Desk) -> None:
    desk.link.script("2207", lost())
    desk.link.script("2601", *[lost() for _ in range(10)])
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.bench.settle(advance=1)
    original, reversal = desk.bench.row(row.msgid), desk.bench.row(row.resolver or "")
    assert original.state is reversal.state is S.NEEDS_ATTENTION
    assert "no answer after 3 tries" in (original.note or "")
    assert sends(desk, "2601") == [(reversal.msgid, "bureau-a")] * 3 and reversal.attempts == 3


def test_a_reversal_asked_for_that_the_bureau_refuses_leaves_the_settlement_standing(desk: Desk) -> None:
    desk.link.script("2207", settled("S1"))
    row = desk.run(desk.his_sends("2207", **visit()))
    desk.link.script("2601", refused("该结算已对账，不允许冲正"))
    reversal = desk.run(desk.resolver.revoke(row, desk.resolver.reversal_of(row), "the HIS asked for a reversal", timeout=8))
    assert reversal.state is S.ANSWERED and "不允许冲正" in (reversal.answer or "")
    desk.bench.settle(advance=1)
    original = desk.bench.row(row.msgid)
    assert original.state is S.ANSWERED and original.setl_id == "S1" and "不允许冲正" in (original.note or "")
    assert desk.bench.events(row.msgid)[-2:] == ["revoke", "stands"] and len(desk.link.sent("2601")) == 1
