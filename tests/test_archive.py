"""Years of trades: finished ones older than journal.keep_days move to monthly archive files beside the journal
(on PostgreSQL: to the archive tables of the shared database), where `fep show` and `fep trades` still find them;
what is open, what the bureau holds, and what a reconciliation still needs stay in the journal."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pytest

from fep import archive, leader
from fep.client import Client
from fep.journal import EVER, SCHEMA_VERSION, JournalError, TradeFilter, archivable
from fep.sim.world import (LI, WANG, ZHANG, Visit, World, parked_settlement, reversed_settlement, settled_visit,
                           setl_id, wait_for)
from tests.rooms import Bench
from tests.test_journal_backends import bench  # noqa: F401 (on both backends)

DAY = 86400
AGE = 40  # days the trades are made older than they are; keep_days is 30


def age(world: World, days: int) -> None:
    """As if the trades in the journal were made `days` ago (fep stopped, or on PostgreSQL finished and idle)."""
    statements = [("UPDATE trades SET created = created - ?, updated = updated - ?", (days * DAY, days * DAY)),
                  ("UPDATE events SET at = at - ?", (days * DAY,))]
    if world.journal_url is not None:
        import psycopg

        from fep.dialect import to_postgres

        with psycopg.connect(world.journal_url) as pg:
            for sql, params in statements:
                pg.execute(to_postgres(sql), params)  # type: ignore[arg-type]
        return
    with closing(sqlite3.connect(world.journal_path)) as c, c:
        for sql, params in statements:
            c.execute(sql, params)


def reconciled_after(world: World) -> None:
    """Forty days on (fep stopped meanwhile), the days of what the journal holds reconciled: the archive may move
    their money."""
    world.stop()
    age(world, AGE)
    world.start()
    if world.journal_url is not None:
        wait_for(lambda: world.leading() == "a", what="node a to lead")
    day = date.fromtimestamp(time.time() - AGE * DAY)
    for d in (day, day + timedelta(days=1)):
        done = world.cli("reconcile", "--date", d.isoformat())
        assert done.returncode == 0, done.stdout + done.stderr


def archived_after_reconciling(world: World) -> None:
    """The operator's nightly routine forty days on: the days reconciled, then the archive run."""
    reconciled_after(world)
    done = world.cli("archive")
    assert done.returncode == 0, done.stdout + done.stderr


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
    sign_ins = len(world.journal("infno = '9001'"))
    world.start()
    # today's sign-in is made once fep listens: the journal is read after it, or it would seem to come from nowhere
    wait_for(lambda: len(world.journal("infno = '9001'")) > sign_ins, what="fep to sign in again")
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


