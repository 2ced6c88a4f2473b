"""An outsider's attempts to break the promise: whatever fails, what the HIS heard, what the journal holds and
what the bureau's ledger holds end up telling the same story about every trade; nobody is charged twice or left
settled while the HIS was told not settled; refunds go last settlement first; a promised upload is delivered.

Each test arranges one failure, then compares the three views: `heard` (what the HIS was told, by its own calls
and lookups), `journal` (the journal file, read-only) and `bureau` (the simulator's ledger)."""

from __future__ import annotations

import signal
import time
from typing import Any

from fep.sim.world import (ZHANG, Visit, World, his_msgid, parked_settlement, said, setl_id, settled_visit,
                           wait_for)


# ---- the three views ----------------------------------------------------------------------------------------
def bureau_state(world: World, msgid: str) -> str | None:
    """What the bureau's ledger says of the settlement (or cancel) `msgid` made: live, cancelled, reversed, or
    None (the bureau has no settlement of it)."""
    return next((s["state"] for s in world.ledger() if s["msgid"] == msgid), None)


def three_views(world: World, msgid: str) -> str:
    """One line per view, for an assertion's message."""
    heard = world.his.lookup(msgid)
    row = world.trade(msgid)
    return (f"\n  HIS hears: {said(heard)}\n  journal:   {row['state']} ({row['note']}); events "
            f"{world.events(msgid)}\n  bureau:    {bureau_state(world, msgid)}")


def refund_order_breaks(world: World, psn_no: str) -> list[str]:
    """Cancels the bureau made of a settlement of the person while a later settlement of the person was in force
    (not cancelled before the cancel, and never reversed), in the bureau's own numbering."""
    ledger = [s for s in world.ledger() if s["psn_no"] == psn_no]
    settles = [s for s in ledger if s["kind"] == "settle"]
    cancels = [s for s in ledger if s["kind"] == "cancel" and s["state"] != "reversed"]
    breaks = []
    for c in cancels:
        cancelled, at = int(c["refd_setl_id"]), int(c["setl_id"])
        for later in settles:
            n = int(later["setl_id"])
            if not cancelled < n < at or later["state"] == "reversed":
                continue
            if any(int(c2["setl_id"]) < at for c2 in cancels if c2["refd_setl_id"] == later["setl_id"]):
                continue
            breaks.append(f"the bureau cancelled {c['refd_setl_id']} (by {c['setl_id']}, msgid {c['msgid']}) while "
                          f"the later {later['setl_id']} (msgid {later['msgid']}) was {later['state']}")
    return breaks


def reversal(visit: Visit, omsgid: str, msgid: str | None = None) -> tuple[int, dict[str, Any]]:
    """The HIS asks fep to reverse one of its trades (2601)."""
    return visit.post("2601", visit.reversal_input(omsgid), msgid=msgid)


# ---- the HIS's own reversal (2601) ------------------------------------------------------------------------------
def test_the_his_s_reversal_whose_answer_is_lost_and_whose_resend_meets_a_busy_bureau_is_not_taken_as_refused(
        running: World) -> None:
    """The HIS asks to reverse its settlement (2601). The bureau reverses it but the answer is lost; fep resends
    the 2601 with the same msgid and the bureau, busy, says 系统繁忙 without looking. That busy answer is no answer
    to a resend: the settlement is reversed at the bureau, and the journal and the HIS must say so, not that it
    stands."""
    visit, settled = settled_visit(running, ZHANG)
    msgid = settled["fep_msgid"]
    running.fault(mode="drop_after", infno="2601", times=1)  # processed: reversed at the bureau; answer lost
    running.fault(mode="error", infno="2601", message="系统繁忙", times=1)  # the resend: busy, nothing looked at
    status, asked = reversal(visit, msgid)
    assert status == 200, said(asked)
    running.wait_state(msgid, "REVERSED", "ANSWERED", timeout=15)
    assert bureau_state(running, msgid) == "reversed"  # what the bureau did
    row = running.trade(msgid)
    heard = running.his.lookup(msgid)
    assert row["state"] == "REVERSED" and heard["fep_state"] == "REVERSED" and heard["infcode"] == -1, \
        three_views(running, msgid)


