"""What happens when things break: each fault of the simulator against the real daemon."""

from __future__ import annotations

import time
import urllib.error

import pytest

from fep import envelope
from fep.sim.server import GARBLES
from fep.sim.world import (LI, WANG, ZHANG, Visit, World, his_msgid, late_settlement, parked_settlement, said,
                           queued_uploads, settled_state, wait_for)


def test_bureau_drops_the_link_after_2207_is_processed_so_2601_reverses_it(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="drop_after", infno="2207", times=1)

    answer = visit.settle()
    # The HIS hears at once: failed, outcome unknown, reversal under way (its msgid), not settled.
    assert answer["infcode"] == -1
    assert answer["fep_state"] == "RESOLVING" and answer["fep_resolver"]
    assert "NOT settled" in answer["err_msg"]
    reversal = running.trade(answer["fep_resolver"])
    assert reversal["infno"] == "2601" and reversal["related"] == answer["fep_msgid"]
    data = envelope.loads(reversal["request"])
    assert data["input"]["data"] == {"psn_no": ZHANG["psn_no"], "omsgid": answer["fep_msgid"], "oinfno": "2207"}

    settled_state(running, answer["fep_msgid"], ("REVERSED",))
    assert running.his.lookup(answer["fep_msgid"])["fep_state"] == "REVERSED"
    assert [s["state"] for s in running.ledger()] == ["reversed"]
    running.assert_ledgers_agree()
    # The patient can now be settled again, with a new msgid, and is charged once.
    again = visit.settle()
    assert again["infcode"] == 0, again
    running.assert_ledgers_agree()


def test_a_2207_dropped_before_the_bureau_saw_it_needs_no_reversal(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="drop_before", infno="2207", times=1)
    answer = visit.settle()
    assert answer["fep_state"] == "RESOLVING"
    row = settled_state(running, answer["fep_msgid"], ("NOT_NEEDED",))
    assert "no record" in row["note"]
    assert running.ledger() == []
    running.assert_ledgers_agree()


def test_a_reset_mid_answer_is_an_unknown_outcome_and_is_reversed(running: World) -> None:
    visit = Visit(running.his, LI)
    visit.up_to_settlement()
    running.fault(mode="reset_mid", infno="2207", times=1)
    answer = visit.settle()
    assert answer["fep_state"] == "RESOLVING"
    settled_state(running, answer["fep_msgid"], ("REVERSED",))
    running.assert_ledgers_agree()


def test_a_late_answer_is_stored_for_reconciliation_and_does_not_stop_the_reversal(world: World) -> None:
    answer = late_settlement(world, late_by=2).settle()
    assert answer["fep_state"] == "RESOLVING"
    assert "no answer within 1 s" in answer["err_msg"]
    row = wait_for(lambda: (r := world.trade(answer["fep_msgid"]))["late_answer"] and r["state"] == "REVERSED" and r,
                   what="the late answer, and the reversal")
    assert envelope.loads(row["late_answer"])["output"]["setlinfo"]["setl_id"]  # what the bureau had said
    assert row["answer"] is None
    # The 2601 found the settlement and erased it: its late answer is news of the past, and flips nothing.
    assert "late_success" not in world.events(answer["fep_msgid"])
    assert len(world.journal("infno='2601'")) == 1
    world.assert_ledgers_agree()


def test_a_business_error_from_the_bureau_is_an_answer_not_an_unknown(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="error", infno="2207", message="基金支付异常", times=1)
    answer = visit.settle()
    assert answer["infcode"] == -1 and answer["err_msg"] == "基金支付异常"
    assert answer["fep_state"] == "ANSWERED" and not running.journal("infno='2601'")


