"""Money: what the HIS heard, what the journal holds and what the bureau's ledger holds agree, whatever the
order in which the bureau processed things, and refunds go last settlement first in the bureau's order."""

from __future__ import annotations

import time

import pytest

from fep import envelope
from fep.sim.world import ZHANG, Visit, World, his_msgid, said, setl_id, settled_visit, wait_for


def test_a_reversal_that_overtook_its_slow_settlement_is_done_again_when_the_settlement_lands(world: World) -> None:
    """The bureau is slow with a 2207: fep times out, its 2601 arrives first and finds nothing, then the bureau
    settles the 2207 and says so late; fep reverses it again, and nobody is left charged."""
    world.configure(trades={"2207": {"timeout": 1}}, fep={"bureau": {"late_grace": 10}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="slow", infno="2207", seconds=2, times=1)
    answer = visit.settle()
    assert answer["fep_state"] == "RESOLVING", said(answer)
    msgid = answer["fep_msgid"]
    wait_for(lambda: world.ledger(), what="the bureau to get round to the 2207")  # after the 2601 found nothing
    world.wait_state(msgid, "REVERSED", timeout=15)
    assert [(s["msgid"], s["state"]) for s in world.ledger()] == [(msgid, "reversed")]
    world.assert_ledgers_agree()
    heard = world.his.lookup(msgid)
    assert heard["infcode"] == -1 and heard["fep_state"] == "REVERSED", said(heard)


def test_a_cancel_not_sent_in_an_outage_is_refused_when_resent_after_a_newer_settlement(running: World) -> None:
    """A 2208 failed NOT_SENT while the bureau was down; the person was settled again since; the HIS resends the
    old cancel with its msgid: refused (refund order), and the old settlement stays in force."""
    first, s1 = settled_visit(running, ZHANG)
    cancel = his_msgid(21)
    with running.outage():
        status, failed = first.post("2208", first.cancel_input(setl_id(s1)), msgid=cancel)
    assert status == 200 and failed["fep_state"] == "NOT_SENT", said(failed)
    _, s2 = settled_visit(running, ZHANG)

    status, again = first.post("2208", first.cancel_input(setl_id(s1)), msgid=cancel)
    assert status == 200 and (again["fep_state"], again["fep_reason"]) == ("NOT_SENT", "conflict"), said(again)
    assert setl_id(s2) in again["err_msg"]  # what to cancel first
    assert running.live() == [s1["fep_msgid"], s2["fep_msgid"]]
    running.assert_ledgers_agree()


def test_a_settlement_not_sent_in_an_outage_is_refused_when_resent_while_an_earlier_upload_is_parked(
        running: World) -> None:
    """The person's upload was queued during an outage, and so was (as NOT_SENT) the settlement after it; back
    up, the bureau refuses the upload (parked); the HIS resends the settlement: refused 409, never sent."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    with running.outage():
        parked = visit.bad_upload().upload_fees()
        failed = visit.settle(msgid=his_msgid(22))
    assert parked["fep_state"] == "QUEUED" and failed["fep_state"] == "NOT_SENT", (said(parked), said(failed))
    running.wait_state(parked["fep_msgid"], "NEEDS_ATTENTION")

    status, again = visit.post("2207", visit.settlement_input(), msgid=failed["fep_msgid"])
    assert status == 200 and (again["fep_state"], again["fep_reason"]) == ("NOT_SENT", "conflict"), said(again)
    assert parked["fep_msgid"] in again["err_msg"]
    assert "2207" not in {infno for _, infno in running.sim_answers()}
    assert running.ledger() == []


def test_refund_order_is_the_bureau_s_order_of_settlement_not_the_journal_s(running: World) -> None:
    """Settlement A failed NOT_SENT in an outage; B of the same person settled; A, resent, settled after it. At
    the bureau A is the last: B's cancel is refused until A is cancelled."""
    a = Visit(running.his, ZHANG)
    a.up_to_settlement()
    with running.outage():
        failed = a.settle(msgid=his_msgid(31))
    assert failed["fep_state"] == "NOT_SENT", said(failed)
    b, settled_b = settled_visit(running, ZHANG)
    settled_a = a.settle(msgid=failed["fep_msgid"])
    assert settled_a["infcode"] == 0, said(settled_a)
    assert running.live() == [settled_b["fep_msgid"], settled_a["fep_msgid"]]  # the bureau's order: B, then A

    status, refused = b.post("2208", b.cancel_input(setl_id(settled_b)))
    assert status == 200 and (refused["fep_state"], refused["fep_reason"]) == ("REFUSED", "conflict"), said(refused)
    assert setl_id(settled_a) in refused["err_msg"]
    assert running.live() == [settled_b["fep_msgid"], settled_a["fep_msgid"]]
    for visit, settled in ((a, settled_a), (b, settled_b)):
        status, cancelled = visit.post("2208", visit.cancel_input(setl_id(settled)))
        assert status == 200 and cancelled["infcode"] == 0, said(cancelled)
    running.assert_ledgers_agree()


def test_a_reversal_whose_bureau_session_is_gone_signs_in_again_and_is_done(running: World) -> None:
    """The bureau forgets fep's session while fep repeats a 2601: fep signs in again and the settlement is
    reversed, instead of the 2601 being refused until fep gives up."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="drop_after", infno="2207", times=1)
    running.fault(mode="drop_before", infno="2601", times=2)
    answer = visit.settle()
    assert answer["fep_state"] == "RESOLVING", said(answer)
    running.expire_sessions()  # before the third 2601
    running.wait_state(answer["fep_msgid"], "REVERSED", timeout=15)
    assert [s["state"] for s in running.ledger()] == ["reversed"]
    running.assert_ledgers_agree()


def test_after_the_bureau_forgets_its_sessions_the_next_query_is_answered(running: World) -> None:
    """The bureau forgot fep's session; the HIS's next 1101 is answered: fep signs in again and sends it again,
    because 'not signed in' is never a trade's answer."""
    visit = Visit(running.his, ZHANG)
    assert visit.identify()["infcode"] == 0
    running.expire_sessions()
    answer = visit.identify()
    assert answer["infcode"] == 0, said(answer)
    assert len(running.journal("infno='9001'")) == 2
    assert envelope.loads(running.trade(answer["fep_msgid"])["answer"])["infcode"] == 0


def test_a_reversal_outlasting_an_outage_longer_than_its_tries_is_done_when_the_bureau_returns(world: World) -> None:
    """The 2207's answer is lost and the bureau then goes down for longer than the reversal's tries would last:
    attempts that could not be sent are not tries, and the 2601 goes when the bureau is back."""
    world.configure(fep={"resolution": {"backoff": [0, 1]}})  # max_tries 6, a try a second
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="drop_after", infno="2207", times=1)
    world.fault(mode="drop_before", infno="2601", times=1)  # the first 2601 is lost on the way: a real try
    answer = visit.settle()
    assert answer["fep_state"] == "RESOLVING", said(answer)
    with world.outage():
        time.sleep(8)  # more than the 6 tries' backoff, with nothing able to leave
    world.wait_state(answer["fep_msgid"], "REVERSED", timeout=15)
    assert [s["state"] for s in world.ledger()] == ["reversed"]
    world.assert_ledgers_agree()


