"""A year of journal costs nothing: every query the journal offers reads from an index, on a journal of
realistic shape (copies of real trades over many days and persons, nearly all final), and none of them
does more work when the journal holds more history.

Two journals are built from the same real trades (fep.sim.year, recorded once through fep and the
simulator): `small`, the last 30 days; `big`, the same 30 days behind two years of other persons'
history (three times the rows). The same open trades, runs and questions go to both:
- EXPLAIN QUERY PLAN of every statement they run (reads exactly as issued, writes as traced) has no
  SCAN of trades or events, nor of an index of theirs;
- each read statement's work (SQLite virtual-machine steps, not time) on `big` is that on `small`,
  give or take a little: nothing walks the history it is not asked about.
"""

from __future__ import annotations

import inspect
import queue
import re
import sqlite3
from datetime import date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

import fep.journal as journal_mod
from fep import codebook, envelope
from fep.journal import Journal, NewTrade, TradeFilter
from fep.sim import year
from fep.sim.chaos import persons
from fep.sim.world import World
from fep.states import State as S
from fep.states import UNRESOLVED

# What the journal offers that writes (or opens and closes); everything else public is a read, and every
# read must be asked below.
WRITES = {"open", "close", "accept", "transition", "transitions", "resolve_with", "store_late_answer", "save_run",
          "run", "ping", "lead"}
# Reads the whole journal by design, once at start, a slice at a time along a primary key (checked below)
AT_START = {"know_keys"}
RECENT_DAYS, RECENT_ROWS, HISTORY_DAYS, HISTORY_ROWS = 30, 20_000, 700, 40_000
END = date.today()
RECENT_START = datetime.combine(END - timedelta(days=RECENT_DAYS), datetime.min.time()).timestamp()
SCAN = re.compile(r"\bSCAN (trades|events)\b")
# A row read for an answer costs 30-60 steps, finding where to start a few hundred: a read may take this
# much, whatever the journal holds (reading the 20,000 rows of the small journal takes ten times more).
STEPS_PER_ROW, STEPS_FIXED = 200, 1000


class Pump:
    """The reactor, as far as the journal needs one: what its threads hand over runs on the test's thread."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        from twisted.python.threadpool import ThreadPool

        self.pool = ThreadPool(1, 1)
        self.pool.start()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:  # noqa: N802 (Twisted's name)
        self.calls.put((f, args))

    def getThreadPool(self) -> Any:  # noqa: N802
        return self.pool

    def wait(self, d: defer.Deferred[Any] | Any, timeout: float = 60) -> Any:
        d = defer.ensureDeferred(d) if not isinstance(d, defer.Deferred) else d
        box: list[Any] = []
        d.addBoth(box.append)
        while not box:
            f, args = self.calls.get(timeout=timeout)
            f(*args)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> list[year.Script]:
    """Real trades: each script run once through fep and the simulator, read back from fep's journal."""
    world = World(tmp_path_factory.mktemp("record"), pki_dir)
    people = persons(4)
    world.configure(sim={"persons": people})
    try:
        world.start()
        recorded = year.record(world, people)
    finally:
        world.stop()
    return year.harvest(world.dir / "lib" / "journal.db", recorded)


