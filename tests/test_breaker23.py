"""Breaker 23: "an archived trade's msgid names it forever" (schema 9, 86daea8), tried from outside as a hostile
HIS vendor and a careless operator would: the HIS's own 2601 sent again after the archive run, an HIS msgid
reused for a 2601, a crash between the month's file and the journal, an archived NOT_SENT trade, a changed
payload, a month's file an operator deleted, and a schema-8 journal upgraded beside its monthly files."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from contextlib import closing
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest

from fep import archive
from fep.journal import COLUMNS, EVENT_COLUMNS
from fep.sim.world import LI, ZHANG, Visit, World, his_msgid, reversed_settlement, said, settled_visit, wait_for
from tests.test_archive import AGE, DAY, age, archived_after_reconciling, copied_before_a_crash, reconciled_after
from tests.test_breaker22 import REUSED, his_key, not_settled_again, reversed_under_its_key
from tests.test_upgrade import PREVIOUS


def month_file(world: World) -> str:
    made = time.time() - AGE * DAY
    return f"journal-{time.strftime('%Y-%m', time.localtime(made))}.db"


# ---- what broke ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_his_sending_its_own_2601_again_after_the_archive_run_hears_that_reversal(
        world: World, backend: str, request: pytest.FixtureRequest) -> None:
    """The cashier undid Zhang's settlement with the HIS's own 2601 (under a key of its own); the bureau reversed
    it. Forty days on both moved to the month's file. The HIS's retry job, replaying a 2601 whose answer it never
    recorded, sends it again under its key: it must hear that reversal, as it would from the journal. Today
    the 2601's key is looked up in the journal only, so fep takes it as a new reversal of the archived
    settlement and refuses it ("fep undoes nothing archived"): the HIS records that the reversal did not
    happen, and asks Zhang to pay again for a settlement the bureau reversed. On PostgreSQL alike."""
    if backend == "postgresql":
        world.share_journal(request.getfixturevalue("pg_url"))
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    if backend == "postgresql":
        wait_for(lambda: world.leading() == "a", what="node a to lead")
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


def left_in_a_monthly_file(world: World, msgids: list[str]) -> str:
    """What a release before the archive tables did on PostgreSQL: the trades (and their events) moved out of the
    shared journal into the month's file beside node a's journal.path. Returns the file's name."""
    beside = world.local_file("a")
    beside.parent.mkdir(parents=True, exist_ok=True)
    name = month_file(world).replace("journal", beside.stem)
    cols, ecols = ", ".join(COLUMNS), ", ".join(EVENT_COLUMNS)
    with psycopg.connect(world.journal_url) as pg:  # type: ignore[arg-type]
        trades = pg.execute(f"SELECT {cols} FROM trades WHERE msgid = ANY(%s)", (msgids,)).fetchall()
        events = pg.execute(f"SELECT {ecols} FROM events WHERE msgid = ANY(%s)", (msgids,)).fetchall()
        with closing(sqlite3.connect(beside.with_name(name))) as f, f:
            for statement in archive._SCHEMA:
                f.execute(statement)
            f.executemany(f"INSERT INTO trades ({cols}) VALUES ({', '.join('?' * len(COLUMNS))})",
                          [tuple(v.tobytes() if isinstance(v, memoryview) else v for v in t) for t in trades])
            f.executemany(f"INSERT INTO events ({ecols}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})", events)
        pg.execute("DELETE FROM events WHERE msgid = ANY(%s)", (msgids,))
        pg.execute("DELETE FROM trades WHERE msgid = ANY(%s)", (msgids,))
    return name