def test_the_reversal_is_repeated_until_the_bureau_acknowledges_it(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="drop_after", infno="2207", times=1)
    running.fault(mode="drop_after", infno="2601", times=2)  # the first two reversals get no answer either
    answer = visit.settle()
    row = settled_state(running, answer["fep_msgid"], ("REVERSED",))
    reversal = running.trade(row["resolver"])
    # Two tries spent without an answer, then answered on the third send.
    assert reversal["attempts"] == 2 and reversal["state"] == "ANSWERED"
    assert running.events(reversal["msgid"]).count("resend") == 2  # same msgid each time
    running.assert_ledgers_agree()


def test_a_reversal_the_bureau_keeps_refusing_is_parked_for_a_person(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    answer = parked_settlement(running, visit)
    row = running.trade(answer["fep_msgid"])
    assert "refused" in row["note"] and "系统繁忙" in row["note"]
    assert running.his.lookup(answer["fep_msgid"])["fep_state"] == "NEEDS_ATTENTION"
    assert len(running.journal("infno='2601'")) == 6  # max_tries in the test config, each a new msgid


def test_fep_killed_while_2207_is_at_the_bureau_reverses_it_on_restart(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="late", infno="2207", seconds=3, times=1)
    msgid = his_msgid(7)
    import threading

    threading.Thread(target=lambda: _ignore(lambda: visit.settle(msgid=msgid)), daemon=True).start()
    wait_for(lambda: running.journal("msgid=?", (msgid,)), what="2207 to be journalled")
    running.kill_fep()
    time.sleep(3.5)  # the bureau settles it meanwhile
    assert [s["state"] for s in running.ledger()] == ["live"]
    running.start_fep()
    row = settled_state(running, msgid, ("REVERSED",))
    assert running.events(msgid)[:3] == ["accept", "lost", "resolve"]
    assert [s["state"] for s in running.ledger()] == ["reversed"]
    # The HIS, asking again with its msgid, hears what became of it; it is never charged twice.
    again = visit.settle(msgid=msgid)
    assert again["fep_state"] == "REVERSED" and row["resolver"] == again["fep_resolver"]
    running.assert_ledgers_agree()


def _ignore(fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except OSError:
        pass  # fep was killed under the call


def test_while_the_bureau_is_down_queries_fail_fast_settlements_fail_cleanly_uploads_wait(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")

    q = visit.identify()
    assert q["fep_state"] == "NOT_SENT" and "nothing was sent" in q["err_msg"]
    # Fast because it failed on the refused connection, not by waiting out 1101's timeout.
    assert "cannot connect" in q["err_msg"] and "no answer within" not in q["err_msg"]

    first = visit.upload_fees()
    second_visit = Visit(running.his, ZHANG, fees=[("250101001", "1", "30.00")])
    second_visit.mdtrt_id = visit.mdtrt_id
    second = second_visit.upload_fees()
    assert first["infcode"] == 0 and first["fep_state"] == "QUEUED"
    assert second["fep_state"] == "QUEUED" and second["fep_msgid"] != first["fep_msgid"]

    visit.medfee += second_visit.medfee
    s = visit.settle()
    assert s["fep_state"] == "NOT_SENT" and s["infcode"] == -1  # money never waits in a queue

    running.clear_faults()
    for m in (first["fep_msgid"], second["fep_msgid"]):
        settled_state(running, m, ("ANSWERED",))
    sent = [m for m, i in running.sim_answers() if i == "2204"]
    assert sent == [first["fep_msgid"], second["fep_msgid"]]  # same msgids, in the order accepted
    # The resubmission of the failed settlement (same msgid) is sent now: it never left the box.
    retried = running.his.call("2207", visit.settlement_input(), msgid=s["fep_msgid"])
    assert retried["infcode"] == 0, retried
    running.assert_ledgers_agree()


def test_an_upload_the_bureau_refuses_on_replay_is_parked_and_later_ones_of_the_person_wait(running: World) -> None:
    a, b = Visit(running.his, ZHANG), Visit(running.his, WANG)
    for v in (a, b):
        v.open()
    running.fault(mode="refuse")
    bad = Visit(running.his, ZHANG, fees=[("NOT-A-NATIONAL-CODE", "1", "1.00")])
    bad.mdtrt_id = a.mdtrt_id
    parked, waiting, other = bad.upload_fees(), a.upload_fees(), b.upload_fees()
    assert {x["fep_state"] for x in (parked, waiting, other)} == {"QUEUED"}
    running.clear_faults()
    row = settled_state(running, parked["fep_msgid"], ("NEEDS_ATTENTION",))
    assert "医保目录编码不存在" in row["note"]
    settled_state(running, other["fep_msgid"], ("ANSWERED",))  # another person is not blocked
    time.sleep(1.5)
    assert running.trade(waiting["fep_msgid"])["state"] == "QUEUED"  # same person: waits behind the parked one


def test_refunds_go_last_settlement_first(running: World) -> None:
    first, second = Visit(running.his, ZHANG), Visit(running.his, ZHANG)
    for v in (first, second):
        v.up_to_settlement()
    s1 = first.settle()["output"]["setlinfo"]["setl_id"]
    s2 = second.settle()
    s2_id = s2["output"]["setlinfo"]["setl_id"]
    status, refused = running.his_tcp.request("POST", "/", envelope.dumps(
        {"infno": "2208", "input": {"data": {"setl_id": s1, "mdtrt_id": first.mdtrt_id, "psn_no": ZHANG["psn_no"]}}}))
    assert status == 200 and refused["fep_reason"] == "conflict"
    assert f"cancel {s2_id} (2207, msgid {s2['fep_msgid']}) before {s1}" in refused["err_msg"]
    assert second.cancel(s2_id)["infcode"] == 0
    assert first.cancel(s1)["infcode"] == 0
    running.assert_ledgers_agree()


@pytest.mark.parametrize("confirms", [True, False])
def test_a_settlement_the_his_does_not_confirm_in_time_is_reversed(world: World, confirms: bool) -> None:
    world.configure(trades={"2207": {"confirm_within": 2}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    answer = visit.settle()
    assert answer["infcode"] == 0 and answer["fep_state"] == "AWAITING_CONFIRM" and answer["fep_confirm_by"]
    if confirms:
        assert world.his.confirm(answer["fep_msgid"])["fep_state"] == "CONFIRMED"
        time.sleep(2.5)
        assert world.trade(answer["fep_msgid"])["state"] == "CONFIRMED"
        assert [s["state"] for s in world.ledger()] == ["live"]
    else:
        settled_state(world, answer["fep_msgid"], ("REVERSED",))
        assert [s["state"] for s in world.ledger()] == ["reversed"]
    world.assert_ledgers_agree()


def test_every_nth_trade_failing_leaves_no_unknown_unresolved(running: World) -> None:
    visits = [Visit(running.his, p) for p in (ZHANG, LI, WANG)]
    for v in visits:
        v.up_to_settlement()
    running.fault(mode="drop_after", infno="2207", every=2)
    answers = [v.settle() for v in visits]
    assert [a["fep_state"] for a in answers] == ["ANSWERED", "RESOLVING", "ANSWERED"]
    settled_state(running, answers[1]["fep_msgid"], ("REVERSED",))
    running.assert_ledgers_agree()


def test_a_bureau_down_for_a_period_comes_back_by_itself(running: World) -> None:
    running.fault(mode="refuse", seconds=1.5)
    assert Visit(running.his, ZHANG).identify()["fep_state"] == "NOT_SENT"
    time.sleep(2)
    assert Visit(running.his, ZHANG).identify()["infcode"] == 0


def test_an_upload_whose_outcome_is_unknown_can_be_undone_by_its_dedicated_cancel(world: World) -> None:
    world.configure(trades={"2204": {"on_unknown": "cancel"}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.open()
    world.fault(mode="drop_after", infno="2204", times=1)
    answer = visit.upload_fees()
    assert answer["fep_state"] == "RESOLVING"
    cancel = world.trade(answer["fep_resolver"])
    assert cancel["infno"] == "2205"
    assert envelope.loads(cancel["request"])["input"]["data"] == {
        "mdtrt_id": visit.mdtrt_id, "chrg_bchno": visit.chrg_bchno, "psn_no": ZHANG["psn_no"]}
    settled_state(world, answer["fep_msgid"], ("REVERSED",))
    assert visit.presettle()["err_msg"].endswith("无待结算费用明细")  # the fee lines are gone at the bureau


def test_an_upload_whose_outcome_is_unknown_is_resent_with_the_same_msgid(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="drop_after", infno="2204", times=1)
    answer = visit.upload_fees()
    assert answer["fep_state"] == "UNKNOWN"
    settled_state(running, answer["fep_msgid"], ("ANSWERED",))
    assert [m for m, i in running.sim_answers() if i == "2204"] == [answer["fep_msgid"]]  # processed once
    assert visit.presettle()["infcode"] == 0


def test_an_upload_of_unknown_outcome_holds_back_later_uploads_of_the_same_person(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="drop_before", infno="2204", times=1)  # never reaches the bureau the first time
    first = visit.upload_fees()
    assert first["fep_state"] == "UNKNOWN"
    later = Visit(running.his, ZHANG, fees=[("250101001", "1", "30.00")])
    later.mdtrt_id = visit.mdtrt_id
    second = later.upload_fees()
    settled_state(running, second["fep_msgid"], ("ANSWERED",))
    assert [m for m, i in running.sim_answers() if i == "2204"] == [first["fep_msgid"], second["fep_msgid"]]


def test_a_trade_that_waited_too_long_for_its_person_is_not_sent(world: World) -> None:
    from fep.trades import TradeBook
    from fep.sim.world import ROOT

    short = {infno: {"timeout": 2.5} for infno in TradeBook.load(ROOT / "conf" / "trades.yaml").defs}
    world.configure(trades=short, fep={"his": {"answer_within": 3}})
    world.start()
    first, second = Visit(world.his, ZHANG), Visit(world.his, ZHANG)
    for v in (first, second):
        v.up_to_settlement()
    world.fault(mode="late", infno="2207", seconds=2.2, times=1)
    import threading

    slow = threading.Thread(target=first.settle)
    slow.start()
    wait_for(lambda: world.journal("infno='2207'"), what="the first 2207")
    answer = second.settle()  # waits for the first (same person): under 1 s of the 3 s would be left to send it
    slow.join()
    first_msgid = world.journal("infno='2207'")[0]["msgid"]
    # The HIS hears what it waited for, and that nothing was sent.
    assert answer["fep_state"] == "NOT_SENT" and "nothing was sent" in answer["err_msg"]
    assert f"this person's 2207 {first_msgid} is still at the bureau" in answer["err_msg"]
    assert len([s for s in world.ledger()]) == 1


def test_trades_not_sent_to_a_dead_endpoint_go_to_the_next(world: World) -> None:
    from fep.sim.world import free_port

    alive = f"https://127.0.0.1:{world.sim_port}/fsi/api/rsfComIfsService/callService"
    world.configure(fep={"bureau": {"endpoints": [
        {"name": "primary", "url": f"https://127.0.0.1:{free_port()}/callService", "server_name": "bureau.fep.test"},
        {"name": "backup", "url": alive, "server_name": "bureau.fep.test"}]}})
    world.start()
    answer = Visit(world.his, ZHANG).identify()
    assert answer["infcode"] == 0
    assert world.trade(answer["fep_msgid"])["endpoint"] == "backup"


def test_fep_signs_in_again_when_the_bureau_forgets_its_session(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    assert visit.identify()["infcode"] == 0
    running.expire_sessions()
    # "Sign in again" is a session fault, never the trade's answer: fep signs in and sends it again.
    answer = visit.identify()
    assert answer["infcode"] == 0, answer
    assert "resign" in running.events(answer["fep_msgid"])
    sign_ins = running.journal("infno='9001'")
    assert len(sign_ins) == 2
    new_sign_no = envelope.loads(sign_ins[1]["answer"])["output"]["signinoutb"]["sign_no"]
    assert envelope.loads(running.trade(answer["fep_msgid"])["request"])["sign_no"] == new_sign_no


def test_a_parked_item_at_the_head_of_one_queue_does_not_stop_the_others_draining(running: World) -> None:
    a, b = Visit(running.his, ZHANG), Visit(running.his, WANG)
    for v in (a, b):
        v.open()
    running.fault(mode="refuse")
    bad = Visit(running.his, ZHANG, fees=[("NOT-A-NATIONAL-CODE", "1", "1.00")])
    bad.mdtrt_id = a.mdtrt_id
    parked = bad.upload_fees()
    running.clear_faults()
    settled_state(running, parked["fep_msgid"], ("NEEDS_ATTENTION",))
    running.fault(mode="refuse")  # down again, with ZHANG's queue headed by a parked item
    waiting = a.upload_fees()
    other = b.upload_fees()
    running.clear_faults()  # nothing else is sent: only the probe can find the link is back
    settled_state(running, other["fep_msgid"], ("ANSWERED",), timeout=10)
    assert running.trade(waiting["fep_msgid"])["state"] == "QUEUED"


def test_when_the_bureau_is_back_every_persons_queue_goes_with_the_probes_answer(running: World) -> None:
    """An outage ends. fep's once-a-second probe, one person's queued upload, finds the bureau back (each
    answer takes 0.3 s). Every other person's queue must go the moment that answer comes, not at the next
    probe a second later: after an outage the queues drain at the link's full width from the start."""
    visits = [Visit(running.his, person) for person in (ZHANG, LI)]
    for v in visits:
        v.open()
    running.fault(mode="refuse")
    queued = {v.person["psn_no"]: queued_uploads(v, 4) for v in visits}
    running.latency(300)
    running.clear_faults()
    for msgids in queued.values():
        settled_state(running, msgids[-1], ("ANSWERED",))
    order = [m for m, i in running.sim_answers() if i == "2204"]
    probed = next(psn for psn, msgids in queued.items() if msgids[0] == order[0])
    other = next(psn for psn in queued if psn != probed)
    # Sent with the probed person's second upload, the probe's answer being in; a second later, at the
    # next probe, it would come after their fourth.
    assert order.index(queued[other][0]) < order.index(queued[probed][2]), order


def test_a_settlement_waits_for_the_person_s_pending_uploads_and_never_overtakes_them(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="drop_before", infno="2204", times=1)
    pending = visit.upload_fees()
    assert pending["fep_state"] == "UNKNOWN"  # resent with its msgid after a short backoff
    settled = visit.settle()  # at once: the fees are not at the bureau yet
    assert settled["infcode"] == 0, settled
    order = [m for m, i in running.sim_answers() if i in ("2204", "2207")]
    assert order == [pending["fep_msgid"], settled["fep_msgid"]]
    running.assert_ledgers_agree()


def test_a_settlement_behind_a_parked_upload_is_refused_naming_it(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")
    bad = Visit(running.his, ZHANG, fees=[("NOT-A-NATIONAL-CODE", "1", "1.00")])
    bad.mdtrt_id = visit.mdtrt_id
    parked = bad.upload_fees()
    running.clear_faults()
    settled_state(running, parked["fep_msgid"], ("NEEDS_ATTENTION",))
    status, body = running.his_tcp.request("POST", "/", envelope.dumps({"infno": "2207",
                                                                         "input": visit.settlement_input()}))
    assert status == 200 and body["fep_reason"] == "conflict"
    assert f"2204 {parked['fep_msgid']} is NEEDS_ATTENTION" in body["err_msg"]
    assert "2207" not in {i for _, i in running.sim_answers()}


def test_an_upload_queued_while_the_link_was_known_down_and_refused_on_replay_is_parked(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")
    assert visit.identify()["fep_state"] == "NOT_SENT"  # now fep knows the bureau is down
    bad = Visit(running.his, ZHANG, fees=[("NOT-A-NATIONAL-CODE", "1", "1.00")])
    bad.mdtrt_id = visit.mdtrt_id
    parked = bad.upload_fees()
    later = visit.upload_fees()
    assert running.trade(parked["fep_msgid"])["attempts"] == 0  # queued at once, never tried
    running.clear_faults()
    row = settled_state(running, parked["fep_msgid"], ("NEEDS_ATTENTION", "ANSWERED"))
    assert row["state"] == "NEEDS_ATTENTION" and "医保目录编码不存在" in row["note"]
    time.sleep(1.5)
    assert running.trade(later["fep_msgid"])["state"] == "QUEUED"  # held behind the parked one


def test_while_the_bureau_is_down_sign_in_is_not_retried_every_second(world: World) -> None:
    world.configure(sim={"faults": [{"mode": "refuse"}]})
    world.start()
    for _ in range(3):
        assert Visit(world.his, ZHANG).identify()["fep_state"] == "NOT_SENT"
        time.sleep(1)
    assert len(world.journal("infno='9001'")) == 1  # the attempt at start; the next is backed off


@pytest.mark.parametrize("form", GARBLES)
def test_a_settlement_answered_with_what_fep_cannot_read_is_reversed(running: World, form: str) -> None:
    """The bureau settles Zhang, but what comes back is HTTP 200 that is not its answer: fep cannot know the
    settlement's fate. The HIS hears NOT settled, the reversal undoes it at the bureau, and the three views agree."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="garble", infno="2207", times=1, form=form)
    answer = visit.settle()
    assert answer["infcode"] == -1 and answer["fep_state"] == "RESOLVING", said(answer)
    assert "NOT settled" in answer["err_msg"], said(answer)
    settled_state(running, answer["fep_msgid"], ("REVERSED",))
    assert running.his.lookup(answer["fep_msgid"])["fep_state"] == "REVERSED"
    assert [s["state"] for s in running.ledger()] == ["reversed"]
    running.assert_ledgers_agree()


@pytest.mark.parametrize("form", GARBLES)
def test_an_upload_answered_with_what_fep_cannot_read_is_resent_and_held_once(running: World, form: str) -> None:
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="garble", infno="2204", times=1, form=form)
    answer = visit.upload_fees()
    assert answer["fep_state"] == "UNKNOWN", said(answer)
    settled_state(running, answer["fep_msgid"], ("ANSWERED",))
    assert [m for m, i in running.sim_answers() if i == "2204"] == [answer["fep_msgid"]]  # processed once
    assert visit.presettle()["infcode"] == 0


@pytest.mark.parametrize("form", GARBLES)
def test_a_query_answered_with_what_fep_cannot_read_is_a_failure_that_says_so(running: World, form: str) -> None:
    """1101 changes nothing at the bureau: an unreadable answer is the HIS's failure to retry, and it says why."""
    running.fault(mode="garble", infno="1101", times=1, form=form)
    answer = Visit(running.his, ZHANG).identify()
    assert answer["infcode"] == -1, said(answer)
    assert "answer" in answer["err_msg"], said(answer)
    settled_state(running, answer["fep_msgid"], ("ANSWERED",))  # asked again under its msgid (on_unknown: resend)
    assert running.his.lookup(answer["fep_msgid"])["infcode"] == 0


@pytest.mark.parametrize("spec, named", [({"mode": "garbel"}, "fault mode must be one of"),
                                         ({"mode": "garble", "form": "xml"}, "fault form must be one of")])
def test_a_fault_the_simulator_does_not_know_is_refused_naming_what_is_wrong(running: World, spec: dict[str, str],
                                                                           named: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        running.fault(**spec)
    assert refused.value.code == 400
    assert named in envelope.loads(refused.value.read())["error"]
    assert Visit(running.his, ZHANG).identify()["infcode"] == 0  # no fault was armed