def test_a_settlement_the_his_never_confirmed_is_undone_even_if_its_own_reversal_met_a_busy_bureau(
        world: World) -> None:
    """A 2207 with a confirmation window: the HIS does not confirm it (it failed to record it) and asks for its
    2601 instead, which the bureau answers 系统繁忙 (nothing done). The window closes: fep promised to reverse a
    settlement the HIS did not confirm. It must not be left standing as if confirmed."""
    world.configure(trades={"2207": {"confirm_within": 3}})
    world.start()
    visit, settled = settled_visit(world, ZHANG)
    msgid = settled["fep_msgid"]
    assert settled["fep_state"] == "AWAITING_CONFIRM", said(settled)
    world.fault(mode="error", infno="2601", message="系统繁忙", times=1)
    status, asked = reversal(visit, msgid)
    assert status == 200, said(asked)
    time.sleep(4)  # the window has closed; the HIS never confirmed
    world.wait_state(msgid, "REVERSED", "ANSWERED", "NEEDS_ATTENTION", timeout=20)
    time.sleep(1)
    assert world.trade(msgid)["state"] == "REVERSED" and bureau_state(world, msgid) == "reversed", \
        three_views(world, msgid)


# ---- refund order (逐笔按序退款) --------------------------------------------------------------------------------
def test_a_cancel_is_refused_while_a_later_settlement_of_the_person_is_parked_and_live_at_the_bureau(
        running: World) -> None:
    """S1 settled. S2 of the same person: its answer was lost and its 2601 kept being refused, so fep parked it;
    at the bureau S2 is in force. The HIS now cancels S1: fep cannot know that S2 is not in force (it is), so the
    cancel must wait (409), not skip S2 at the bureau."""
    first, s1 = settled_visit(running, ZHANG)
    second = Visit(running.his, ZHANG)
    second.up_to_settlement()
    s2 = parked_settlement(running, second)
    assert bureau_state(running, s2["fep_msgid"]) == "live"  # S2 is in force at the bureau
    status, cancel = first.post("2208", first.cancel_input(setl_id(s1)))
    breaks = refund_order_breaks(running, ZHANG["psn_no"])
    assert status == 200 and cancel["fep_reason"] == "conflict" and not breaks, (
        f"HTTP {status}: {said(cancel)}; bureau: {breaks}; journal: S2 is {running.trade(s2['fep_msgid'])['state']}")


def test_a_cancel_whose_resend_comes_after_a_newer_settlement_does_not_skip_it(world: World) -> None:
    """The HIS cancels S1, its last settlement: the 2208 is lost on the way, and so is its immediate resend; fep will resend
    it. Meanwhile the HIS settles the person's next visit, S2, at once. When the resend of the cancel reaches the
    bureau, S2 is in force: the bureau cancels S1 behind S2's back, out of refund order."""
    world.configure(fep={"resolution": {"backoff": [0, 4]}})  # resent at once, then 4 s after each loss
    world.start()
    first, s1 = settled_visit(world, ZHANG)
    second = Visit(world.his, ZHANG)
    second.up_to_settlement()
    world.fault(mode="drop_before", infno="2208", times=2)  # the cancel, and its first (immediate) resend
    status, cancel = first.post("2208", first.cancel_input(setl_id(s1)))
    assert status == 200 and cancel["fep_state"] == "UNKNOWN", said(cancel)
    s2 = second.settle()
    heard_s2 = said(s2)
    world.wait_state(cancel["fep_msgid"], "ANSWERED", "NEEDS_ATTENTION", timeout=20)
    heard_cancel = said(world.his.lookup(cancel["fep_msgid"]))
    breaks = refund_order_breaks(world, ZHANG["psn_no"])
    assert not breaks, (f"HIS heard: cancel of S1 first {said(cancel)}, then S2 {heard_s2}, then the cancel "
                        f"{heard_cancel}; bureau: {breaks}")


