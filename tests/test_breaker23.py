"""Breaker 23: "an archived trade's msgid names it forever" (schema 9, 86daea8), tried from outside as a hostile
HIS vendor and a careless operator would: the HIS's own 2601 sent again after the archive run, an HIS msgid
reused for a 2601, a crash between the month's file and the journal, an archived NOT_SENT trade, a changed
payload, a month's file an operator deleted, and a schema-8 journal upgraded beside its monthly files."""

from __future__ import annotations

import shutil
import sqlite3
import time
from contextlib import closing
from datetime import date, timedelta

from fep import envelope
from fep.sim.world import ZHANG, Visit, World, his_msgid, said, settled_visit
from tests.test_archive import AGE, DAY, age
from tests.test_breaker22 import REUSED, his_key, setl_of


def archived_after_reconciling(world: World) -> None:
    """Forty days on (fep stopped meanwhile), the days of what the journal holds reconciled, and the archive run:
    the operator's nightly routine."""
    world.stop()
    age(world, AGE)
    world.start()
    day = date.fromtimestamp(time.time() - AGE * DAY)
    for d in (day, day + timedelta(days=1)):
        done = world.cli("reconcile", "--date", d.isoformat())
        assert done.returncode == 0, done.stdout + done.stderr
    done = world.cli("archive")
    assert done.returncode == 0, done.stdout + done.stderr


def month_file(world: World) -> str:
    made = time.time() - AGE * DAY
    return f"journal-{time.strftime('%Y-%m', time.localtime(made))}.db"


# ---- what broke ---------------------------------------------------------------------------------------------------

def test_the_his_sending_its_own_2601_again_after_the_archive_run_hears_that_reversal(world: World) -> None:
    """The cashier undid Zhang's settlement with the HIS's own 2601 (under a key of its own); the bureau reversed
    it. Forty days on both moved to the month's file. The HIS's retry job, replaying a 2601 whose answer it never
    recorded, sends it again under its key: it must hear that reversal, as it would from the journal. Today
    the 2601's key is looked up in the journal only, so fep takes it as a new reversal of the archived
    settlement and refuses it ("fep undoes nothing archived"): the HIS records that the reversal did not
    happen, and asks Zhang to pay again for a settlement the bureau reversed."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    visit, settled = settled_visit(world, ZHANG)
    undo = his_key()
    reversal = world.his.call("2601", visit.reversal_input(settled["fep_msgid"]), msgid=undo)
    assert reversal["infcode"] == 0, said(reversal)
    archived_after_reconciling(world)
    assert not world.journal("infno IN ('2207', '2601')")  # both in the month's file

    again = world.his.call("2601", visit.reversal_input(settled["fep_msgid"]), msgid=undo)
    assert (again["infcode"], again.get("fep_msgid")) == (0, reversal["fep_msgid"]), \
        f"the HIS's own 2601, sent again, was told: {said(again)}"
    assert [s["state"] for s in world.ledger()] == ["reversed"]


def test_a_2601_sent_under_the_well_formed_msgid_of_an_archived_trade_is_refused_and_never_reaches_the_bureau(
        world: World) -> None:
    """Forty days ago the HIS identified Zhang (1101) under a well-formed msgid of its own, which fep sent to the
    bureau as it was; it moved to the month's file. The HIS's msgid counter was restored from an old backup and
    hands out that msgid again, now for the 2601 that undoes Zhang's settlement of today. A msgid names one trade
    forever: it must be refused (as a 2207 under it is), and the bureau must never be sent it again. Today the
    2601 is taken under it, journalled as a second trade with that msgid and sent to the bureau under it; the
    bureau replays the 1101's answer, fep takes that for the reversal's, and the HIS and the journal hold
    Zhang's settlement reversed while the bureau holds it live."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    used = his_msgid(23)
    identified = world.his.call("1101", Visit(world.his, ZHANG).identity_input(), msgid=used)
    assert identified["infcode"] == 0 and identified["fep_msgid"] == used, said(identified)
    archived_after_reconciling(world)
    assert not world.journal("msgid = ? OR his_msgid = ?", (used, used))

    visit, settled = settled_visit(world, ZHANG)
    assert world.his.call("2207", visit.settlement_input(), msgid=used)["fep_state"] == "REFUSED"  # what held
    undo = world.his.call("2601", visit.reversal_input(settled["fep_msgid"]), msgid=used)
    under_it = [(r["infno"], r["msgid"], r["state"]) for r in world.journal("msgid = ? OR his_msgid = ?", (used, used))]
    facts = (f"the HIS heard {said(undo)}; journalled under it: {under_it}; the settlement is "
             f"{world.trade(settled['fep_msgid'])['state']} in the journal, "
             f"{[s['state'] for s in world.ledger()]} at the bureau")
    assert undo["fep_state"] == "REFUSED" and not under_it, facts
    assert world.trade(settled["fep_msgid"])["state"] == "ANSWERED", facts
    assert [s["state"] for s in world.ledger()] == ["live"], facts
