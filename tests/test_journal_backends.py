"""The journal keeps the same promises on SQLite and on PostgreSQL: each story here runs on both backends
(the `journal_url` fixture), on the bench of tests/rooms.py (a real journal, its writer and readers)."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from prometheus_client import REGISTRY
from twisted.internet import defer

from fep import catalogs, codebook, journal_pg
from fep import journal as journal_mod
from fep.codebook import Call, CodeBook
from fep.journal import Fenced, IllegalTransition, Journal, TradeFilter
from fep.sim.ledger import FileAnswer, Ledger
from fep.sim.server import load_config
from fep.states import State
from fep.trades import InvalidInput, TradeBook
from tests.rooms import FIXMEDINS, Bench

CONF = Path(__file__).resolve().parents[1] / "conf"

S = State


@pytest.fixture
def bench(tmp_path: Path, journal_url: str | None) -> Iterator[Bench]:
    b = Bench(tmp_path / "journal.db", url=journal_url)
    try:
        yield b
    finally:
        b.close()


def reopened(bench: Bench, tmp_path: Path, journal_url: str | None) -> Bench:
    """The journal closed and opened again, as across a restart of fep."""
    bench.close()
    return Bench(tmp_path / "journal.db", url=journal_url)


def test_a_trade_is_numbered_journalled_and_still_there_after_a_restart_and_numbers_go_on(
        bench: Bench, tmp_path: Path, journal_url: str | None) -> None:
    first = bench.accept("1101", {"psn_no": "P1"})
    answered = bench.run(bench.journal.transition(first.msgid, "answer", answer='{"infcode": 0}'))
    assert answered.state is S.ANSWERED
    again = reopened(bench, tmp_path, journal_url)
    try:
        assert again.row(first.msgid).answer == '{"infcode": 0}'
        assert again.events(first.msgid) == ["accept", "answer"]
        second = again.accept("1101", {"psn_no": "P1"})
        assert second.msgid > first.msgid and second.msgid.startswith(FIXMEDINS)
    finally:
        again.close()


def test_the_his_sending_a_trade_again_finds_the_first_submission_and_nothing_new_is_journalled(
        bench: Bench) -> None:
    first = bench.accept("2207", {"psn_no": "P2"}, his_msgid="his-key-1")
    env = {"infno": "2207", "input": {"data": {"psn_no": "P2"}}}
    again = bench.run(bench.journal.accept(journal_mod.NewTrade("2207", None, "P2", S.SENT, "other", env,
                                                                his_msgid="his-key-1")))
    assert not again.created and again.row.msgid == first.msgid
    assert bench.run(bench.journal.for_his("his-key-1")).msgid == first.msgid
    assert bench.run(bench.journal.count_by_state()) == {"SENT": 1}


def test_reads_taken_together_each_hear_their_own_answer_and_a_failed_one_spoils_none_after_it(
        bench: Bench) -> None:
    """The view reader (one thread) is held on a first read while two more are asked for: it takes both at
    once, in one transaction, and the failure of the first of them (which ends a PostgreSQL transaction)
    does not reach the second."""
    row = bench.accept("1101", {"psn_no": "P4"})
    gate = threading.Event()
    held = bench.journal.read(lambda conn: gate.wait(30))
    broken = bench.journal.read(lambda conn: conn.execute("SELECT x FROM no_such_table").fetchall())
    after = bench.journal.read(lambda conn: journal_mod._get(conn, row.msgid))
    gate.set()
    assert bench.run(held) is True
    with pytest.raises(Exception, match="no_such_table"):
        bench.run(broken)
    assert bench.run(after).msgid == row.msgid


def test_a_move_the_state_does_not_allow_is_refused_naming_the_state_and_changes_nothing(bench: Bench) -> None:
    row = bench.accept("1101", {"psn_no": "P3"})
    bench.run(bench.journal.transition(row.msgid, "answer", answer="{}"))
    with pytest.raises(IllegalTransition, match="ANSWERED"):
        bench.run(bench.journal.transition(row.msgid, "lost", note="too late"))
    assert bench.events(row.msgid) == ["accept", "answer"]


def test_trades_that_move_together_move_together_or_not_at_all(bench: Bench) -> None:
    a, b = bench.accept("2204", {"psn_no": "P4"}), bench.accept("2204", {"psn_no": "P4"})
    bench.run(bench.journal.transition(b.msgid, "answer", answer="{}"))
    with pytest.raises(IllegalTransition):
        bench.run(bench.journal.transitions((a.msgid, "lost", "x", {}), (b.msgid, "lost", "x", {})))
    assert bench.row(a.msgid).state is S.SENT  # the first move was undone with the second
    rows = bench.run(bench.journal.transitions((a.msgid, "lost", "x", {"attempts": 1})))
    assert rows[0].state is S.UNKNOWN and rows[0].attempts == 1


def test_trades_arriving_together_share_commits(bench: Bench) -> None:
    def batches() -> float:
        return REGISTRY.get_sample_value("fep_journal_batch_size_count") or 0.0

    before = batches()
    env = {"infno": "1101", "input": {"data": {}}}
    pending = [bench.journal.accept(journal_mod.NewTrade("1101", None, f"P{i}", S.SENT, "h", dict(env)))
               for i in range(200)]
    for d in pending:
        assert bench.run(d).created
    assert batches() - before < 200
    assert bench.run(bench.journal.count_by_state()) == {"SENT": 200}


def test_long_requests_and_answers_come_back_byte_for_byte(bench: Bench) -> None:
    long_answer = '{"output": {"feedetail": [' + ", ".join(f'{{"n": {i}, "名称": "药品"}}' for i in range(500)) + "]}}"
    row = bench.accept("2204", {"psn_no": "P5", "items": ["x" * 40] * 200})
    bench.run(bench.journal.transition(row.msgid, "answer", answer=long_answer))
    again = bench.row(row.msgid)
    assert again.answer == long_answer and again.request == row.request


def test_a_restart_picks_up_every_open_trade_and_the_views_find_them(bench: Bench) -> None:
    sent = bench.accept("2207", {"psn_no": "P6"})
    queued = bench.accept("2204", {"psn_no": "P6"}, state=S.QUEUED)
    done = bench.accept("1101", {"psn_no": "P7"})
    bench.run(bench.journal.transition(done.msgid, "answer", answer="{}"))
    parked = bench.accept("2207", {"psn_no": "P8"})
    bench.run(bench.journal.transition(parked.msgid, "give_up", note="a person decides"))
    settled = bench.accept("2207", {"psn_no": "P9"})
    bench.run(bench.journal.transition(settled.msgid, "answer", answer="{}", setl_id="S9"))

    assert [r.msgid for r in bench.run(bench.journal.to_recover())] == [sent.msgid, queued.msgid, parked.msgid]
    assert [r.msgid for r in bench.run(bench.journal.parked())] == [parked.msgid]
    assert [r.msgid for r in bench.run(bench.journal.settlements_of("P9", ["2207"]))] == [settled.msgid]
    assert [r.msgid for r in bench.run(bench.journal.pending_money_of("P6", ["2207"]))] == [sent.msgid]
    assert [r.msgid for r in bench.run(bench.journal.settled_between(0, time.time() + 1))] == [settled.msgid]
    assert [r.msgid for r in bench.run(bench.journal.find(TradeFilter(psn_no="P6")))] == [sent.msgid, queued.msgid]
    assert [r.msgid for r in bench.run(bench.journal.find(TradeFilter(state=S.ANSWERED)))] == [done.msgid,
                                                                                                settled.msgid]
    assert bench.run(bench.journal.oldest([S.SENT, S.QUEUED])) == sent.created
    assert bench.run(bench.journal.count_by_state()) == {"SENT": 1, "QUEUED": 1, "ANSWERED": 2,
                                                         "NEEDS_ATTENTION": 1}


def test_a_resolving_trade_is_journalled_with_its_originals_move_in_one_write(bench: Bench) -> None:
    original = bench.accept("2207", {"psn_no": "P10"})
    bench.run(bench.journal.transition(original.msgid, "lost", note="no answer"))
    env = {"infno": "2601", "input": {"data": {"omsgid": original.msgid}}}
    moved, child = bench.run(bench.journal.resolve_with(
        original.msgid, journal_mod.NewTrade("2601", None, "P10", S.SENT, "h", env, related=original.msgid),
        "reversing"))
    assert moved.state is S.RESOLVING and moved.resolver == child.msgid
    assert [r.msgid for r in bench.run(bench.journal.resolving_trades(original.msgid))] == [child.msgid]


def test_what_operators_did_and_the_month_end_clearing_are_kept_alike(bench: Bench) -> None:
    entry = bench.run(bench.journal.run(journal_mod.audit_begin(0, "drop", {"msgid": "M1"})))
    bench.run(bench.journal.run(journal_mod.audit_end(entry, "dropped")))
    [audited] = bench.run(bench.journal.read(journal_mod.audit_between(0, time.time() + 1, 10)))
    assert audited[3:6] == ("drop", '{"msgid":"M1"}', "dropped")

    group = ("310", "H1", "11")
    totals = {"settlements": 2, "medfee": "10.00", "fund": "8.00", "acct": "1.00", "cash": "1.00"}
    bench.run(bench.journal.run(journal_mod.clearing_applied("2026-11", group, totals, "E1", "finance")))
    row = bench.run(bench.journal.run(journal_mod.clearing_paid("2026-11", group, "8.00", "bank notice", "li")))
    assert (row["state"], row["paid"], row["clr_appy_evt_id"]) == ("applied", "8.00", "E1")
    assert [e["event"] for e in bench.run(bench.journal.read(journal_mod.clearing_history("2026-11")))] == [
        "applied", "paid"]

    identified = bench.accept("1101", {"psn_no": "P11"})
    bench.run(bench.journal.run(journal_mod.answer_with_place(identified.msgid, {"answer": "{}"}, "P11", "220100")))
    assert bench.run(bench.journal.read(journal_mod.insured_place("P11"))) == "220100"


def known_keys(bench: Bench) -> None:
    """The journal's keys read into its filter, as the daemon has them read at start."""
    bench.journal.know_keys()
    deadline = time.monotonic() + 10
    while bench.journal.keys.may_hold("a key nobody journalled"):
        assert time.monotonic() < deadline, "the journal's keys were not read within 10 s"
        time.sleep(0.01)


