"""Years of trades: finished ones older than journal.keep_days move to monthly archive files beside the journal,
where `fep show` and `fep trades` still find them; what is open, what the bureau holds, and what a
reconciliation still needs stay in the journal."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from datetime import date, timedelta

from fep import archive
from fep.sim.world import LI, WANG, ZHANG, Visit, World, parked_settlement, reversed_settlement, settled_visit

DAY = 86400
AGE = 40  # days the trades are made older than they are; keep_days is 30


def age(world: World, days: int) -> None:
    """As if the trades in the journal were made `days` ago (fep stopped)."""
    with closing(sqlite3.connect(world.journal_path)) as c, c:
        c.execute("UPDATE trades SET created = created - ?, updated = updated - ?", (days * DAY, days * DAY))
        c.execute("UPDATE events SET at = at - ?", (days * DAY,))


def listed(world: World, *args: str) -> set[str]:
    done = world.cli("trades", "--json", "--limit", "1000", *args)
    assert done.returncode == 0, done.stderr
    return {r["msgid"] for r in json.loads(done.stdout)}


def copied_before_a_crash(world: World, month_file: str, msgid: str) -> None:
    """What a crash after the copy into the month's file and before the delete from the journal leaves: the trade
    in both."""
    with closing(sqlite3.connect(world.journal_path.with_name(month_file))) as a, a:
        for statement in archive._SCHEMA:
            a.execute(statement)
        a.execute("ATTACH DATABASE ? AS journal", (str(world.journal_path),))
        a.execute("INSERT INTO trades SELECT * FROM journal.trades WHERE msgid = ?", (msgid,))


def test_finished_trades_older_than_keep_days_move_to_monthly_files_and_are_still_found(world: World) -> None:
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    zhang, settled = settled_visit(world, ZHANG)  # in force at the bureau: it may still be cancelled
    li = Visit(world.his, LI)
    li.up_to_settlement()
    reversed_ = reversed_settlement(world, li)["fep_msgid"]  # money: waits for its day's reconciliation
    wang = Visit(world.his, WANG)
    wang.up_to_settlement()
    parked = parked_settlement(world, wang)["fep_msgid"]  # a person decides: not final
    world.stop()
    age(world, AGE)
    made = time.time() - AGE * DAY
    day, month = date.fromtimestamp(made), time.strftime("%Y-%m", time.localtime(made))
    month_file = f"journal-{month}.db"
    query = world.journal("infno = '1101'")[0]["msgid"]
    copied_before_a_crash(world, month_file, query)
    world.start()
    before = {r["msgid"]: r for r in world.journal()}

    done = world.cli("archive")
    assert done.returncode == 0, done.stderr
    stayed = {r["msgid"] for r in world.journal()}
    gone = set(before) - stayed
    assert {"9001", "1101", "2201", "2203", "2204"} == {before[m]["infno"] for m in gone}
    assert {settled["fep_msgid"], reversed_, parked} <= stayed
    assert any(before[m]["infno"] == "9001" for m in stayed)  # today's sign-in is not old enough
    assert all(before[m]["related"] != parked for m in gone)  # the parked trade's resolving trades stay with it
    assert f"moved to the archive files of {month}" in done.stdout
    with closing(sqlite3.connect(world.journal_path.with_name(month_file))) as a:
        in_file = [r[0] for r in a.execute("SELECT msgid FROM trades")]
    assert sorted(in_file) == sorted(gone)  # each once: the copy a crash left was written again, not twice

    # Still found, as before.
    show = world.cli("show", query)
    assert show.returncode == 0 and f"archived: read from {month_file}" in show.stdout, show.stdout + show.stderr
    assert "accept" in show.stdout and "answer" in show.stdout  # its history came along
    assert listed(world) == set(before)
    assert listed(world, "--person", ZHANG["psn_no"]) == {m for m, r in before.items() if r["psn_no"] == ZHANG["psn_no"]}
    status = json.loads(world.cli("status", "--json").stdout)
    counts: dict[str, int] = {}
    for r in world.journal():
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    assert status["trades_by_state"] == counts  # what left no longer counts in its state

    # The day does not reconcile while the parked settlement is unresolved: the reversed one waits too.
    assert world.cli("reconcile", "--date", day.isoformat()).returncode == 1
    assert world.cli("archive").returncode == 0
    assert {reversed_, parked} <= {r["msgid"] for r in world.journal()}
    # A person decides; the days are reconciled and balance: the reversed settlement leaves with its reversal.
    # The dropped one changed today: it waits its keep_days from now.
    assert world.cli("drop", parked, "--reason", "the bureau's office confirmed it by phone").returncode == 0
    for d in (day, day + timedelta(days=1)):
        assert world.cli("reconcile", "--date", d.isoformat()).returncode == 0
    assert world.cli("archive").returncode == 0
    stayed = {r["msgid"] for r in world.journal()}
    assert reversed_ not in stayed and parked in stayed
    shown = json.loads(world.cli("show", reversed_, "--json").stdout)
    assert shown["state"] == "REVERSED" and [t["infno"] for t in shown["resolving_trades"]] == ["2601"]
    assert settled["fep_msgid"] in {r["msgid"] for r in world.journal()}  # in force: it stays for good

    # A cancel of the settlement that stayed still finds it: refund order holds.
    cancel = zhang.cancel(settled["output"]["setlinfo"]["setl_id"])
    assert cancel["infcode"] == 0, cancel