@pytest.fixture(scope="module")
def journals(tmp_path_factory: pytest.TempPathFactory, scripts: list[year.Script]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("journals")
    recent = year.Plan(rows=RECENT_ROWS, days=RECENT_DAYS, end=END, persons=3_000)
    history = year.Plan(rows=HISTORY_ROWS, days=HISTORY_DAYS, end=END - timedelta(days=RECENT_DAYS), persons=10_000,
                        person_base=100_000, parked=0, seed=2)
    year.build(d / "small.db", scripts, recent)
    year.build(d / "big.db", scripts, history)
    year.build(d / "big.db", scripts, recent, append=True)
    return {"small": d / "small.db", "big": d / "big.db"}


class Recorder:
    """(label, sql, params) of every statement: reads as the journal issues them (params), and everything
    as SQLite traces it (params None: the values are in the text)."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, str, tuple[Any, ...] | None]] = []
        self.label = "setup"
        self.on_writer: list[tuple[str, str]] = []  # (label, sql) of what the writer thread ran


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    fetch, connect, reader = journal_mod._fetch, Journal._connect, Journal._reader

    def traced(conn: sqlite3.Connection, writer: bool = False) -> sqlite3.Connection:
        def trace(sql: str) -> None:
            rec.statements.append((rec.label, sql, None))
            if writer:
                rec.on_writer.append((rec.label, sql))

        conn.set_trace_callback(trace)
        return conn

    def recording_fetch(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        rec.statements.append((rec.label, sql, tuple(params)))
        return fetch(conn, sql, params)

    monkeypatch.setattr(journal_mod, "_fetch", recording_fetch)
    monkeypatch.setattr(Journal, "_connect", lambda self: traced(connect(self), writer=True))
    monkeypatch.setattr(Journal, "_reader", lambda self: traced(reader(self)))
    return rec


def _open_trades(pump: Pump, j: Journal, psn: str) -> dict[str, str]:
    """The same open trades in both journals: one in each state recovery reads, and runs of both kinds."""
    n = iter(range(1, 100))

    def new(infno: str, state: S, related: str | None = None, data: dict[str, Any] | None = None) -> str:
        env = {"infno": infno, "input": {"data": data or {"psn_no": psn}}}
        msgid = f"H43010000099{END:%Y%m%d}0{next(n):05d}0"
        return pump.wait(j.accept(NewTrade(infno, msgid, psn, state, envelope.payload_hash(env), env,
                                           related=related))).row.msgid

    def child(original: str) -> NewTrade:
        env = {"infno": "2601", "input": {"data": {"psn_no": psn, "omsgid": original, "oinfno": "2207"}}}
        return NewTrade("2601", None, psn, S.SENT, envelope.payload_hash(env), env, related=original)

    out = {"queued": new("2204", S.QUEUED), "sent": new("2207", S.SENT)}
    out["unknown"] = new("2207", S.SENT)
    pump.wait(j.transition(out["unknown"], "lost", note="no answer", attempts=1))
    out["resolving"] = new("2207", S.SENT)
    pump.wait(j.transition(out["resolving"], "lost", note="no answer", attempts=1))
    pump.wait(j.resolve_with(out["resolving"], child(out["resolving"]), "outcome unknown"))
    answer = envelope.dumps({"infcode": 0, "output": {"setlinfo": {"setl_id": "S1", "setl_time": f"{END} 10:00:00",
                                                                   "psn_no": psn, "medfee_sumamt": "1.00"}}}).decode()
    out["awaiting"] = new("2207", S.SENT)
    pump.wait(j.transition(out["awaiting"], "answer_held", answer=answer, setl_id="S1", deadline=1e12))
    out["revoking"] = new("2207", S.SENT)
    pump.wait(j.transition(out["revoking"], "answer", answer=answer.replace("S1", "S2"), setl_id="S2"))
    pump.wait(j.resolve_with(out["revoking"], child(out["revoking"]), "asked for", event="revoke"))
    pump.wait(j.store_late_answer(out["sent"], answer))
    for k in range(5):
        pump.wait(j.save_run("reconcile", (END - timedelta(days=5 - k)).isoformat(), {"n": k}))
        pump.wait(j.save_run("catalog", "sync", {"n": k}))
    pump.wait(j.run(partial(codebook._schema, shared=False)))
    return out


def _subjects(small: sqlite3.Connection) -> tuple[str, str, str]:
    """A recent settlement, a recent reversed one, and the person of the first."""
    def one(sql: str) -> Any:
        return small.execute(sql).fetchone()[0]

    msgid = one("SELECT msgid FROM trades WHERE infno='2207' AND state='ANSWERED' ORDER BY id DESC LIMIT 1 OFFSET 50")
    return msgid, one("SELECT msgid FROM trades WHERE state='REVERSED' ORDER BY id DESC LIMIT 1"), \
        one(f"SELECT psn_no FROM trades WHERE msgid='{msgid}'")


def _questions(msgid: str, reversed_: str, psn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every read the journal offers, with arguments about the recent part (the same in both journals)."""
    day = datetime.combine(END - timedelta(days=3), datetime.min.time()).timestamp()
    recent = RECENT_START + 86400
    return {
        "get": [(msgid,), ("H43010000001999912310000000000",)],
        "to_recover": [()],
        "parked": [()],
        "oldest": [({S.QUEUED},), (UNRESOLVED,), ({S.NEEDS_ATTENTION},)],
        "settlements_of": [(psn, ("2207", "2208", "2304", "2305"))],
        "pending_money_of": [(psn, ("2207", "2208", "2304", "2305"))],
        "for_his": [(msgid,), ("H43010000001999912310000000000",), ("A0B1C2D3E4F5A6B7C8D9E0F1A2B3C4",)],
        "settled_between": [(day - 86400, day + 2 * 86400)],
        "unresolved_between": [(day - 3600, day + 86400)],
        "resolving_trades": [(reversed_,), (msgid,)],
        "find": [(TradeFilter(),), (TradeFilter(state=S.RESOLVING),), (TradeFilter(state=S.NEEDS_ATTENTION),),
                 (TradeFilter(state=S.ANSWERED),), (TradeFilter(state=S.REVERSED, since=recent),),
                 (TradeFilter(state=S.NOT_SENT, since=recent, until=day),), (TradeFilter(psn_no=psn),),
                 (TradeFilter(psn_no=psn, state=S.ANSWERED, infno="2207"),), (TradeFilter(infno="2207"),),
                 (TradeFilter(infno="9001", since=recent),),
                 (TradeFilter(infno="2207", state=S.NOT_SENT, since=recent),),
                 (TradeFilter(since=day, until=day + 86400),), (TradeFilter(since=recent, limit=10),),
                 (TradeFilter(state=S.ANSWERED, since=day, until=day + 3600),)],
        "history": [(msgid,), (reversed_,)],
        "runs": [("reconcile",), ("reconcile", (END - timedelta(days=3)).isoformat()), ("catalog", "sync", 3)],
        "read": [(codebook._load,), (journal_mod.latest_runs("reconcile", (END - timedelta(days=31)).isoformat(),
                                                           END.isoformat()),),
                 (journal_mod.trade_counts(day + 10 * 3600, day + 11 * 3600),),
                 (journal_mod.answered_outcomes(day + 10 * 3600, day + 11 * 3600),)],
        "count_by_state": [()],
    }


def _into_history() -> dict[str, list[tuple[Any, ...]]]:
    """Questions whose answers reach into the history (so differ between the journals): rare states and
    trade numbers of all time, days long past."""
    old = datetime.combine(END - timedelta(days=RECENT_DAYS + 200), datetime.min.time()).timestamp()
    return {
        "find": [(TradeFilter(state=s),) for s in (S.REVERSED, S.NOT_SENT, S.NOT_NEEDED, S.DROPPED)]
        + [(TradeFilter(infno="9001"),), (TradeFilter(infno="2208"),), (TradeFilter(since=old, until=old + 86400),),
           (TradeFilter(state=S.REVERSED, since=old, until=old + 30 * 86400),)],
        "settled_between": [(old, old + 86400)],
        "unresolved_between": [(old, old + 86400)],
    }


def _ask(path: Path, rec: Recorder) -> dict[str, Any]:
    """Open the journal as fep does, add the open trades, ask every question; the answers, by question."""
    pump = Pump()
    j = Journal(path, "H43010000001")
    try:
        rec.label = "setup"
        pump.wait(j.open(pump))
        with sqlite3.connect(path) as c:
            msgid, reversed_, psn = _subjects(c)
        _open_trades(pump, j, psn)
        answers = {}
        for tag, questions in (("", _questions(msgid, reversed_, psn)), ("history ", _into_history())):
            for name, calls in questions.items():
                for k, args in enumerate(calls):
                    rec.label = f"{tag}{name}#{k}"
                    answers[rec.label] = _comparable(pump.wait(getattr(j, name)(*args)))
        rec.label = "close"
        pump.wait(j.close())
    finally:
        pump.pool.stop()
    return answers


def _comparable(result: Any) -> Any:
    """What must be the same in both journals: trades numbered or times taken in this run are not."""
    today = f"H43010000001{END:%Y%m%d}"
    if isinstance(result, list):
        return [r if not hasattr(r, "msgid") else ("numbered now" if r.msgid.startswith(today) else r.msgid, r.state)
                for r in result]
    if hasattr(result, "msgid"):
        return result.msgid, result.state
    if isinstance(result, tuple):
        return len(result[0]), len(result[1])  # the code book
    if isinstance(result, float):
        return "a time"
    if isinstance(result, dict):
        return sorted(result, key=repr)  # counts: the states (or trade numbers and outcomes) counted
    return result


def _steps(path: Path, sql: str, params: tuple[Any, ...]) -> tuple[int, int]:
    """SQLite virtual-machine instructions the statement takes to run to its end (work, not time), and the
    rows it returns."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 10)
    try:
        rows = len(conn.execute(sql, params).fetchall())
    finally:
        conn.close()
    return count[0] * 10, rows


def _plan(path: Path, sql: str, params: tuple[Any, ...] | None) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params or ())]
    finally:
        conn.close()


def test_every_query_the_journal_offers_is_asked_here() -> None:
    offered = {n for n, f in inspect.getmembers(Journal, inspect.isfunction) if not n.startswith("_")}
    assert offered - WRITES - AT_START == set(_questions("m", "r", "p")), \
        "a read of the journal is not asked in this test (or a write is not listed in WRITES)"


def test_the_reading_of_every_key_at_start_goes_a_slice_at_a_time_along_a_primary_key(
        journals: dict[str, Path]) -> None:
    with sqlite3.connect(journals["big"]) as conn:
        for sql in journal_mod._KEYS:
            plan = " ".join(r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("", 10)))
            assert "PRIMARY KEY" in plan and not SCAN.search(plan) and "TEMP B-TREE" not in plan, (sql, plan)


def test_no_query_reads_the_whole_journal_nor_more_of_it_as_it_grows(journals: dict[str, Path],
                                                                      recorder: Recorder) -> None:
    answers, statements = {}, {}
    for name, path in journals.items():
        recorder.statements = []
        answers[name] = _ask(path, recorder)
        statements[name] = recorder.statements
    # The writer thread only writes: no question ran anything on it.
    assert [(label, sql) for label, sql in recorder.on_writer if label not in ("setup", "close")] == []
    assert any(re.match(r"(INSERT|UPDATE)", sql) for _, sql in recorder.on_writer)  # (it was watched)
    recent = {k: v for k, v in answers["small"].items() if not k.startswith("history")}
    assert recent == {k: v for k, v in answers["big"].items() if k in recent}, \
        "the questions about the recent part have the same answers in both journals"
    assert max(len(a) for a in recent.values() if isinstance(a, list)) >= 100  # there was much to read

    # No statement fep ran scans trades or events: neither the table nor an index over all of it.
    checked = 0
    for name, path in journals.items():
        for label, sql, params in statements[name]:
            if not re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", sql, re.I):
                continue
            plan = _plan(path, sql, params)
            assert not [line for line in plan if SCAN.search(line)], f"{label}: {sql} {params or ''} -> {plan}"
            checked += 1
    assert checked > 100

    # Each read's work is in proportion to its answer, and the same on three times the rows: none walks
    # what it was not asked about.
    reads = {name: [(label, sql, params) for label, sql, params in statements[name] if params is not None]
             for name in journals}
    assert {label.split("#")[0] for label, _, _ in reads["small"]} >= set(_questions("m", "r", "p")) - {"read"}
    for name, path in journals.items():
        for label, sql, params in reads[name]:
            steps, rows = _steps(path, sql, params)
            assert steps <= STEPS_PER_ROW * rows + STEPS_FIXED, \
                f"{label} on the {name} journal: {steps} steps for {rows} rows: {sql} {params}"
    for label, sql, params in reads["small"]:
        if not label.startswith("history"):
            small, big = _steps(journals["small"], sql, params)[0], _steps(journals["big"], sql, params)[0]
            assert big <= small * 1.25 + 500, f"{label}: {small} steps on the small journal, {big} on the big: {sql}"