def _answer_lost_then_busy(world: World, infno: str) -> None:
    """The bureau processes the trade and drops its answer; the resend of the msgid then meets 系统繁忙 once."""
    world.fault(mode="drop_after", infno=infno, times=1)
    world.fault(mode="error", infno=infno, message="系统繁忙", times=1)


def test_a_cancel_whose_answer_was_lost_keeps_the_bureau_s_answer_when_a_resend_meets_a_busy_bureau(
        running: World) -> None:
    """A 2208 took effect at the bureau but its answer was lost; its resend was refused 系统繁忙: the HIS hears the
    bureau's first answer (cancelled), not the busy refusal."""
    visit, settled = settled_visit(running, ZHANG)
    _answer_lost_then_busy(running, "2208")
    status, cancel = visit.post("2208", visit.cancel_input(setl_id(settled)))
    assert status == 200, said(cancel)
    running.wait_state(cancel["fep_msgid"], "ANSWERED")
    heard = running.his.lookup(cancel["fep_msgid"])
    assert heard["infcode"] == 0, said(heard)
    assert setl_id(heard) == setl_id(running.sim_answer(cancel["fep_msgid"]))
    assert {s["msgid"]: s["state"] for s in running.ledger()}[settled["fep_msgid"]] == "cancelled"
    running.assert_ledgers_agree()