def archived(bench: Bench, his_msgid: str) -> journal_mod.TradeRow:
    """A trade under `his_msgid`, answered and moved to the archive as fep.archive moves trades."""
    row = bench.accept("1101", {"psn_no": "P13"}, his_msgid=his_msgid)
    bench.run(bench.journal.transition(row.msgid, "answer", answer="{}"))
    families, _ = bench.run(bench.journal.read(journal_mod.archivable((-1.0, 0), time.time() + 60, 10)))
    move = journal_mod.archive_in_tables if bench.journal.url else journal_mod.forget
    bench.run(bench.journal.run(move(families)))
    return row


def test_every_key_journalled_or_archived_is_known_to_the_filter_that_spares_new_keys_their_lookup(
        bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "KEYS_SLICE", 2)  # read a slice at a time, as a big journal is
    archived_row = archived(bench, "his-archived-1")
    archived(bench, "his-archived-3")
    held = bench.accept("2207", {"psn_no": "P13"}, his_msgid="his-held-1")
    known_keys(bench)
    later = bench.accept("2207", {"psn_no": "P13"}, his_msgid="his-later-1")
    every = ("his-archived-1", archived_row.msgid, "his-held-1", held.msgid, "his-later-1", later.msgid)
    assert [k for k in every if not bench.journal.keys.may_hold(k)] == []