def test_a_settlement_cancelled_inside_its_confirmation_window_is_not_left_for_a_person(world: World) -> None:
    """A 2207 with a confirmation window; inside the window the HIS cancels it (2208), as the cashier does when the
    patient changes their mind. The window then closes unconfirmed and fep sends a 2601 for a settlement the
    bureau has already cancelled, which the bureau refuses again and again: the journal parks the settlement
    for a person and leaves it out of its books, while at the bureau it stands cancelled by a cancel the journal
    counts. The three views must agree, with nothing parked."""
    world.configure(trades={"2207": {"confirm_within": 2}})
    world.start()
    visit, settled = settled_visit(world, ZHANG)
    msgid = settled["fep_msgid"]
    status, cancel = visit.post("2208", visit.cancel_input(setl_id(settled)))
    assert status == 200 and cancel["infcode"] == 0, said(cancel)
    time.sleep(3)  # the window closes
    world.wait_state(msgid, "ANSWERED", "CONFIRMED", "REVERSED", "NEEDS_ATTENTION", timeout=30)
    row = world.trade(msgid)
    assert row["state"] != "NEEDS_ATTENTION", three_views(world, msgid)
    world.assert_ledgers_agree()


# ---- an answer later than fep waits ---------------------------------------------------------------------------
def test_a_settlement_the_bureau_processed_after_fep_stopped_listening_is_not_left_live(world: World) -> None:
    """A busy bureau takes its time with a 2207: fep times out, its 2601 finds nothing (NOT_NEEDED), fep stops
    listening for a late answer, and only then does the bureau settle the 2207. The HIS was told the patient is
    NOT settled; the bureau holds the settlement live; and `fep reverse`, the tool for a settlement the bureau has
    and fep does not, refuses it because the journal says NOT_NEEDED."""
    world.configure(trades={"2207": {"timeout": 1}}, fep={"bureau": {"late_grace": 1}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="slow", infno="2207", seconds=4, times=1)
    answer = visit.settle()
    msgid = answer["fep_msgid"]
    assert answer["fep_state"] == "RESOLVING" and "NOT settled" in said(answer), said(answer)
    world.wait_state(msgid, "NOT_NEEDED", timeout=10)
    wait_for(lambda: world.ledger(), timeout=10, what="the bureau to get round to the 2207")
    reverse = world.cli("reverse", msgid, "--infno", "2207", "--person", ZHANG["psn_no"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and bureau_state(world, msgid) == "live":
        time.sleep(0.2)
    assert bureau_state(world, msgid) != "live", (three_views(world, msgid) +
                                                  f"\n  fep reverse: {reverse.stdout.strip()} {reverse.stderr.strip()}")


# ---- the operator's tools ------------------------------------------------------------------------------------
def test_a_parked_settlement_dropped_by_a_person_can_still_be_reversed(running: World) -> None:
    """A 2207 whose answer was lost and whose 2601 the bureau kept refusing is parked; at the bureau it is live.
    The operator gives it up (`fep drop`, with a reason), then reconciliation shows the bureau holds it, and the
    operator runs `fep reverse` as the README says for a settlement the bureau has and fep does not. fep refuses:
    the journal says DROPPED, so 'the bureau holds nothing of it', and the patient stays charged."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    parked = parked_settlement(running, visit)
    msgid = parked["fep_msgid"]
    assert bureau_state(running, msgid) == "live"
    dropped = running.cli("drop", msgid, "--reason", "the bureau's desk will look into it")
    reverse = running.cli("reverse", msgid, "--infno", "2207", "--person", ZHANG["psn_no"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and bureau_state(running, msgid) == "live":
        time.sleep(0.2)
    assert bureau_state(running, msgid) != "live", (
        three_views(running, msgid) + f"\n  fep drop: rc {dropped.returncode} {dropped.stdout.strip()}"
        f"\n  fep reverse: rc {reverse.returncode} {reverse.stdout.strip()} {reverse.stderr.strip()}")


# ---- a reload during resolution -------------------------------------------------------------------------------
def test_a_reload_that_renames_the_endpoint_does_not_strand_a_reversal(world: World) -> None:
    """A 2207's answer is lost and its 2601 is refused (系统繁忙) for a while. Meanwhile the operator renames the
    bureau endpoint in fep.yaml (same URL) and reloads (SIGHUP). The 2601 is pinned to the endpoint's old name:
    every repeat is 'not sent', which spends no try, so the reversal never ends and is never parked; the patient
    stays charged while the HIS was told NOT settled."""
    world.configure(fep={"resolution": {"backoff": [0, 1]}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="drop_after", infno="2207", times=1)
    world.fault(mode="error", infno="2601", message="系统繁忙", times=2)
    answer = visit.settle()
    msgid = answer["fep_msgid"]
    assert answer["fep_state"] == "RESOLVING", said(answer)
    url = f"https://127.0.0.1:{world.sim_port}/fsi/api/rsfComIfsService/callService"
    world.configure(fep={"resolution": {"backoff": [0, 1]},
                         "bureau": {"endpoints": [{"name": "bureau-main", "url": url,
                                                   "server_name": "bureau.fep.test"}]}})
    world.fep.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in world.log("run"), what="the reload")
    try:
        world.wait_state(msgid, "REVERSED", "NEEDS_ATTENTION", timeout=20)
    except AssertionError as e:
        raise AssertionError(f"{e}{three_views(world, msgid)}") from None


# ---- what the HIS is told while an outcome is unknown ----------------------------------------------------------
def test_the_his_is_not_told_not_settled_while_the_cancel_of_its_settlement_is_unknown_and_it_stands(
        running: World) -> None:
    """The HIS cancels a settlement (2208); the cancel never reaches the bureau and, the bureau dropping every try,
    fep can only park it. Meanwhile the HIS was told, for the cancel, "the patient is NOT settled": the words fep
    uses for a settlement that did not happen. The settlement is live at the bureau all along, and fep's own
    journal holds it in force."""
    visit, settled = settled_visit(running, ZHANG)
    running.fault(mode="drop_before", infno="2208")  # every 2208: never processed
    status, cancel = visit.post("2208", visit.cancel_input(setl_id(settled)))
    assert status == 200 and cancel["fep_state"] == "UNKNOWN", said(cancel)
    running.wait_state(cancel["fep_msgid"], "NEEDS_ATTENTION", timeout=30)
    running.clear_faults()
    told = said(cancel)
    assert bureau_state(running, settled["fep_msgid"]) == "live"
    assert running.trade(settled["fep_msgid"])["state"] == "ANSWERED"
    assert "NOT settled" not in told, f"the HIS heard, for its cancel: {told!r}; the settlement is live"


def test_the_his_asking_to_reverse_a_parked_settlement_is_not_told_the_bureau_holds_nothing(running: World) -> None:
    """A 2207's answer was lost and its 2601 kept being refused, so fep parked it; the bureau holds it live. The HIS
    asks to reverse it (2601): fep refuses, saying 'the bureau holds nothing of it to reverse', which is false:
    the patient is charged at the bureau. Asked, fep resolves it afresh, and the bureau reverses it."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    parked = parked_settlement(running, visit)
    msgid = parked["fep_msgid"]
    assert bureau_state(running, msgid) == "live"  # checked before asking: the reversal runs on by itself
    status, asked = reversal(visit, msgid)
    assert "holds nothing" not in (asked.get("err_msg") or ""), \
        f"HTTP {status}: {said(asked)}{three_views(running, msgid)}"
    running.wait_state(msgid, "REVERSED", timeout=20)
    assert bureau_state(running, msgid) == "reversed", three_views(running, msgid)


# ---- promised (QUEUED) uploads -----------------------------------------------------------------------------------
def test_a_queued_upload_whose_replay_was_lost_is_not_parked_because_the_bureau_was_busy(running: World) -> None:
    """An upload acknowledged as QUEUED in an outage. Its replay reaches the bureau, which stores the fees, but the
    answer is lost; fep resends the msgid and the bureau is busy for a while (系统繁忙, nothing looked at). Each
    busy answer spends a try, and fep parks the promised upload 'no answer after N tries': a park for a reason
    that was never the bureau's answer, while the bureau holds the fees, and the person's settlement is refused."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")
    queued = visit.upload_fees()
    assert queued["fep_state"] == "QUEUED", said(queued)
    running.fault(mode="drop_after", infno="2204", times=1)
    running.fault(mode="error", infno="2204", message="系统繁忙", times=8)
    running.end_outage()
    msgid = queued["fep_msgid"]
    time.sleep(8)  # the bureau is busy for eight tries, then answers again
    row = running.wait_state(msgid, "ANSWERED", "NEEDS_ATTENTION", timeout=20)
    stored = running.sim_answer(msgid) or {}
    settle = visit.settle()
    assert row["state"] == "ANSWERED", (f"HIS was told QUEUED; journal {row['state']} ({row['note']}); the bureau's "
                                        f"answer for the msgid: infcode {stored.get('infcode')}; the settlement "
                                        f"then: {said(settle)}")


def test_a_deferrable_upload_without_a_psn_no_is_never_a_promise_fep_cannot_keep(running: World) -> None:
    """A deferrable trade whose input carries no psn_no belongs to no person's queue. It was acknowledged as
    QUEUED and then never replayed, a promise never kept. Now fep refuses it up front, naming the field (deferred
    work is ordered per person); nothing is queued, so nothing is left undelivered."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    with running.outage():
        status, refused = visit.post("2302", {"data": {"feedetl_sn": "0000", "mdtrt_id": visit.mdtrt_id}},
                                     msgid=his_msgid(81))
    assert status == 200 and refused["fep_state"] == "REFUSED" and "data.psn_no" in refused["err_msg"], said(refused)
    assert running.journal("his_msgid=?", (his_msgid(81),)) == []
    # With its psn_no, the same upload is queued and delivered, also across a restart.
    with running.outage():
        status, queued = visit.post("2302", {"data": {"feedetl_sn": "0000", "mdtrt_id": visit.mdtrt_id,
                                                      "psn_no": ZHANG["psn_no"]}}, msgid=his_msgid(82))
        assert status == 200 and queued["fep_state"] == "QUEUED", said(queued)
    msgid = queued["fep_msgid"]
    assert visit.identify()["infcode"] == 0  # the bureau is back and fep talks to it
    time.sleep(5)
    running.kill_fep()
    running.start_fep()
    time.sleep(5)
    row = running.trade(msgid)
    assert row["state"] != "QUEUED" and running.sim_answer(msgid) is not None, three_views(running, msgid)


def test_a_restart_while_fep_waits_for_a_late_answer_does_not_leave_the_settlement_live(world: World) -> None:
    """As above, with fep's default late grace: the 2207 times out at the bureau's slow desk, the 2601 finds
    nothing (NOT_NEEDED), and fep would still read a late answer; but the operator restarts fep (systemctl
    restart: SIGTERM, then start) while the bureau is still on it. The late answer goes to a connection that is
    gone; NOT_NEEDED is final, so recovery does nothing; the bureau settles the 2207 and the patient is charged
    while the HIS was told NOT settled."""
    world.configure(trades={"2207": {"timeout": 1}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="slow", infno="2207", seconds=4, times=1)
    answer = visit.settle()
    msgid = answer["fep_msgid"]
    assert answer["fep_state"] == "RESOLVING" and "NOT settled" in said(answer), said(answer)
    wait_for(lambda: world.sim_answer(answer["fep_resolver"]), timeout=10, what="the 2601 to find nothing")
    world.fep.terminate()  # systemctl restart fep
    world.fep.wait(10)
    world.start_fep()
    wait_for(lambda: world.ledger(), timeout=10, what="the bureau to get round to the 2207")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and bureau_state(world, msgid) == "live":
        time.sleep(0.2)
    assert bureau_state(world, msgid) != "live", three_views(world, msgid)
