"""The journal keeps the same promises on SQLite and on PostgreSQL: each story here runs on both backends
(the `journal_url` fixture), on the bench of tests/rooms.py (a real journal, its writer and readers)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client import REGISTRY

from fep import journal as journal_mod
from fep.journal import Fenced, IllegalTransition, Journal, TradeFilter
from fep.states import State
from tests.rooms import FIXMEDINS, Bench

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