def test_a_new_trade_whose_key_was_not_looked_up_but_is_archived_is_not_journalled(bench: Bench) -> None:
    """Keys can enter the archive behind the filter (another node's start takes old month files in): the accept
    of a key the engine did not look up searches the archive, and journals nothing when it is there."""
    archived(bench, "his-archived-2")
    env = {"infno": "2207", "input": {"data": {"psn_no": "P13"}}}
    new = journal_mod.NewTrade("2207", None, "P13", S.SENT, "h", env, his_msgid="his-archived-2", looked_up=False)
    with pytest.raises(journal_mod.KeyInArchive):
        bench.run(bench.journal.accept(new))
    assert bench.run(bench.journal.count_by_state()) == {}


def test_finished_trades_leave_for_the_archive_with_their_history(bench: Bench) -> None:
    row = bench.accept("1101", {"psn_no": "P12"})
    bench.run(bench.journal.transition(row.msgid, "answer", answer="{}"))
    families, _ = bench.run(bench.journal.read(journal_mod.archivable((-1.0, 0), time.time() + 60, 10)))
    assert [f.head.msgid for f in families] == [row.msgid] and len(families[0].events) == 2
    gone = bench.run(bench.journal.run(journal_mod.forget(families)))
    assert len(gone) == 1 and bench.run(bench.journal.get(row.msgid)) is None
    assert bench.run(bench.journal.count_by_state()) == {}


