"""Breaker 25: after an outage the probe's answer now sends every person's queue at once (fep/engine.py,
_link_up from the replay), with the simulator answering latency_ms after arrival. Tried from outside, from
the HIS's and the bureau's side, comparing what the HIS heard, fep's journal and the bureau's ledger: per
person the queued uploads reach the bureau in the order the HIS sent them, whether the outage flaps, the
probe is refused, told "not now" or lost; a settlement never overtakes the person's queued uploads; nothing
queued is lost, held twice or left QUEUED once the bureau is back; unknown money is still undone."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

from fep.sim.world import LI, WANG, ZHANG, Visit, World, queued_uploads, settled_state, wait_for

ANSWERED = ("ANSWERED",)


# ---- helpers ---------------------------------------------------------------------------------------------------

def bureau_order(world: World, *infnos: str) -> list[str]:
    """The msgids the bureau processed (stored an answer for), in the order it processed them."""
    return [m for m, i in world.sim_answers() if i in infnos]


def assert_each_person_in_order(world: World, queued: dict[str, list[str]]) -> None:
    """Every queued upload reached the bureau once, each person's in the order the HIS sent them; the journal
    holds each ANSWERED and the HIS hears so on a lookup."""
    order = bureau_order(world, "2204")
    assert len(order) == len(set(order)), f"a msgid processed twice at the bureau: {order}"
    for psn, msgids in queued.items():
        assert [m for m in order if m in msgids] == msgids, f"{psn}: bureau order {order}, HIS order {msgids}"
        for m in msgids:
            assert world.trade(m)["state"] == "ANSWERED", (m, world.history(m))
            assert world.his.lookup(m)["fep_state"] == "ANSWERED"


def wait_all(world: World, queued: dict[str, list[str]], timeout: float = 30) -> None:
    for msgids in queued.values():
        for m in msgids:
            settled_state(world, m, ANSWERED, timeout=timeout)


def settle_all_fees(visit: Visit, batches: int) -> dict:
    """The visit's settlement of `batches` uploads of its fees: the bureau settles only when the sum of the
    fees it holds is the settlement's (a batch held twice, or one missing, is refused)."""
    one = sum((Decimal(c) * Decimal(p) for _, c, p in visit.fees), Decimal("0"))
    visit.medfee = one * batches
    return visit.settle()


# ---- flapping ----------------------------------------------------------------------------------------------------

def test_an_outage_that_flaps_keeps_every_persons_uploads_in_order_and_each_held_once(running: World) -> None:
    """Three patients' fees are queued while the bureau is down. The VPN then flaps: the bureau is back for
    a few hundred ms, gone, back, gone, several times, with answers taking 80 ms, so probes and the queues
    they release are cut off mid-way (connections killed with uploads inside the bureau). Once it stays up,
    every upload is ANSWERED, each person's in the HIS's order, none held twice: each visit then settles
    for exactly the fees it uploaded, and both ledgers agree."""
    visits = [Visit(running.his, p) for p in (ZHANG, LI, WANG)]
    for v in visits:
        v.open()
    running.latency(80)
    running.fault(mode="refuse")
    queued = {v.person["psn_no"]: queued_uploads(v, 3) for v in visits}
    for up_for in (0.9, 0.25, 1.1, 0.15, 0.6):
        running.clear_faults()
        time.sleep(up_for)
        running.fault(mode="refuse")
        time.sleep(0.3)
    running.clear_faults()
    wait_all(running, queued)
    assert_each_person_in_order(running, queued)
    assert not running.journal("state='QUEUED'")
    for v in visits:
        settled = settle_all_fees(v, 3)
        assert settled["infcode"] == 0, settled
    running.assert_ledgers_agree()