def test_on_postgresql_a_settlement_in_a_monthly_file_an_earlier_release_left_is_not_settled_again(
        world: World, pg_url: str) -> None:
    """A pair on PostgreSQL ran a release before the archive tables: its nightly run moved Zhang's reversed
    settlement (the HIS's uuid key; fep reversed it when its answer was lost) into the month's file beside node
    a's journal.path. The pair is upgraded in the morning; the first archive run as leader, which takes the
    file into the tables, is tonight. Meanwhile the HIS's retry job sends the settlement again under its key.
    fep show still finds it on node a (it reads the file); the HIS must hear that trade, or a refusal. Today
    for_his on PostgreSQL searches archived_trades only, not the node's files: Zhang is settled again, a second
    settlement live at the bureau under one HIS msgid."""
    world.share_journal(pg_url)
    visit, key, first = reversed_under_its_key(world)
    world.stop()
    age(world, AGE)
    family = [r["msgid"] for r in world.journal("msgid = ? OR related = ?", (first["fep_msgid"], first["fep_msgid"]))]
    name = left_in_a_monthly_file(world, family)
    world.start()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    shown = world.cli("show", first["fep_msgid"])
    # what held: fep show finds it (now in archived_trades: the file was taken in when the node started)
    assert "archived: read from" in shown.stdout, shown.stdout + shown.stderr
    beside = world.local_file("a").with_name(name)
    assert not beside.exists() and beside.with_name(f"{name}.in-postgresql").exists()

    not_settled_again(world, visit.settle(msgid=key), first)


def test_a_not_sent_settlement_resent_while_the_archive_run_moves_it_is_told_so_plainly(world: World) -> None:
    """Forty days ago the bureau was down and Zhang's settlement was NOT_SENT; nothing moves money of it, so the
    archive needs no reconciliation for it. Today Zhang's new visit is uploading fees (a slow bureau), and the
    HIS's retry job sends the old settlement again under its key: it waits for Zhang's lane. Meanwhile the
    operator runs `fep archive`, which moves the old settlement out of the journal. When the lane frees, the
    retry must not send it, and the HIS must hear the trade or a clear refusal, not an internal error. Today the
    retry's transition finds no row, takes it for a concurrent resubmission's, reads the trade back from the
    journal (None) and fails on it: the HIS hears "internal error in fep; the request is in the journal if it
    was accepted" (AttributeError in Engine._reply), while the trade is in the month's file, not the journal.
    Nothing is sent: the race costs the HIS a clear answer, not money."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    old = Visit(world.his, ZHANG)
    old.up_to_settlement()
    key = his_key()
    with world.outage():
        first = old.settle(msgid=key)
    assert first["fep_state"] == "NOT_SENT", said(first)
    world.stop()
    age(world, AGE)
    world.start()
    other = Visit(world.his, ZHANG)
    other.open()
    world.fault(mode="slow", infno="2204", seconds=4.0, times=1)
    heard: dict[str, dict[str, Any]] = {}
    upload = threading.Thread(target=lambda: heard.update(upload=other.upload_fees()))
    upload.start()
    wait_for(lambda: world.journal("infno='2204' AND state='SENT'"), what="the upload at the bureau")
    resend = threading.Thread(target=lambda: heard.update(again=old.settle(msgid=key)))
    resend.start()
    time.sleep(0.3)  # the resend waits for Zhang's lane
    done = world.cli("archive")
    assert done.returncode == 0, done.stdout + done.stderr
    upload.join()
    resend.join()
    again = heard["again"]
    facts = (f"archive: {done.stdout.strip()}; the HIS heard {again}; the journal holds "
             f"{[(r['infno'], r['state']) for r in world.journal('his_msgid = ?', (key,))]}; the bureau holds "
             f"{[s['state'] for s in world.ledger()]}")
    assert not world.ledger(), facts  # never sent
    assert again.get("fep_state") in ("NOT_SENT", "REFUSED") and "internal error" not in again["err_msg"], facts


def test_a_settlement_sent_under_the_fep_msgid_of_another_trade_is_not_settled_again_after_both_are_archived(
        world: World) -> None:
    """An HIS that sends no msgid of its own keeps the fep_msgid of Zhang's 1101 as the visit's key and, by a
    bug of its own, sends the settlement under it: fep takes it as the settlement's HIS msgid (fep numbered the
    1101 itself, so nothing is refused). The settlement's answer is lost and fep reverses it. Forty days on both
    are archived. The HIS's retry job sends the settlement again under that key: from the journal it heard the
    settlement (the HIS msgid is looked up first); it must hear it from the archive too. Today archived_keys
    keeps one trade per key, the first inserted, fep's own msgid (the 1101): the settlement meets the 1101,
    which is another payload with no HIS msgid, so it is a new trade and Zhang is settled again."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    visit = Visit(world.his, ZHANG)
    identified = world.his.call("1101", visit.identity_input())
    assert identified["infcode"] == 0, said(identified)
    key = identified["fep_msgid"]
    visit.register()
    visit.diagnose()
    assert visit.upload_fees()["infcode"] == 0
    first = reversed_settlement(world, visit, key)
    before = world.his.call("2207", visit.settlement_input(), msgid=key)
    assert before.get("fep_msgid") == first["fep_msgid"] and before["infcode"] != 0, said(before)  # from the journal
    archived_after_reconciling(world)
    assert not world.journal("msgid IN (?, ?)", (key, first["fep_msgid"]))

    not_settled_again(world, visit.settle(msgid=key), first)