@pytest.fixture
def shared(tmp_path: Path, pg_url: str) -> Iterator[Bench]:
    """A node's journal on PostgreSQL, the one backend nodes share."""
    b = Bench(tmp_path / "unused.db", url=pg_url)
    try:
        yield b
    finally:
        b.close()


def lead(node: Bench, epoch: int) -> None:
    """The node won the lease under `epoch` (what fep.leader does, the lock aside)."""
    node.run(node.journal.run(lambda conn: conn.execute("UPDATE leader SET epoch = ?, node = 'a'", (epoch,))))
    node.run(node.journal.lead(epoch))


def test_on_a_shared_journal_a_node_whose_epoch_ended_can_move_nothing_to_sent(shared: Bench) -> None:
    lead(shared, 1)
    sent = shared.accept("2207", {"psn_no": "P13"})
    shared.run(shared.journal.transition(sent.msgid, "lost", note="no answer"))
    # Another node takes over: the epoch moves on, whether or not this node has noticed.
    shared.run(shared.journal.run(lambda conn: conn.execute("UPDATE leader SET epoch = 2, node = 'b'")))
    with pytest.raises(Fenced, match="epoch 1"):
        shared.run(shared.journal.transition(sent.msgid, "resend", note="again"))
    with pytest.raises(Fenced):
        shared.accept("2207", {"psn_no": "P14"})
    assert shared.row(sent.msgid).state is S.UNKNOWN
    assert shared.run(shared.journal.count_by_state()) == {"UNKNOWN": 1}
    lead(shared, 3)
    assert shared.run(shared.journal.transition(sent.msgid, "resend", note="again")).state is S.SENT