def test_uploads_sent_while_the_outage_flaps_join_their_queue_behind_the_earlier_ones(running: World) -> None:
    """The HIS keeps uploading during a flapping outage: some uploads find the bureau up (sent at once, or
    refused mid-way and requeued), some find it down. Whatever each one met, a person's uploads reach the
    bureau in the order the HIS sent them, and none stays QUEUED once the bureau stays up."""
    visits = [Visit(running.his, p) for p in (ZHANG, LI)]
    for v in visits:
        v.open()
    running.latency(60)
    queued: dict[str, list[str]] = {v.person["psn_no"]: [] for v in visits}
    for rnd in range(6):
        running.fault(mode="refuse") if rnd % 2 == 0 else running.clear_faults()
        for v in visits:
            v.chrg_bchno = f"{v.mdtrt_id[-8:]}F{rnd}"
            answer = v.upload_fees()
            assert answer["fep_state"] in ("QUEUED", "ANSWERED", "UNKNOWN", "RESOLVING"), answer
            queued[v.person["psn_no"]].append(answer["fep_msgid"])
        time.sleep(0.35)
    running.clear_faults()
    wait_all(running, queued)
    assert_each_person_in_order(running, queued)
    for v in visits:
        assert settle_all_fees(v, 6)["infcode"] == 0
    running.assert_ledgers_agree()


# ---- what the probe hears ----------------------------------------------------------------------------------------

def test_a_probe_the_bureau_refuses_parks_its_upload_and_the_other_persons_queue_still_goes_at_once(
        running: World) -> None:
    """ZHANG's first queued upload carries a code the bureau does not know; LI has two good ones queued. The
    bureau comes back (answers take 0.3 s). Whichever probes, LI's uploads are answered promptly and in order;
    ZHANG's bad one is parked (NEEDS_ATTENTION) and the good one behind it waits, never sent. Once a person
    drops the parked one, ZHANG's good upload goes."""
    zhang, li = Visit(running.his, ZHANG), Visit(running.his, LI)
    for v in (zhang, li):
        v.open()
    running.fault(mode="refuse")
    bad = zhang.bad_upload()
    parked = bad.upload_fees()
    assert parked["fep_state"] == "QUEUED", parked
    behind = queued_uploads(zhang, 1, "Z")
    li_queue = queued_uploads(li, 2, "L")
    running.latency(300)
    running.clear_faults()
    row = settled_state(running, parked["fep_msgid"], ("NEEDS_ATTENTION",))
    assert "医保目录编码不存在" in row["note"], row
    for m in li_queue:
        settled_state(running, m, ANSWERED, timeout=6)
    time.sleep(1.5)
    assert running.trade(behind[0])["state"] == "QUEUED"
    assert behind[0] not in bureau_order(running, "2204")
    assert_each_person_in_order(running, {LI["psn_no"]: li_queue})
    dropped = running.cli("drop", parked["fep_msgid"], "--reason", "the fee code is wrong; the HIS sends it anew")
    assert dropped.returncode == 0, dropped.stderr
    settled_state(running, behind[0], ANSWERED, timeout=6)
    assert not running.journal("state='QUEUED'")


def test_a_probe_told_not_now_keeps_the_queues_in_order_until_the_bureau_takes_them(running: World) -> None:
    """The bureau is back but its front says 系统繁忙 to the first few fee uploads (a transient refusal, "not
    now", before it looks at the msgid). The probe and the queues it releases are told not now; each stays
    queued, in place, and is sent again. All end ANSWERED in each person's order, none left QUEUED, none
    held twice."""
    visits = [Visit(running.his, p) for p in (ZHANG, LI, WANG)]
    for v in visits:
        v.open()
    running.fault(mode="refuse")
    queued = {v.person["psn_no"]: queued_uploads(v, 3) for v in visits}
    running.fault(mode="error", infno="2204", message="系统繁忙，请稍后再试", times=4)
    running.latency(50)
    running.end_outage()
    wait_all(running, queued)
    assert_each_person_in_order(running, queued)
    assert any("not now" in (note or "") for ms in queued.values() for m in ms for _, _, note in running.history(m))
    for v in visits:
        assert settle_all_fees(v, 3)["infcode"] == 0
    running.assert_ledgers_agree()


def test_a_probe_whose_answer_is_lost_is_resent_once_and_the_queues_stay_in_order(running: World) -> None:
    """The bureau comes back and takes the probe, but the link drops before its answer (drop_after): the
    upload's outcome is unknown. It is resent with its msgid (the bureau answers it from its first answer),
    holding its person's later uploads back meanwhile; the other persons' queues go. Every upload ends
    ANSWERED in order, the lost one held once: each visit settles for exactly its fees."""
    visits = [Visit(running.his, p) for p in (ZHANG, LI)]
    for v in visits:
        v.open()
    running.fault(mode="refuse")
    queued = {v.person["psn_no"]: queued_uploads(v, 3) for v in visits}
    running.fault(mode="drop_after", infno="2204", times=1)
    running.latency(100)
    running.end_outage()
    wait_all(running, queued)
    assert_each_person_in_order(running, queued)
    lost = [m for ms in queued.values() for m in ms if "lost" in running.events(m)]
    assert len(lost) == 1, {m: running.events(m) for ms in queued.values() for m in ms}
    assert "resend" in running.events(lost[0])
    for v in visits:
        assert settle_all_fees(v, 3)["infcode"] == 0
    running.assert_ledgers_agree()