def test_a_registration_whose_answer_was_lost_keeps_the_bureau_s_answer_when_a_resend_meets_a_busy_bureau(
        running: World) -> None:
    """A 2201 registered at the bureau but its answer was lost; its resend was refused 系统繁忙: the HIS hears the
    registration (its mdtrt_id), not the busy refusal."""
    visit = Visit(running.his, ZHANG)
    assert visit.identify()["infcode"] == 0
    _answer_lost_then_busy(running, "2201")
    msgid = visit.register()["fep_msgid"]
    running.wait_state(msgid, "ANSWERED")
    heard = running.his.lookup(msgid)
    assert heard["infcode"] == 0, said(heard)
    assert heard["output"]["data"]["mdtrt_id"] == running.sim_answer(msgid)["output"]["data"]["mdtrt_id"]


def test_the_his_reverses_its_own_answered_settlement_with_2601(running: World) -> None:
    """The HIS sends 2601 for its answered 2207: answered, the journal holds the 2207 as REVERSED, the bureau
    reversed it, and the ledgers agree."""
    visit, settled = settled_visit(running, ZHANG)
    status, reversal = visit.post("2601", visit.reversal_input(settled["fep_msgid"]))
    assert status == 200 and reversal["infcode"] == 0, said(reversal)
    running.wait_state(settled["fep_msgid"], "REVERSED", timeout=10)
    assert [s["state"] for s in running.ledger()] == ["reversed"]
    assert running.his.lookup(settled["fep_msgid"])["fep_state"] == "REVERSED"
    running.assert_ledgers_agree()


def test_the_his_cannot_reverse_a_settlement_while_a_later_one_of_the_person_is_in_force(running: World) -> None:
    """S1 then S2 of one person; the HIS sends 2601 for S1: refused 409 (last settlement first), nothing journalled,
    the bureau's ledger unchanged."""
    first, s1 = settled_visit(running, ZHANG)
    _, s2 = settled_visit(running, ZHANG)
    journalled = len(running.journal())
    status, refused = first.post("2601", first.reversal_input(s1["fep_msgid"]))
    assert status == 200 and (refused["fep_state"], refused["fep_reason"]) == ("REFUSED", "conflict"), said(refused)
    assert running.live() == [s1["fep_msgid"], s2["fep_msgid"]]
    assert len(running.journal()) == journalled
    running.assert_ledgers_agree()


@pytest.mark.parametrize("infno, input_", [
    ("9001", {"signIn": {"opter_no": "HIS01", "mac": "02-00-00-00-00-09", "ip": "127.0.0.1"}}),
    ("9002", {"signOut": {"sign_no": "359001", "opter_no": "HIS01"}}),
])
def test_the_his_cannot_sign_fep_in_or_out(running: World, infno: str, input_: dict) -> None:
    """The session is fep's: an HIS-sent 9001 or 9002 is answered by fep with the session it holds (an HIS
    that signs in before it trades works unchanged), nothing is journalled and the bureau never hears it."""
    msgids = lambda: [r["msgid"] for r in running.journal("infno=?", (infno,))]  # noqa: E731 (fep's own may be in flight)
    before = msgids()
    status, answer = running.post_raw(envelope.dumps({"infno": infno, "input": input_}))
    assert status == 200 and (answer["infcode"], answer["fep_state"]) == (0, "LOCAL"), said(answer)
    node = "signinoutb" if infno == "9001" else "signoutoutb"
    fep_sign_no = envelope.loads(running.journal("infno='9001'")[-1]["answer"])["output"]["signinoutb"]["sign_no"]
    assert answer["output"][node]["sign_no"] == fep_sign_no
    assert msgids() == before
    assert {m for m, i in running.sim_answers() if i == infno} <= set(msgids())  # the bureau heard only fep's own