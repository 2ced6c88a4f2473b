"""Stranded trades and data: nothing the HIS was told is queued is left parked for a reason that was never the
bureau's answer; nothing is left UNKNOWN for good; and a journal that cannot write is said out loud."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from fep import envelope
from fep.trades import TradeBook
from fep.sim.world import ROOT, ZHANG, Visit, World, his_msgid, parked_upload, said, wait_for


def delivered(world: World, visit: Visit, msgid: str) -> None:
    """The upload reached the bureau and was processed there: ANSWERED with infcode 0 in the journal, the
    bureau's own answer for the msgid is a success, and the bureau has its fees (a pre-settlement adds them up)."""
    row = world.wait_state(msgid, "ANSWERED", timeout=15)
    assert envelope.loads(row["answer"])["infcode"] == 0, row["answer"]
    assert (world.sim_answer(msgid) or {}).get("infcode") == 0, world.sim_answer(msgid)
    presettled = visit.presettle()
    assert presettled["infcode"] == 0, said(presettled)


def test_a_queued_upload_whose_replay_meets_a_busy_bureau_is_delivered(running: World) -> None:
    """An upload acknowledged as QUEUED in an outage; when it is replayed the bureau is busy (系统繁忙, nothing
    processed): it is sent again and delivered, not parked."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")
    queued = visit.upload_fees()
    assert queued["fep_state"] == "QUEUED", said(queued)
    running.fault(mode="error", infno="2204", message="系统繁忙", times=1)
    running.end_outage()
    delivered(running, visit, queued["fep_msgid"])


def test_a_queued_upload_replayed_after_the_bureau_forgot_its_session_is_delivered(running: World) -> None:
    """An upload acknowledged as QUEUED in an outage during which the bureau forgot fep's session: its replay is
    refused 'not signed in'; fep signs in again and delivers it, not parks it."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    with running.outage():
        queued = visit.upload_fees()
        assert queued["fep_state"] == "QUEUED", said(queued)
        running.expire_sessions()
    delivered(running, visit, queued["fep_msgid"])


def test_a_parked_upload_dropped_by_a_person_lets_the_person_s_next_upload_go(running: World) -> None:
    """An upload the bureau refused on replay is parked, and the person's next upload waits behind it; the
    operator drops it with a reason (fep drop): it is DROPPED, the reason kept, and the next upload goes."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    parked = parked_upload(running, visit)
    waiting = visit.upload_fees()
    assert waiting["fep_state"] == "QUEUED", said(waiting)
    reason = "unknown code; the fee is billed again under 250101001"
    dropped = running.cli("drop", parked["fep_msgid"], "--reason", reason)
    assert dropped.returncode == 0, dropped.stderr
    row = running.wait_state(parked["fep_msgid"], "DROPPED")
    assert reason in " ".join([row["note"] or ""] + [note or "" for _, _, note in running.history(row["msgid"])])
    delivered(running, visit, waiting["fep_msgid"])


def test_probes_while_the_bureau_is_down_do_not_use_up_a_queued_upload_s_tries(running: World) -> None:
    """An upload queued in an outage long enough for the link probe to try it more than max_tries times; back up,
    its first replay's answer is lost: it is sent again and delivered, because the probes were never tries."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="refuse")
    queued = visit.upload_fees()
    assert queued["fep_state"] == "QUEUED", said(queued)
    time.sleep(8)  # the probe every second: more than max_tries (6) attempts that could not leave
    running.fault(mode="drop_after", infno="2204", times=1)
    running.end_outage()
    delivered(running, visit, queued["fep_msgid"])


def test_a_parked_discharge_sent_on_by_fep_replay_ends_with_the_bureau_s_answer(running: World) -> None:
    """A 2402 (on_unknown: person) whose answer was lost is parked; the operator sends it on with fep replay: it
    ends with the bureau's answer for its msgid, not UNKNOWN for good. (The simulator has no 2402, so its answer
    is a business refusal: a promised upload the bureau refuses stays parked, now with the bureau's answer.)"""
    visit = Visit(running.his, ZHANG)
    visit.open()
    running.fault(mode="drop_after", infno="2402", times=1)
    msgid = visit.discharge()["fep_msgid"]
    running.wait_state(msgid, "NEEDS_ATTENTION")
    replayed = running.cli("replay", msgid)
    assert replayed.returncode == 0, replayed.stderr
    row = wait_for(lambda: (r := running.trade(msgid))["answer"] and r, what="the bureau's answer to the replay")
    assert row["state"] == "NEEDS_ATTENTION" and "refused" in row["note"]
    bureau = running.sim_answer(msgid)
    assert bureau is not None
    ours = envelope.loads(row["answer"])
    assert (ours["infcode"], ours["err_msg"]) == (bureau["infcode"], bureau["err_msg"])
    heard = running.his.lookup(msgid)
    assert (heard["infcode"], heard["err_msg"]) == (bureau["infcode"], bureau["err_msg"]), said(heard)