def test_the_bureau_back_for_settlements_but_not_yet_for_uploads_never_lets_a_settlement_pass_them(
        running: World) -> None:
    """After the outage the bureau takes every trade but fee uploads, which its front keeps answering 系统繁忙
    for a while. ZHANG's upload is queued; the cashier settles. The settlement must not reach the bureau
    before the upload: it waits, and is refused (conflict) when the upload is still not through; the upload
    then goes, and the settlement sent again is answered after it."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")
    up = queued_uploads(visit, 1)[0]
    running.fault(mode="error", infno="2204", message="系统繁忙", times=1000)
    running.end_outage()
    time.sleep(1.5)  # the probe found the bureau back (it answered)
    first = visit.settle()
    assert first["infcode"] != 0, first
    assert "2207" not in {i for _, i in running.sim_answers()}
    running.clear_faults()
    settled_state(running, up, ANSWERED, timeout=10)
    again = visit.settle()
    assert again["infcode"] == 0, again
    assert bureau_order(running, "2204", "2207") == [up, again["fep_msgid"]]
    running.assert_ledgers_agree()


# ---- settlements -----------------------------------------------------------------------------------------------

def test_a_settlement_sent_as_the_bureau_comes_back_goes_after_the_persons_queued_uploads(running: World) -> None:
    """ZHANG's two uploads are queued during an outage. The bureau comes back (answers take 0.3 s) and the
    cashier settles at that very moment, before any probe. The settlement waits for both uploads and is
    settled for both; the bureau saw upload, upload, settlement; LI's queue went meanwhile."""
    zhang, li = Visit(running.his, ZHANG), Visit(running.his, LI)
    for v in (zhang, li):
        v.open()
    running.fault(mode="refuse")
    ups = queued_uploads(zhang, 2)
    li_ups = queued_uploads(li, 2, "L")
    running.latency(300)
    running.clear_faults()
    settled = settle_all_fees(zhang, 2)
    assert settled["infcode"] == 0, settled
    zhang_order = [m for m in bureau_order(running, "2204", "2207") if m in ups + [settled["fep_msgid"]]]
    assert zhang_order == ups + [settled["fep_msgid"]]
    wait_all(running, {LI["psn_no"]: li_ups})
    assert_each_person_in_order(running, {ZHANG["psn_no"]: ups, LI["psn_no"]: li_ups})
    running.assert_ledgers_agree()


def test_a_cashier_retrying_a_settlement_while_the_bureau_comes_back_never_settles_before_the_fees(
        running: World) -> None:
    """ZHANG's fee upload is queued during an outage. The cashier presses "settle" again every time fep says
    it was not sent, as cashiers do, while the bureau comes back at some moment in between. Whenever it comes
    back, the settlement must not reach the bureau before ZHANG's queued upload: the bureau would settle
    without the fees (it refuses: 无待结算费用明细), or, with earlier fees there, settle the wrong sum.
    Tried a few times, the bureau coming back at different moments of the cashier's retries."""
    overtaken = []
    for attempt, back_after in enumerate((0.7, 0.83, 0.95, 1.07, 1.21, 1.33)):
        visit = Visit(running.his, ZHANG)
        visit.chrg_bchno = f"R{attempt}{visit.chrg_bchno}"
        visit.open()
        running.fault(mode="refuse")
        up = visit.upload_fees()
        assert up["fep_state"] == "QUEUED", up
        back = threading.Timer(back_after, running.clear_faults)
        back.start()
        heard = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            answer = visit.settle()
            heard.append((answer.get("fep_state"), answer.get("infcode"), answer["fep_msgid"]))
            if answer["infcode"] == 0 or answer.get("fep_state") not in ("NOT_SENT",):
                break
        back.join()
        settled_state(running, up["fep_msgid"], ANSWERED)
        sent = [m for _, _, m in heard]
        order = [m for m in bureau_order(running, "2204", "2207") if m in sent + [up["fep_msgid"]]]
        if order[0] != up["fep_msgid"]:
            overtaken.append(f"attempt {attempt} (bureau back after {back_after} s): bureau order {order}, "
                             f"upload {up['fep_msgid']}; the HIS heard {heard[-1]}; the bureau answered "
                             f"{order[0]}: {(running.sim_answer(order[0]) or {}).get('err_msg')}; its events "
                             f"{running.events(order[0])}; the upload's last events "
                             f"{running.events(up['fep_msgid'])[-3:]}")
    assert not overtaken, "\n".join(overtaken)


