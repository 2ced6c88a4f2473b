"""Hospitals upgrade in place: a journal written by the previous release opens, is migrated forward in one
transaction, and every trade in it is picked up where it was."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
import time
from pathlib import Path

from fep import envelope
from fep.journal import SCHEMA_VERSION
from fep.sim.world import ZHANG, Visit, World, wait_for

FIXTURES = Path(__file__).parent / "fixtures"
FIRST = FIXTURES / "journal-v1.db"  # written by the first release (schema 1)
PREVIOUS = FIXTURES / "journal-v4.db"  # written by the release before this one (schema 4), HIS msgids mapped


def schema(world: World) -> str:
    with sqlite3.connect(world.dir / "lib" / "journal.db") as c:
        return c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]


@pytest.mark.parametrize("fixture", [FIRST, PREVIOUS], ids=["schema-1", "schema-4"])
def test_a_journal_of_an_earlier_release_opens_and_its_open_trades_are_resolved(world: World, fixture: Path) -> None:
    (world.dir / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture, world.dir / "lib" / "journal.db")
    with sqlite3.connect(world.dir / "lib" / "journal.db") as c:  # the fixture's window closed an hour after it
        c.execute("UPDATE trades SET deadline=? WHERE state='AWAITING_CONFIRM'", (time.time() + 3600,))  # was made
    before = {r["msgid"]: r for r in world.journal()}
    world.start()
    assert schema(world) == str(SCHEMA_VERSION)
    after = {r["msgid"]: r for r in world.journal()}
    assert set(before) <= set(after)  # nothing lost
    for msgid, row in before.items():  # what was done stays as it was
        if row["state"] in ("ANSWERED", "NOT_SENT", "REVERSED"):
            assert after[msgid]["state"] == row["state"]
            assert (after[msgid]["answer"], after[msgid]["setl_id"]) == (row["answer"], row["setl_id"])
    # What was at the bureau when the old fep stopped is resolved; the bureau never had these.
    wait_for(lambda: not world.journal("state IN ('SENT','UNKNOWN','RESOLVING') AND related IS NULL"),
             timeout=30, what="the old release's open trades to be resolved")
    settlement = next(m for m, r in before.items() if r["infno"] == "2207" and r["state"] == "SENT")
    assert world.trade(settlement)["state"] == "NOT_NEEDED"
    assert world.trade(next(m for m, r in before.items() if r["state"] == "AWAITING_CONFIRM"))["state"] == \
        "AWAITING_CONFIRM"  # its window goes on from its stored deadline
    # An HIS asking again with a msgid of the old release is known by it: this one was never sent, so now it is.
    query = next(r for r in before.values() if r["infno"] == "1101")
    again = world.his.call("1101", envelope.loads(query["request"])["input"], msgid=query["msgid"])
    assert (again["fep_msgid"], again["fep_state"], again["infcode"]) == (query["msgid"], "ANSWERED", 0), again
    # The msgid counter goes on from where it was: a new trade gets a number never used.
    answer = Visit(world.his, ZHANG).identify()
    assert answer["infcode"] == 0 and answer["fep_msgid"] not in before
    # An HIS retrying with its own msgid, mapped by the old release, hears the stored answer of its trade.
    for msgid, row in before.items():
        if row.get("his_msgid") and row["state"] == "ANSWERED":
            again = world.his.call(row["infno"], envelope.loads(row["request"])["input"], msgid=row["his_msgid"])
            assert (again["fep_msgid"], again["fep_state"]) == (msgid, "ANSWERED"), again


def test_a_journal_newer_than_this_fep_is_refused_at_start_naming_both_versions(world: World) -> None:
    (world.dir / "lib").mkdir(parents=True, exist_ok=True)
    path = world.dir / "lib" / "journal.db"
    shutil.copy(PREVIOUS, path)
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema'")
    world.start_sim()
    fep = world.start_fep(wait=False)
    assert fep.wait(30) != 0
    assert "schema 99, newer than this fep" in world.log("run")