def test_a_reversal_waiting_out_its_backoff_does_not_hold_up_the_person_s_next_settlement(world: World) -> None:
    """A settlement's 2601 got no answer and waits 20 s before it is repeated, longer than the HIS is told to wait
    for any answer (10 s); meanwhile the same person's next visit settles at once, instead of waiting behind the
    backoff and failing as not sent."""
    short = {infno: {"timeout": 5} for infno in TradeBook.load(ROOT / "conf" / "trades.yaml").defs}
    world.configure(trades=short, fep={"his": {"answer_within": 10}, "resolution": {"backoff": [0, 20]}})
    world.start()
    first, second = Visit(world.his, ZHANG), Visit(world.his, ZHANG)
    for v in (first, second):
        v.up_to_settlement()
    world.fault(mode="drop_after", infno="2207", times=1)
    world.fault(mode="drop_after", infno="2601", times=1)
    reversing = first.settle()
    assert reversing["fep_state"] == "RESOLVING", said(reversing)
    wait_for(lambda: world.sim_answer(reversing["fep_resolver"]), what="the first 2601 to reach the bureau")
    time.sleep(0.5)  # fep hears the 2601's connection drop and starts its backoff
    answer = second.settle()
    assert answer["infcode"] == 0, said(answer)
    assert answer["fep_msgid"] in world.live()
    assert world.trade(reversing["fep_msgid"])["state"] == "RESOLVING"  # its 2601 is still to be repeated


def test_concurrent_resubmissions_of_a_query_not_sent_in_an_outage_are_answered_or_told_to_wait(
        running: World) -> None:
    """A 1101 failed NOT_SENT in an outage; back up, the HIS resubmits its msgid from 10 threads at once: each
    hears 200 (the answer) or 409 (in progress), never a 500. (The bureau restarted during the outage and signs
    fep in slowly, so the resubmissions may all wait for the same sign-in and then go on together.)"""
    visit = Visit(running.his, ZHANG)
    assert visit.identify()["infcode"] == 0  # fep is signed in (its sign-in at start is done)
    msgid = his_msgid(12)
    with running.outage():
        status, failed = visit.post("1101", visit.identity_input(), msgid=msgid)
        running.expire_sessions()
    assert status == 200 and failed["fep_state"] == "NOT_SENT", said(failed)
    running.fault(mode="slow", infno="9001", seconds=1, times=1)
    visit.identify()  # another patient at the desk: fep learns the session is gone
    start = threading.Barrier(10)
    statuses: list[int] = []

    def resubmit() -> None:
        start.wait()
        statuses.append(visit.post("1101", visit.identity_input(), msgid=msgid)[0])

    threads = [threading.Thread(target=resubmit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    heard = ", ".join(f"{statuses.count(s)} x HTTP {s}" for s in sorted(set(statuses)))
    assert len(statuses) == 10 and set(statuses) <= {200, 409}, heard
    assert running.wait_state(msgid, "ANSWERED") and running.his.lookup(msgid)["infcode"] == 0


def test_fep_started_on_a_read_only_journal_directory_exits_naming_the_journal(world: World) -> None:
    """The journal's directory is read-only when fep starts: it exits non-zero and says which journal it cannot
    open, instead of hanging without a word."""
    with world.journal_on_tmpfs("ro") as lib:
        fep = world.start_fep(wait=False)
        try:
            code = fep.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fep is still running 10 s after starting on the read-only {lib}, and has not "
                                 f"said so: {world.log('run')[-2000:]!r}") from None
        assert code != 0
        assert str(lib / "journal.db") in world.log("run")


def _fill(path: os.PathLike[str]) -> None:
    """Write until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * (1 << 20))
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_settlement_answered_while_the_journal_disk_is_full_is_kept_when_space_returns(world: World) -> None:
    """The journal's disk fills while a 2207 is at the bureau: new trades are refused 503 'journal cannot write';
    once there is space, the 2207 holds the bureau's success (no reversal), and the HIS, the journal and the
    bureau agree."""
    with world.journal_on_tmpfs("size=16m") as lib:
        world.start()
        visit = Visit(world.his, ZHANG)
        visit.up_to_settlement()
        world.fault(mode="slow", infno="2207", seconds=2, times=1)
        msgid = his_msgid(14)
        settling = threading.Thread(target=lambda: visit.post("2207", visit.settlement_input(), msgid=msgid))
        settling.start()
        wait_for(lambda: world.journal("msgid=?", (msgid,)), what="the 2207 to be journalled and sent")
        _fill(lib / "filler")

        status, refused = world.post_raw(envelope.dumps({"infno": "1101", "input": visit.identity_input()}))
        assert status == 200 and refused["fep_reason"] == "journal_cannot_write", (status, said(refused))
        assert "journal cannot write" in refused["err_msg"]
        wait_for(lambda: world.ledger(), what="the bureau to settle the 2207")
        time.sleep(1)  # its answer reaches fep while the disk is still full
        (lib / "filler").unlink()

        row = world.wait_state(msgid, "ANSWERED", timeout=15)
        assert envelope.loads(row["answer"])["infcode"] == 0
        settling.join(60)
        heard = world.his.lookup(msgid)
        assert heard["infcode"] == 0 and heard["fep_state"] == "ANSWERED", said(heard)
        assert world.live() == [msgid] and not world.journal("infno='2601'")
        world.assert_ledgers_agree()