def test_an_empty_monthly_file_beside_the_journal_neither_stops_the_upgrade_unnamed(world: World) -> None:
    """Upgrading from the previous release (schema 7). Beside the journal is an empty journal-2026-10.db: the
    operator's `cp` of a backup copy onto a full disk, or a `touch` while looking for where the files go. That
    release started with it (the archive job makes its tables). This one must start, or refuse naming the
    file. Today the migration opens it for its keys, and fep refuses to start with "no such table: trades",
    which names no file: the operator is left to guess which of the files beside the journal to look at."""
    lib = world.dir / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy(PREVIOUS, lib / "journal.db")
    (lib / "journal-2026-10.db").write_bytes(b"")
    try:
        world.start()
    except Exception as e:  # refused to start: it must say which file
        assert "journal-2026-10.db" in str(e), f"fep did not start, and said: {str(e)[-600:]}"
        return
    assert world.his.call("1101", Visit(world.his, ZHANG).identity_input())["infcode"] == 0



# ---- what held (not covered elsewhere) ----------------------------------------------------------------------------

def test_archived_trades_answer_resends_lookups_and_2601s_by_either_msgid_and_a_deleted_file_is_refused_plainly(
        world: World) -> None:
    """Zhang's settlement (a uuid key; fep reversed it when its answer was lost) and Li's NOT_SENT one are
    archived. Under its key the HIS hears Zhang's settlement (under its fep_msgid, a refusal: it has a key of its
    own, as in the journal), a changed payload is refused, lookups by either
    answer, a 2601 naming it is refused, Li's must go under a new msgid; fep show and fep trades find them. An
    operator then deletes the month's file: every one of those is refused, saying why, and nothing is sent."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    zhang = Visit(world.his, ZHANG)
    zhang.up_to_settlement()
    key = his_key()
    first = reversed_settlement(world, zhang, key)
    li = Visit(world.his, LI)
    li.up_to_settlement()
    never = his_key()
    with world.outage():
        assert li.settle(msgid=never)["fep_state"] == "NOT_SENT"
    archived_after_reconciling(world)
    assert not world.journal("infno = '2207'")
    fep_msgid = first["fep_msgid"]

    for under in (key, fep_msgid):
        again = zhang.settle(msgid=under)
        assert again["infcode"] != 0 and again.get("fep_msgid") in (None, fep_msgid), (under, said(again))
        looked = world.his.lookup(under)
        assert (looked.get("fep_state"), looked.get("fep_msgid")) == ("REVERSED", fep_msgid), (under, looked)
        undo = world.his.call("2601", zhang.reversal_input(under), msgid=his_key())
        assert undo["fep_state"] == "REFUSED" and "archived" in undo["err_msg"], (under, said(undo))
    cash = world.his.call("2207", {"data": zhang.settlement_input()["data"] | {"acct_used_flag": "0"}}, msgid=key)
    assert cash["fep_state"] == "REFUSED" and REUSED in cash["err_msg"], said(cash)
    resent = li.settle(msgid=never)
    assert resent["fep_state"] == "REFUSED" and "new msgid" in resent["err_msg"], said(resent)
    shown = world.cli("show", fep_msgid)
    assert f"archived: read from {month_file(world)}" in shown.stdout, shown.stdout + shown.stderr
    done = world.cli("trades", "--json", "--limit", "1000", "--person", ZHANG["psn_no"])
    assert fep_msgid in done.stdout, done.stdout + done.stderr
    assert not world.journal("infno IN ('2207', '2601')") and [s["state"] for s in world.ledger()] == ["reversed"]

    (world.journal_path.with_name(month_file(world))).unlink()  # the operator's clean-up of "old files"
    for under in (key, fep_msgid):
        again = zhang.settle(msgid=under)
        assert again["fep_state"] == "REFUSED" and "cannot be read" in again["err_msg"], (under, said(again))
        looked = world.his.lookup(under)
        assert looked.get("fep_state") == "REFUSED" and "cannot be read" in looked.get("err_msg", ""), looked
    undo = world.his.call("2601", zhang.reversal_input(key), msgid=his_key())
    assert undo["fep_state"] == "REFUSED" and "cannot be read" in undo["err_msg"], said(undo)
    assert li.settle(msgid=never)["fep_state"] == "REFUSED"
    assert not world.journal("infno IN ('2207', '2601')") and [s["state"] for s in world.ledger()] == ["reversed"]


def test_a_settlement_left_in_both_by_a_crash_in_the_archive_run_is_known_before_and_after_the_next_run(
        world: World) -> None:
    """fep died after the month's file took Zhang's reversed settlement and before the journal let it go. Sent
    again then, it is the journal's; the next run finishes the move, and its keys are kept then: sent again
    after it, it is still that trade, and nothing more is settled."""
    visit, key, first = reversed_under_its_key(world)
    world.stop()
    age(world, AGE)
    copied_before_a_crash(world, month_file(world), first["fep_msgid"])
    world.start()
    for moved in (False, True):
        if moved:
            day = date.fromtimestamp(time.time() - AGE * DAY)
            for d in (day, day + timedelta(days=1)):
                assert world.cli("reconcile", "--date", d.isoformat()).returncode == 0
            assert world.cli("archive").returncode == 0 and not world.journal("infno = '2207'")
        again = visit.settle(msgid=key)
        assert again["infcode"] != 0 and again.get("fep_msgid") == first["fep_msgid"], (moved, said(again))
    assert [s["state"] for s in world.ledger()] == ["reversed"]


def test_a_journal_restored_from_a_backup_made_before_the_archive_run_still_names_the_archived_trades(
        world: World) -> None:
    """The operator takes `fep backup` at night; the archive run then moves Zhang's reversed settlement and the
    day after a disk fault has him restore that backup (the month's file stays where it was). The settlement is
    in both; sent again it is the journal's, the next run moves it again and keeps its keys, and sent again
    after that it is still that trade."""
    visit, key, first = reversed_under_its_key(world)
    reconciled_after(world)
    backup = world.dir / "nightly.db"
    assert world.cli("backup", str(backup)).returncode == 0
    assert world.cli("archive").returncode == 0 and not world.journal("infno = '2207'")
    world.stop()
    for leftover in world.journal_path.parent.glob("journal.db-*"):  # the live journal's -wal and -shm go too
        leftover.unlink()
    shutil.copy(backup, world.journal_path)
    world.start()
    for moved in (False, True):
        if moved:
            assert world.cli("archive").returncode == 0 and not world.journal("infno = '2207'")
        again = visit.settle(msgid=key)
        assert again["infcode"] != 0 and again.get("fep_msgid") == first["fep_msgid"], (moved, said(again))
    assert [s["state"] for s in world.ledger()] == ["reversed"]


def test_a_settlement_archived_under_the_fep_msgid_of_a_trade_still_in_the_journal_is_not_settled_again(
        world: World) -> None:
    """The review's case of the story above: the HIS keyed Zhang's settlement with its 1101's fep_msgid, and the
    archive run moved the settlement but not the 1101 (made later, as a money trade of a day not balanced would
    stay). Sent again under that key it is still the settlement: an HIS msgid names its trade before an equal
    msgid of fep's, wherever each is."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    visit = Visit(world.his, ZHANG)
    key = world.his.call("1101", visit.identity_input())["fep_msgid"]
    visit.register()
    visit.diagnose()
    assert visit.upload_fees()["infcode"] == 0
    first = reversed_settlement(world, visit, key)
    reconciled_after(world)
    world.stop()
    with closing(sqlite3.connect(world.journal_path)) as c, c:  # the 1101 is of today: it stays
        c.execute("UPDATE trades SET created = ?, updated = ? WHERE msgid = ?", (time.time(), time.time(), key))
    world.start()
    assert world.cli("archive").returncode == 0
    assert world.journal("msgid = ?", (key,)) and not world.journal("msgid = ?", (first["fep_msgid"],))
    not_settled_again(world, visit.settle(msgid=key), first)