def test_a_commit_whose_answer_was_lost_is_found_done_even_after_the_other_node_committed(
        shared: Bench, pg_url: str) -> None:
    """A writer that lost its commit's answer asks, on a new session, whether its token is there. The other
    node (a standby writing an audit row) committed in between: that must not make the first writer's commit
    look undone, or its batch would be written again."""
    def commit(conn: journal_pg.PgConnection, key: str) -> None:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO meta VALUES (?, 'x') ON CONFLICT (key) DO NOTHING", (key,))
        conn.execute("COMMIT")

    a, b = (journal_pg.PgConnection(pg_url, reader=False) for _ in "ab")
    try:
        commit(a, "a-wrote")
        (token_a,) = a._pg.execute("SELECT value FROM meta WHERE key = %s", (a._token_key,)).fetchone()  # type: ignore
        commit(b, "b-wrote")
        assert a._committed(token_a)
    finally:
        a.close()
        b.close()
    left = shared.run(shared.journal.read(lambda conn: conn.execute(
        "SELECT count(*) FROM meta WHERE key IN (?, ?)", (a._token_key, b._token_key)).fetchone()[0]))
    assert left == 0  # a writer closing takes its key with it


def test_a_full_database_disk_is_named_as_such_not_as_an_unreachable_database() -> None:
    """PostgreSQL's disk-full error is an OperationalError too: the operator is told the disk is full."""
    assert journal_pg.write_failure(psycopg.errors.DiskFull("could not extend file")) == "disk full"
    assert journal_pg.write_failure(psycopg.errors.AdminShutdown("terminating")) == "database unreachable"
    assert journal_pg.write_failure(psycopg.errors.ReadOnlySqlTransaction("read-only")) == "read-only"


def test_a_postgresql_journal_is_named_without_its_password() -> None:
    j = Journal(Path("unused.db"), FIXMEDINS, url="postgresql://fep:secret@127.0.0.1:5433/fep")
    assert j.where == "postgresql://fep@127.0.0.1:5433/fep"


def test_postgresql_restarted_between_trades_the_next_trade_and_lookup_go_through(shared: Bench, postgres: Any) -> None:
    first = shared.accept("1101", {"psn_no": "P15"})
    postgres.restart()  # every session ends, as in a crash of the server; it recovers from its WAL
    second = shared.accept("1101", {"psn_no": "P15"})
    assert second.msgid > first.msgid
    assert [r.msgid for r in shared.run(shared.journal.find(TradeFilter(psn_no="P15")))] == [first.msgid,
                                                                                              second.msgid]
    assert shared.journal.cannot_write is None


def simulated_bureau(tmp_path: Path) -> Call:
    """The simulator's bureau in-process (its ledger, conf/sim.yaml's catalog and diagnoses): what the bureau
    link answers, a 9102 file as the link hands it on."""
    sim = load_config(CONF / "sim.yaml")
    ledger = Ledger(tmp_path / "sim" / "ledger.db", [], sim.catalog, sim.admdvs, sim.clr_optins,
                    diagnoses=sim.diagnoses)

    async def call(infno: str, input_: dict[str, Any]) -> dict[str, Any]:
        out = ledger.handlers[infno]({"infno": infno}, input_)
        if isinstance(out, FileAnswer):
            return {"file": {"filename": out.filename, "content_base64": base64.b64encode(out.content).decode()}}
        return out

    return call


