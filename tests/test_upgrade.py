"""Hospitals upgrade in place: a journal written by the previous release opens, is migrated forward in one
transaction, and every trade in it is picked up where it was."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing

import pytest
import time
from pathlib import Path

from fep import envelope
from fep.archive import MonthlyFiles
from fep.journal import SCHEMA_VERSION
from fep.sim.world import ZHANG, Visit, World, wait_for
from tests.test_catalog import visit_with_hospital_codes

FIXTURES = Path(__file__).parent / "fixtures"
FIRST = FIXTURES / "journal-v1.db"  # written by the first release (schema 1)
EARLIER = FIXTURES / "journal-v4.db"  # written by an earlier release (schema 4), HIS msgids mapped
# written by the release before this one (schema 7): also an audit entry, an insured place, a month's clearing
PREVIOUS = FIXTURES / "journal-v7.db"
# A pair node's own file at journal.path, as the release before the shared code book left it (schema 7): its
# catalogs (1301, 1305, a 1312 page) and the hospital's mapping H-AMOX and H-CBC
LOCAL_CODE_BOOK = FIXTURES / "codebook-v7.db"


def schema(world: World) -> str:
    with sqlite3.connect(world.dir / "lib" / "journal.db") as c:
        return c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]


@pytest.mark.parametrize("fixture", [FIRST, EARLIER, PREVIOUS], ids=["schema-1", "schema-4", "schema-7"])
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


def test_what_the_previous_release_recorded_besides_trades_is_there_after_the_upgrade(world: World) -> None:
    """The audit trail, the insured places learnt from 1101 answers and the month's clearing, as schema 7 kept
    them, are read by this release as it reads its own."""
    (world.dir / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy(PREVIOUS, world.dir / "lib" / "journal.db")
    world.start()
    audit = world.cli("audit", "--since", "2026-01-01")
    assert audit.returncode == 0 and "reverse" in audit.stdout and "patient left" in audit.stdout, audit
    assert world.query("SELECT insuplc_admdvs FROM insured_places WHERE psn_no = '43010000000000000006'") == \
        [{"insuplc_admdvs": "440100"}]
    assert world.query("SELECT state, fund, paid FROM clearings WHERE month = '2026-10'") == \
        [{"state": "applied", "fund": "160.00", "paid": "160.00"}]


def test_a_trade_the_previous_release_archived_is_still_known_by_its_his_msgid(world: World) -> None:
    """The previous release's archive job moved an answered settlement to its month's file and kept nothing of it
    in the journal. After the upgrade, the HIS sending it again under its own msgid hears that settlement: no
    new trade, nothing sent to the bureau."""
    lib = world.dir / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy(PREVIOUS, lib / "journal.db")
    with sqlite3.connect(lib / "journal.db") as journal, closing(MonthlyFiles._open(lib / "journal-2026-11.db")) as month:
        journal.row_factory = sqlite3.Row
        row = journal.execute("SELECT * FROM trades WHERE infno = '2207' AND state = 'ANSWERED' AND "
                              "his_msgid IS NOT NULL").fetchone()
        with month:  # as that release's job wrote it: the file first, then out of the journal
            month.execute(f"INSERT INTO trades ({', '.join(row.keys())}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row))
        journal.execute("DELETE FROM trades WHERE msgid = ?", (row["msgid"],))
    world.start()
    again = world.his.call("2207", envelope.loads(row["request"])["input"], msgid=row["his_msgid"])
    assert (again["fep_msgid"], again["fep_state"], again["infcode"]) == (row["msgid"], "ANSWERED", 0), again
    assert not world.journal("his_msgid = ?", (row["his_msgid"],)) and world.sim_answer(row["msgid"]) is None


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


def test_a_pair_upgraded_in_place_maps_fee_lines_by_the_code_book_each_node_kept_in_its_own_file(
        world: World, pg_url: str) -> None:
    """The release before kept a pair's code book in each node's own file at journal.path; this one keeps it in
    PostgreSQL for both. At start a node copies into the shared tables what they lack of its file's, and keeps
    the file as NAME.in-postgresql: the first 2204 after the upgrade is mapped, with no import. Node b's file
    (synced later than a's, its mapping edited on b alone) adds its newer catalog rows, nothing twice, and
    leaves the mapping node a brought, saying where they differ."""
    world.share_journal(pg_url)
    for node in ("a", "b"):
        world.local_file(node).parent.mkdir(parents=True)
        shutil.copy(LOCAL_CODE_BOOK, world.local_file(node))
    with sqlite3.connect(world.local_file("b")) as b:
        b.execute('INSERT INTO catalog_1301 ("医疗目录编码", "药品通用名", "有效标志", "版本号") '
                  "VALUES ('XB02BBB002B002020200002', '头孢克肟片', '1', 'v2026110')")  # valid again
        b.execute("UPDATE catalog_1312 SET hilist_name = '阿莫西林', updt_time = '2026-11-01 08:00:00'")
        b.execute("UPDATE medlist_map SET national_code = 'XB02BBB002B002020200002' WHERE hosp_code = 'H-CBC'")
    world.start_sim()
    world.start_fep()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    _, input_ = visit_with_hospital_codes(world.his, ["H-AMOX", "H-CBC"])
    answer = world.his.call("2204", input_)
    assert answer["infcode"] == 0, answer
    sent = envelope.loads(world.trade(answer["fep_msgid"])["request"])["input"]["feedetail"]
    assert [(l["medins_list_codg"], l["med_list_codg"]) for l in sent] == [("H-AMOX", "XA01AAA001A001010100001"),
                                                                          ("H-CBC", "250101001")]
    assert "taken into the shared tables" in world.log("run")
    assert not world.local_file("a").exists()
    assert world.local_file("a").with_name("local.db.in-postgresql").exists()  # kept, no longer read

    world.start_peer()
    world.wait_for_standby("b")
    assert world.local_file("b").with_name("local.db.in-postgresql").exists()
    assert sorted((r["code"], r["ver"]) for r in world.query(
        'SELECT "医疗目录编码" AS code, "版本号" AS ver FROM catalog_1301')) == [
        ("XA01AAA001A001010100001", "v2026100"), ("XB02BBB002B002020200002", "v2026100"),
        ("XB02BBB002B002020200002", "v2026110")]  # b's newer version added, a's rows not twice
    assert [(r["rid"], r["hilist_name"]) for r in world.query("SELECT rid, hilist_name FROM catalog_1312")] == [
        ("R1312-1", "阿莫西林")]  # the row updated later wins
    assert sorted((r["hosp_code"], r["national_code"]) for r in world.query("SELECT * FROM medlist_map")) == [
        ("H-AMOX", "XA01AAA001A001010100001"), ("H-CBC", "250101001")]  # the mapping a brought stays
    assert "differs from the shared one in 1 hospital code(s) (H-CBC)" in world.log("run-b")


def test_a_pair_node_whose_own_file_cannot_be_read_starts_and_leaves_the_file_for_the_next_start(
        world: World, pg_url: str) -> None:
    world.share_journal(pg_url)
    local = world.local_file("a")
    local.parent.mkdir(parents=True)
    local.write_bytes(b"not a database")
    world.start_sim()
    world.start_fep()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    assert local.read_bytes() == b"not a database"
    assert "could not be taken into the shared tables; it stays" in world.log("run")