def on_node(world: World, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The `fep` admin command, run on node a or b of a pair (World.share_journal)."""
    return subprocess.run([sys.executable, "-m", "fep.cli", *args, "--admin", str(world.admin_socket(node))],
                          capture_output=True, text=True, timeout=60, cwd=world.dir)


def test_on_postgresql_trades_archived_by_the_leader_are_found_by_the_node_that_takes_over(world: World,
                                                                                          pg_url: str) -> None:
    """Two nodes share a PostgreSQL journal. Node a leads and archives last month's finished trades; then it dies
    and node b takes over. The operator on node b still finds every archived trade, and the settlements the bureau
    holds, which never leave, still keep the refund order."""
    world.share_journal(pg_url)
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start_sim()
    world.start_fep()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    world.start_peer()
    world.wait_for_standby("b")
    first, s1 = settled_visit(world, ZHANG)
    second, s2 = settled_visit(world, ZHANG)  # the later settlement: S1 is cancelled after it
    li = Visit(world.his, LI)
    li.up_to_settlement()
    reversed_ = reversed_settlement(world, li)["fep_msgid"]
    age(world, AGE)
    made = time.time() - AGE * DAY
    day = date.fromtimestamp(made)
    for d in (day, day + timedelta(days=1)):
        assert on_node(world, "a", "reconcile", "--date", d.isoformat()).returncode == 0
    before = {r["msgid"]: r for r in world.journal()}

    done = on_node(world, "a", "archive")
    assert done.returncode == 0 and "moved to the archive" in done.stdout, done.stdout + done.stderr
    gone = set(before) - {r["msgid"] for r in world.journal()}
    assert reversed_ in gone and {"1101", "2201", "2204", "2601"} <= {before[m]["infno"] for m in gone}
    assert {s1["fep_msgid"], s2["fep_msgid"]} <= set(before) - gone  # in force at the bureau: they stay

    world.kill_fep()
    wait_for(lambda: world.leading(("b",)) == "b", timeout=15, what="node b to take over")
    query = next(m for m in gone if before[m]["infno"] == "1101")
    show = on_node(world, "b", "show", query)
    assert show.returncode == 0 and "archived: read from" in show.stdout, show.stdout + show.stderr
    assert "accept" in show.stdout and "answer" in show.stdout  # its history came along
    shown = json.loads(on_node(world, "b", "show", reversed_, "--json").stdout)
    assert shown["state"] == "REVERSED" and [t["infno"] for t in shown["resolving_trades"]] == ["2601"]
    listed = on_node(world, "b", "trades", "--json", "--limit", "1000", "--since", day.isoformat(),
                     "--until", day.isoformat())
    assert listed.returncode == 0, listed.stderr
    that_day = {m for m, r in before.items() if date.fromtimestamp(r["created"]) == day}  # not today's 3201s
    assert gone <= that_day and {r["msgid"] for r in json.loads(listed.stdout)} == that_day  # each once

    # The HIS sends Li's reversed settlement again under its msgid: node b knows it from the archive table, and
    # the bureau settles nothing again.
    settlements = len(world.ledger())
    li.his = Client.tcp("127.0.0.1", world.peer.his_port, timeout=60)  # type: ignore[union-attr]
    again = li.settle(msgid=reversed_)
    assert again["infcode"] != 0 and again.get("fep_msgid") in (None, reversed_), again
    assert len(world.ledger()) == settlements and reversed_ not in {r["msgid"] for r in world.journal()}

    # Refund order on node b: S1 waits for the later S2, which stayed in the journal.
    for visit in (first, second):
        visit.his = Client.tcp("127.0.0.1", world.peer.his_port, timeout=60)  # type: ignore[union-attr]
    status, early = first.post("2208", first.cancel_input(setl_id(s1)))
    assert status == 200 and early["fep_reason"] == "conflict", early
    for visit, settled in ((second, s2), (first, s1)):
        cancel = visit.cancel(setl_id(settled))
        assert cancel["infcode"] == 0, cancel


def test_a_trade_changed_while_it_was_moved_stays_in_the_journal_only_and_the_others_are_archived_once(
        bench: Bench) -> None:
    """On both backends (files on SQLite, tables on PostgreSQL): a batch read for the move, then one of its trades
    changes (a reconciliation reopened it) before the batch moves; the move is also run again, as after a crash."""
    kept, moved = (bench.accept("1101", {"psn_no": p}) for p in ("P21", "P22"))
    for row in (kept, moved):
        bench.run(bench.journal.transition(row.msgid, "answer", answer="{}"))
    store = archive.Archive(bench, bench.journal, 0, []).store
    families, _ = bench.run(bench.journal.read(archivable((EVER[0], 0), time.time() + 60, 10)))
    bench.run(bench.journal.run(lambda conn: conn.execute("UPDATE trades SET updated = updated + 1 WHERE msgid = ?",
                                                          (kept.msgid,))))
    for _ in range(2):
        bench.run(store.move(families))
    assert bench.row(kept.msgid) and bench.run(bench.journal.get(moved.msgid)) is None
    assert bench.run(store.get(kept.msgid)) is None  # no copy beside the journal's row
    row, history, _, _ = bench.run(store.get(moved.msgid))
    assert row.msgid == moved.msgid and [event for _, event, _, _ in history] == ["accept", "answer"]
    assert [r.msgid for r in bench.run(store.find(TradeFilter(limit=10)))] == [moved.msgid]
    assert bench.run(bench.journal.count_by_state()) == {"ANSWERED": 1}  # what left no longer counts


def test_a_postgresql_journal_of_schema_7_gets_its_archive_tables_when_fep_starts(tmp_path: Path, pg_url: str) -> None:
    """Upgrading a pair whose journal an earlier release made: the first node to start adds the tables."""
    old = Bench(tmp_path / "unused.db", url=pg_url)
    old.run(old.journal.run(lambda conn: [conn.execute(sql) for sql in (
        "DROP TABLE archived_trades", "DROP TABLE archived_events", "UPDATE meta SET value = '7' WHERE key = 'schema'")]))
    old.close()
    node = Bench(tmp_path / "unused.db", url=pg_url)
    try:
        row = node.accept("1101", {"psn_no": "P23"})
        node.run(node.journal.transition(row.msgid, "answer", answer="{}"))
        families, _ = node.run(node.journal.read(archivable((EVER[0], 0), time.time() + 60, 10)))
        assert len(node.run(archive.Archive(node, node.journal, 0, []).store.move(families))) == 1
        assert node.run(node.journal.read(lambda conn: conn.execute(
            "SELECT value FROM meta WHERE key = 'schema'").fetchone()[0])) == str(SCHEMA_VERSION)
    finally:
        node.close()


def test_monthly_files_an_earlier_release_left_on_a_node_are_taken_into_postgresql_for_both_nodes(
        tmp_path: Path, pg_url: str) -> None:
    """Before the archive tables, the node that led wrote monthly files beside its journal.path (and the README
    said to rsync them to the other). Node a's archive run (as its start does) takes them into the shared tables,
    where node b reads them; the file is kept under another name. Node b's rsynced copy adds nothing twice. A
    damaged file is logged by the run and refused by a start, named."""
    earlier = Bench(tmp_path / "sqlite" / "journal.db")  # a monthly file as an earlier release wrote it
    try:
        old = earlier.accept("1101", {"psn_no": "P24"})
        earlier.run(earlier.journal.transition(old.msgid, "answer", answer="{}"))
        families, _ = earlier.run(earlier.journal.read(archivable((EVER[0], 0), time.time() + 60, 10)))
        earlier.run(archive.MonthlyFiles(earlier, earlier.journal).move(families))
    finally:
        earlier.close()
    month_file = next((tmp_path / "sqlite").glob("journal-*.db"))
    nodes = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / month_file.name).write_bytes(month_file.read_bytes())
        nodes[name] = Bench(tmp_path / name / "journal.db", url=pg_url)
    lease = psycopg.connect(pg_url, autocommit=True)  # node a leads, as the only node that archives does
    lease.execute("SELECT pg_advisory_lock(%s)", (leader.LOCK_KEY,))
    try:
        a, b = (archive.Archive(n, n.journal, 30, []) for n in nodes.values())
        one = nodes["a"].accept("1101", {"psn_no": "P25"})  # the new journal's first trade: number 1 too
        (tmp_path / "a" / "journal-2020-01.db").write_bytes(b"not a database")  # a damaged one stays as it is
        done = nodes["a"].run(a.run())
        assert done["taken_in"] == [month_file.name] and (tmp_path / "a" / "journal-2020-01.db").exists()
        assert any("could not be taken into archived_trades" in f for f in nodes["a"].failures)
        assert not (tmp_path / "a" / month_file.name).exists()
        assert (tmp_path / "a" / f"{month_file.name}.in-postgresql").exists()
        with pytest.raises(JournalError, match="journal-2020-01.db"):  # as a start takes them in: refused, named
            nodes["a"].run(a.take_in(strict=True))
        shutil.rmtree(tmp_path / "b")  # node b reads the tables, not its copy
        (tmp_path / "b").mkdir()
        row, history, _, where = nodes["b"].run(b.get(old.msgid))
        assert where == "archived_trades" and [event for _, event, _, _ in history] == ["accept", "answer"]
        assert row.id != one.id  # numbered anew: no clash with the journal's own
        (tmp_path / "b" / month_file.name).write_bytes(month_file.read_bytes())
        assert nodes["b"].run(b.run())["taken_in"] == [month_file.name]
        assert len(nodes["b"].run(b.find(TradeFilter(psn_no="P24")))) == 1
        assert len(nodes["b"].run(b.get(old.msgid))[1]) == 2  # its history, not twice
    finally:
        lease.close()
        for n in nodes.values():
            n.close()
