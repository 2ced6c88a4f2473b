"""Breaker 22: one trade per HIS msgid, after the payload's digest became one of the HIS's own bytes (b2490ad),
tried from outside as an HIS vendor would: the same msgid sent again in another charset or form, with fee
lines fep maps, after a NOT_SENT, while the first waits for its patient's lane, after the archive run, and
under the msgid fep answered with."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import date, timedelta
from typing import Any, Callable

from fep.sim.world import ZHANG, Visit, World, said, wait_for
from tests.test_archive import AGE, DAY, age

REUSED = "already used for a different trade"


def his_key() -> str:
    return uuid.uuid4().hex.upper()[:30]


# ---- what broke ---------------------------------------------------------------------------------------------------

def test_a_settlement_changed_and_sent_again_under_its_msgid_while_the_first_waits_for_the_patient_is_refused(
        running: World) -> None:
    """The cashier settles Zhang's visit while his other visit's fees are still uploading (a slow bureau), so the
    settlement waits for his lane. She changes it to cash (acct_used_flag 0) and the HIS sends it again under
    the same msgid. That is a different trade under a used msgid: it must be refused, as it is once the first
    is journalled. Today both pass fep's look-up before either is journalled, and the changed one is told the
    first one's answer as its own: the HIS records a cash settlement the bureau never saw."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    other = Visit(running.his, ZHANG)
    other.open()
    running.fault(mode="slow", infno="2204", seconds=3.0, times=1)
    heard: dict[str, dict[str, Any]] = {}
    key = his_key()
    cash = {"data": visit.settlement_input()["data"] | {"acct_used_flag": "0"}}
    sends: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("upload", other.upload_fees),
        ("first", lambda: running.his.call("2207", visit.settlement_input(), msgid=key)),
        ("changed", lambda: running.his.call("2207", cash, msgid=key))]
    threads = []
    for name, send in sends:
        threads.append(threading.Thread(target=lambda n=name, s=send: heard.update({n: s()})))
        threads[-1].start()
        if name == "upload":
            wait_for(lambda: running.journal("infno='2204' AND state='SENT'"), what="the upload at the bureau")
        time.sleep(0.3)  # the first settlement is in the lane before the changed one
    for t in threads:
        t.join()
    assert heard["upload"]["infcode"] == 0 and heard["first"]["infcode"] == 0, said(heard["first"])
    changed = heard["changed"]
    told = (changed.get("output") or {}).get("setlinfo") or {}
    assert changed["fep_state"] == "REFUSED" and REUSED in changed["err_msg"], \
        f"the cash settlement was told {said(changed)} setl_id {told.get('setl_id')}, acct_pay {told.get('acct_pay')}"
    assert len(running.journal("infno='2207'")) == 1 and len(running.ledger()) == 1


def test_a_settlement_sent_again_under_its_msgid_after_the_archive_run_is_not_settled_again(world: World) -> None:
    """Zhang's settlement lost its answer and fep reversed it: the HIS was told it was not settled. Forty days
    on the day is reconciled and the nightly archive moves it out of the journal. The HIS's retry job, replaying
    what never went through, sends the same msgid: it must hear what became of that trade. Today fep no longer
    knows the msgid and settles Zhang again: two settlements at the bureau under one HIS msgid, the second live."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    key = his_key()
    world.fault(mode="drop_after", infno="2207", times=1)
    first = visit.settle(msgid=key)
    wait_for(lambda: world.trade(first["fep_msgid"])["state"] == "REVERSED", what="the reversal")
    world.stop()
    age(world, AGE)
    world.start()
    day = date.fromtimestamp(time.time() - AGE * DAY)
    for d in (day, day + timedelta(days=1)):
        assert world.cli("reconcile", "--date", d.isoformat()).returncode == 0
    assert world.cli("archive").returncode == 0
    assert not world.journal("infno='2207'")  # moved to the month's file

    again = visit.settle(msgid=key)
    assert again["infcode"] != 0 and again.get("fep_msgid") in (None, first["fep_msgid"]), \
        f"the msgid of a reversed settlement settled anew: {said(again)}"
    assert [s["state"] for s in world.ledger()] == ["reversed"]


def test_an_his_that_sends_again_under_the_msgid_fep_answered_with_hears_that_trade_and_its_2601_undoes_it(
        running: World) -> None:
    """An HIS that sends no msgid of its own keeps the fep_msgid of the answer: the README says a lookup and its
    own 2601 take it. Its timeout retry sends the settlement again under that msgid. It must hear the stored
    answer, and its 2601 naming that msgid must undo that settlement. Today the retry is a second 2207 to the
    bureau (refused: nothing left to settle), the msgid now names it, a lookup says the settlement failed, and
    the 2601 goes to the bureau naming the refused one: Zhang's settlement stays live."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    first = running.his.call("2207", visit.settlement_input())
    assert first["infcode"] == 0, said(first)
    key = first["fep_msgid"]
    again = running.his.call("2207", visit.settlement_input(), msgid=key)
    assert (again["fep_msgid"], again["infcode"]) == (key, 0), f"sent to the bureau again: {said(again)}"
    assert len(running.journal("infno='2207'")) == 1
    reversal = running.his.call("2601", visit.reversal_input(key))
    assert reversal["infcode"] == 0, said(reversal)
    assert [s["state"] for s in running.ledger()] == ["reversed"]