def test_a_settlement_whose_outcome_the_outage_hid_is_reversed_once_the_probe_finds_the_bureau(
        running: World) -> None:
    """ZHANG's settlement is inside the bureau (settled there; answers take 0.6 s) when the bureau drops off
    the network: its outcome is unknown, and its 2601 cannot be sent. LI's upload queues meanwhile. When the
    bureau is back, the probe (LI's upload) wakes the reversal: the settlement is REVERSED, one 2601 answered,
    the ledgers agree, and LI's upload is answered too."""
    zhang, li = Visit(running.his, ZHANG), Visit(running.his, LI)
    zhang.up_to_settlement()
    li.open()
    running.latency(600)
    heard: list[dict] = []
    settling = threading.Thread(target=lambda: heard.append(zhang.settle()))
    settling.start()
    time.sleep(0.3)
    running.fault(mode="refuse")
    settling.join()
    answer = heard[0]
    assert answer["infcode"] != 0 and answer["fep_state"] in ("RESOLVING", "UNKNOWN"), answer
    assert running.sim_answer(answer["fep_msgid"]) is not None  # the bureau did settle it
    li_up = queued_uploads(li, 1, "L")
    time.sleep(1.5)
    running.latency(0)
    running.clear_faults()
    settled_state(running, answer["fep_msgid"], ("REVERSED",), timeout=15)
    settled_state(running, li_up[0], ANSWERED, timeout=10)
    undone = [r for r in running.journal("related=? AND infno='2601'", (answer["fep_msgid"],))
              if r["state"] == "ANSWERED"]
    assert len(undone) == 1, running.journal("related=?", (answer["fep_msgid"],))
    assert [s["state"] for s in running.ledger() if s["msgid"] == answer["fep_msgid"]] == ["reversed"]
    assert running.his.lookup(answer["fep_msgid"])["fep_state"] == "REVERSED"
    running.assert_ledgers_agree()


def test_a_settlement_waiting_for_the_lane_behind_an_upload_that_went_unknown_does_not_pass_it(
        running: World) -> None:
    """The ward's upload of Zhang's fees is at the bureau (0.4 s) when the cashier, at another workstation,
    settles him: the settlement waits for Zhang's turn. The upload's connection is then cut before the bureau
    took it: its outcome is unknown, and fep will send it again. The settlement, next in Zhang's lane, must
    not go ahead of it: the bureau would settle without those fees."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.latency(400)
    running.fault(mode="drop_before", infno="2204", times=1)
    heard: dict[str, dict] = {}
    upload = threading.Thread(target=lambda: heard.update(upload=visit.upload_fees()))
    upload.start()
    wait_for(lambda: running.latency()["waiting"] == 1, what="the upload to reach the bureau")
    settle = threading.Thread(target=lambda: heard.update(settle=visit.settle()))
    settle.start()
    upload.join(30)
    settle.join(30)
    running.latency(0)
    uploaded = heard["upload"]["fep_msgid"]
    wait_for(lambda: running.trade(uploaded)["state"] == "ANSWERED", what="the upload to be sent again and held")
    order = [m for m, i in running.sim_answers() if i in ("2204", "2207")]
    settled = heard["settle"].get("fep_msgid")
    if settled in order:  # it went: only after the fees it settles
        assert order.index(uploaded) < order.index(settled), (order, heard["settle"])
    else:  # or it was refused in time, and nothing reached the bureau
        assert heard["settle"]["infcode"] != 0, heard["settle"]
    running.assert_ledgers_agree()