def test_the_code_book_is_kept_in_the_journal_and_judges_fee_lines_and_diagnoses_after_a_restart(
        bench: Bench, tmp_path: Path, journal_url: str | None) -> None:
    codes = CodeBook(bench.journal, bench)  # type: ignore[arg-type]
    bench.run(codes.open())
    synced = bench.run(codes.sync(simulated_bureau(tmp_path)))
    assert synced["downloads"]["1301"] == {"from_version": "v0000", "rows": 5, "to_version": "3"}
    assert synced["failed"] == [] and synced["downloads"]["1312"]["rows"] > 0
    imported = bench.run(codes.import_mapping("hosp_code,national_code,hosp_name\n"
                                              "H-AMOX,XA01AAA001A001010100001,阿莫西林\n"
                                              "H-COLD,XC03CCC003C003030300003,感冒灵\n"))
    assert imported["imported"] == 2 and [p["hosp_code"] for p in imported["problems"]] == ["H-COLD"]

    again = reopened(bench, tmp_path, journal_url)  # another node on the journal reads the same code book
    try:
        book = CodeBook(again.journal, again)  # type: ignore[arg-type]
        again.run(book.open())
        assert again.run(book.sync(simulated_bureau(tmp_path)))["downloads"]["1301"]["from_version"] == "3"
        trades = TradeBook.load(CONF / "trades.yaml")
        fees = {"feedetail": [{"feedetl_sn": "1", "medins_list_codg": "H-AMOX"}]}
        assert book.map_fees(trades.get("2204"), fees)  # it filled a code: the HIS's own bytes no longer fit
        assert fees["feedetail"][0]["med_list_codg"] == "XA01AAA001A001010100001"
        assert not book.map_fees(trades.get("2204"), fees)  # national codes already: nothing changed
        with pytest.raises(InvalidInput, match="H-COLD.*retired since catalog version 3"):
            book.map_fees(trades.get("2204"), {"feedetail": [{"feedetl_sn": "2", "medins_list_codg": "H-COLD"}]})
        with pytest.raises(InvalidInput, match="J11.100 .流行性感冒.: retired in catalog 1307"):
            book.check_diagnoses(trades.get("2203"), {"diseinfo": [
                {"diag_type": "1", "diag_code": "J11.100", "diag_time": "2026-11-23 09:10:00"}]})
        book.check_diagnoses(trades.get("2203"), {"diseinfo": [
            {"diag_type": "1", "diag_code": "J06.900", "diag_time": "2026-11-23 09:10:00"}]})
    finally:
        again.close()


def test_a_node_starting_while_another_creates_the_code_book_waits_for_it_and_uses_its_tables(
        shared: Bench, pg_url: str) -> None:
    """Node b waits on the schema lock while node a creates the tables, then finds them there."""
    first = journal_pg.PgConnection(pg_url, reader=False)  # node a, half-way through creating the code book
    try:
        first.execute("BEGIN")
        codebook._schema(first, shared=True)  # type: ignore[arg-type]
        opening = defer.ensureDeferred(CodeBook(shared.journal, shared).open())  # type: ignore[arg-type]
        time.sleep(1.0)  # node b's writer meets node a's uncommitted tables
        assert not opening.called
        first.execute("COMMIT")
        shared.run(opening)
    finally:
        first.close()


def test_a_catalog_table_of_an_older_layout_gains_the_new_columns_and_keeps_its_rows(bench: Bench) -> None:
    """A bureau's newer specification adds columns (V1.1.23 added 生效时间 and 失效时间 to 1302)."""
    layout = catalogs.LAYOUTS["1302"]
    older = ", ".join(f'"{c}" TEXT' for c in layout.fields[:-2])
    bench.run(bench.journal.run(lambda conn: conn.execute(
        f'CREATE TABLE {layout.table} ({older}, PRIMARY KEY ("{layout.code}", "{catalogs.VERSION}"))')))
    bench.run(bench.journal.run(lambda conn: conn.execute(
        f'INSERT INTO {layout.table} ("{layout.code}", "{layout.name}", "{catalogs.VERSION}", "{catalogs.VALID}") '
        f"VALUES ('T001', '黄芪', '1', '1')")))
    codes = CodeBook(bench.journal, bench)  # type: ignore[arg-type]
    bench.run(codes.open())
    assert codes.national["T001"].name == "黄芪"
    row = {f: None for f in layout.fields} | {layout.code: "T001", layout.name: "黄芪", catalogs.VERSION: "2",
                                              catalogs.VALID: "1", "生效时间": "2026-01-01 00:00:00"}
    bench.run(codes._store(layout.table, [row], layout.fields, (layout.code, catalogs.VERSION)))
    assert bench.run(bench.journal.read(lambda conn: conn.execute(
        f'SELECT "生效时间" FROM {layout.table} WHERE "{catalogs.VERSION}" = ?', ("2",)).fetchall())) == [
        ("2026-01-01 00:00:00",)]
