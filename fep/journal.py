"""The journal: one SQLite row per trade, its state, request, answer and history.

One writer thread owns the database. The reactor hands it operations; it runs every operation that
is waiting in ONE transaction (each in its own savepoint, so one failure cannot spoil the others),
commits with synchronous=FULL in WAL mode, and fires every waiter with its own result. Concurrent
trades so share fsyncs (group commit) and the reactor thread never touches SQLite.

Storage knows the state machine (fep.states) and nothing of sockets or of the bureau.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import sqlite_utils
from twisted.internet import defer
from twisted.python.failure import Failure

from fep import envelope, metrics
from fep.msgid import MsgidCounter
from fep.states import FINAL, OPEN, State, sources, target

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

COLUMNS = ("id", "msgid", "infno", "psn_no", "state", "payload_hash", "request", "answer", "late_answer",
           "related", "resolver", "attempts", "next_try", "deadline", "endpoint", "note", "setl_id", "cancels",
           "created", "updated")
UPDATABLE = frozenset({"request", "answer", "late_answer", "resolver", "attempts", "next_try", "deadline",
                       "endpoint", "note", "setl_id", "cancels"})


class _OpFailed(Exception):
    """An op of an unguarded batch failed; the batch was rolled back and is run again, guarded."""


class IllegalTransition(Exception):
    def __init__(self, msgid: str, event: str, state: str | None) -> None:
        super().__init__(f"trade {msgid}: event {event!r} is not allowed in state {state}")
        self.state = state


@dataclass
class TradeRow:
    id: int
    msgid: str
    infno: str
    psn_no: str | None
    state: State
    payload_hash: str
    request: str
    answer: str | None
    late_answer: str | None
    related: str | None
    resolver: str | None
    attempts: int
    next_try: float | None
    deadline: float | None
    endpoint: str | None
    note: str | None
    setl_id: str | None  # the bureau's settlement id, for settlements and cancels that succeeded
    cancels: str | None  # for a cancel (2208/2305): the setl_id it cancels
    created: float
    updated: float

    @classmethod
    def from_db(cls, row: tuple[Any, ...]) -> TradeRow:
        r = cls(*row)
        r.state = State(r.state)
        return r

    @property
    def envelope(self) -> dict[str, Any]:
        return envelope.loads(self.request)


@dataclass
class NewTrade:
    infno: str
    msgid: str | None  # None: the journal numbers it
    psn_no: str | None
    state: State
    payload_hash: str
    envelope: dict[str, Any]  # msgid is set in it when the journal numbers the trade
    related: str | None = None
    deadline: float | None = None


@dataclass
class Accepted:
    row: TradeRow
    created: bool  # False: the msgid was already journalled; row is the first submission


SCHEMA_VERSION = "1"
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM trades"


class Journal:
    def __init__(self, path: Path, fixmedins_code: str, max_batch: int = 512) -> None:
        self.path = path
        self._code = fixmedins_code
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Op, defer.Deferred[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._counter: MsgidCounter | None = None
        self._reactor: Any = None
        self.last_commit = time.monotonic()  # the watchdog reads it: the writer is making progress

    # --- life cycle -------------------------------------------------------------------------
    def open(self, reactor: Any) -> defer.Deferred[None]:
        self._reactor = reactor
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()
        return self._call(self._setup)

    def close(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self._thread is None:
            d.callback(None)
            return d
        self._queue.put(None)
        thread, self._thread = self._thread, None

        def wait() -> None:
            thread.join()

        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), wait)

    def _setup(self, conn: sqlite3.Connection) -> None:
        db = sqlite_utils.Database(conn)
        db["trades"].create(
            {c: t for c, t in zip(COLUMNS, (int, str, str, str, str, str, str, str, str, str, str, int,
                                             float, float, str, str, str, str, float, float))},
            pk="id", not_null={"msgid", "infno", "state", "payload_hash", "request", "attempts",
                               "created", "updated"},
            defaults={"attempts": 0}, if_not_exists=True,
        )
        db["trades"].create_index(["msgid"], unique=True, if_not_exists=True)
        db["trades"].create_index(["psn_no", "id"], if_not_exists=True)
        db["trades"].create_index(["related"], if_not_exists=True)
        conn.execute(
            "CREATE INDEX IF NOT EXISTS trades_open ON trades(state) WHERE state NOT IN "
            f"({', '.join(repr(s.value) for s in FINAL)})"
        )
        # Reconciliation reads a day's settlements: an index over settled rows only, by time.
        conn.execute("CREATE INDEX IF NOT EXISTS trades_settled ON trades(created) WHERE setl_id IS NOT NULL")
        _state_counts(conn, db)
        db["events"].create({"id": int, "msgid": str, "at": float, "event": str, "state": str, "note": str},
                            pk="id", if_not_exists=True)
        db["events"].create_index(["msgid"], if_not_exists=True)
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["runs"].create({"id": int, "kind": str, "key": str, "at": float, "doc": str}, pk="id",
                          if_not_exists=True)
        db["runs"].create_index(["kind", "key"], if_not_exists=True)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        last = conn.execute("SELECT value FROM meta WHERE key='msgid_counter'").fetchone()
        self._counter = MsgidCounter(self._code, last[0] if last else None)

    # --- the writer thread --------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600: it holds personal data and the bureau's answers.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        sqlite_utils.Database(conn).enable_wal()
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                while len(batch) < self._max_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)
                        break
                    batch.append(nxt)
                self._commit(conn, batch)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Op, defer.Deferred[Any]]]) -> None:
        started = time.perf_counter()
        try:
            results = self._apply(conn, batch, guarded=False)
        except _OpFailed:  # rare: run the batch again, each op in its own savepoint
            results = self._apply(conn, batch, guarded=True)
        self.last_commit = time.monotonic()
        metrics.JOURNAL_COMMIT.observe(time.perf_counter() - started)
        metrics.JOURNAL_BATCH.observe(len(batch))
        self._reactor.callFromThread(_deliver, results)

    def _apply(self, conn: sqlite3.Connection, batch: list[tuple[Op, defer.Deferred[Any]]],
               guarded: bool) -> list[tuple[defer.Deferred[Any], bool, Any]]:
        """One transaction for the batch. Unguarded, any op's failure undoes the batch (raising
        _OpFailed); guarded, an op's failure undoes only that op and goes to its own waiter."""
        results: list[tuple[defer.Deferred[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, d in batch:
                if not guarded:
                    try:
                        results.append((d, True, op(conn)))
                    except Exception:
                        conn.execute("ROLLBACK")
                        raise _OpFailed() from None
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((d, True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((d, False, e))
            conn.execute("COMMIT")
        except sqlite3.Error as e:  # the commit itself failed: nothing in the batch is durable
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(d, False, e) for _, d in batch]
        return results

    def run(self, op: Callable[[sqlite3.Connection], T]) -> defer.Deferred[T]:
        """Another store's operation (the catalog's), on the journal's writer: one writer for the database."""
        return self._call(op)

    def _call(self, op: Callable[[sqlite3.Connection], T]) -> defer.Deferred[T]:
        d: defer.Deferred[T] = defer.Deferred()
        self._queue.put((op, d))
        return d

    # --- operations (each one durable write, run in the writer thread) -----------------------
    def accept(self, new: NewTrade) -> defer.Deferred[Accepted]:
        """Journal a new trade, or return the row already journalled under its msgid."""
        return self._call(lambda conn: self._accept(conn, new))

    def _accept(self, conn: sqlite3.Connection, new: NewTrade) -> Accepted:
        now = time.time()
        attempts = 1 if new.state is State.SENT else 0
        while True:
            msgid = new.msgid or self._number(conn)
            new.envelope["msgid"] = msgid
            request = envelope.dumps(new.envelope).decode("utf-8")
            cur = conn.execute(
                "INSERT INTO trades (msgid, infno, psn_no, state, payload_hash, request, related, deadline, "
                "attempts, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(msgid) DO NOTHING",
                (msgid, new.infno, new.psn_no, new.state.value, new.payload_hash, request, new.related,
                 new.deadline, attempts, now, now),
            )
            if cur.rowcount == 1:
                break
            if new.msgid is not None:  # seen before: the first submission stands
                return Accepted(_get(conn, msgid), created=False)  # type: ignore[arg-type]
            # else: a number an HIS chose already; take the next
        _event(conn, msgid, now, "accept", new.state, None)
        row = TradeRow(cur.lastrowid, msgid, new.infno, new.psn_no, new.state, new.payload_hash, request, None, None,
                       new.related, None, attempts, None, new.deadline, None, None, None, None, now, now)
        return Accepted(row, created=True)

    def _number(self, conn: sqlite3.Connection) -> str:
        assert self._counter is not None
        msgid = self._counter.next(datetime.now())
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('msgid_counter', ?)", (self._counter.state,))
        return msgid

    def transition(self, msgid: str, event: str, note: str | None = None, **fields: Any) -> defer.Deferred[None]:
        return self._call(lambda conn: _transition(conn, msgid, event, note, fields))

    def transitions(self, *moves: tuple[str, str, str | None, dict[str, Any]]) -> defer.Deferred[None]:
        """Several trades move together or not at all: (msgid, event, note, fields) each."""

        def op(conn: sqlite3.Connection) -> None:
            for msgid, event, note, fields in moves:
                _transition(conn, msgid, event, note, fields)

        return self._call(op)

    def resolve_with(self, msgid: str, child: NewTrade, note: str, event: str = "resolve",
                     **fields: Any) -> defer.Deferred[Accepted]:
        """The original moves to RESOLVING and its resolving trade is journalled, in one write."""

        def op(conn: sqlite3.Connection) -> Accepted:
            acc = self._accept(conn, child)
            _transition(conn, msgid, event, note, {"resolver": acc.row.msgid, **fields})
            return acc

        return self._call(op)

    def store_late_answer(self, msgid: str, answer: str) -> defer.Deferred[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE trades SET late_answer=?, updated=? WHERE msgid=?", (answer, time.time(), msgid))
            _event(conn, msgid, time.time(), "late_answer", None, "late answer stored for reconciliation")

        return self._call(op)

    # --- reads (through the writer too: they see every committed write, in order) -----------
    def get(self, msgid: str) -> defer.Deferred[TradeRow | None]:
        return self._call(lambda conn: _get(conn, msgid))

    def open_trades(self) -> defer.Deferred[list[TradeRow]]:
        states = ", ".join(repr(s.value) for s in OPEN)
        return self._call(lambda conn: _rows(conn, f"{_SELECT} WHERE state IN ({states}) ORDER BY id", ()))

    def select(self, where: str, params: Iterable[Any] = ()) -> defer.Deferred[list[TradeRow]]:
        return self._call(lambda conn: _rows(conn, f"{_SELECT} WHERE {where}", tuple(params)))

    def history(self, msgid: str) -> defer.Deferred[list[tuple[float, str, str, str]]]:
        return self._call(lambda conn: conn.execute(
            "SELECT at, event, state, note FROM events WHERE msgid=? ORDER BY id", (msgid,)).fetchall())

    def save_run(self, kind: str, key: str, doc: dict[str, Any]) -> defer.Deferred[None]:
        """Keep the result of a reconciliation or a catalog sync so it can be shown again."""
        text = envelope.dumps(doc).decode("utf-8")

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO runs (kind, key, at, doc) VALUES (?,?,?,?)", (kind, key, time.time(), text))

        return self._call(op)

    def runs(self, kind: str, key: str | None = None, limit: int = 1) -> defer.Deferred[list[dict[str, Any]]]:
        where, params = ("kind=? AND key=?", (kind, key)) if key else ("kind=?", (kind,))
        return self._call(lambda conn: [envelope.loads(r[0]) for r in conn.execute(
            f"SELECT doc FROM runs WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit))])

    def ping(self) -> defer.Deferred[None]:
        """Returns once the writer thread has run a (no-op) batch: the watchdog's proof of progress."""
        return self._call(lambda conn: None)

    def count_by_state(self) -> defer.Deferred[dict[str, int]]:
        return self._call(lambda conn: dict(conn.execute("SELECT state, n FROM state_counts WHERE n > 0")))


def _state_counts(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    """Trades per state, kept by triggers in the same transaction as every insert and transition:
    metrics and `fep status` read them every few seconds, and a GROUP BY over a year of trades, on the
    writer thread, would hold up every trade behind it."""
    new = "state_counts" not in db.table_names()
    db["state_counts"].create({"state": str, "n": int}, pk="state", if_not_exists=True)
    bump = "INSERT INTO state_counts (state, n) VALUES (NEW.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1;"
    conn.execute(f"CREATE TRIGGER IF NOT EXISTS trades_count_insert AFTER INSERT ON trades BEGIN {bump} END")
    conn.execute("CREATE TRIGGER IF NOT EXISTS trades_count_update AFTER UPDATE OF state ON trades "
                 f"WHEN OLD.state != NEW.state BEGIN UPDATE state_counts SET n = n - 1 WHERE state = OLD.state; "
                 f"{bump} END")
    if new:  # a journal from before the counts were kept: count once
        conn.execute("INSERT INTO state_counts SELECT state, count(*) FROM trades GROUP BY state")


def _deliver(results: list[tuple[defer.Deferred[Any], bool, Any]]) -> None:
    for d, ok, value in results:
        if ok:
            d.callback(value)
        else:
            d.errback(Failure(value))


def _get(conn: sqlite3.Connection, msgid: str) -> TradeRow | None:
    row = conn.execute(f"{_SELECT} WHERE msgid=?", (msgid,)).fetchone()
    return TradeRow.from_db(row) if row else None


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[TradeRow]:
    return [TradeRow.from_db(r) for r in conn.execute(sql, params)]


def _event(conn: sqlite3.Connection, msgid: str, at: float, event: str, state: State | None,
           note: str | None) -> None:
    conn.execute("INSERT INTO events (msgid, at, event, state, note) VALUES (?,?,?,?,?)",
                 (msgid, at, event, state.value if state else None, note))


def _transition(conn: sqlite3.Connection, msgid: str, event: str, note: str | None,
                fields: dict[str, Any]) -> None:
    bad = set(fields) - UPDATABLE
    if bad:
        raise ValueError(f"cannot set {sorted(bad)} on a transition")
    srcs, tgt = sources(event), target(event)
    now = time.time()
    sets = "".join(f", {k}=?" for k in fields)
    if note is not None:
        sets += ", note=?"
    marks = ", ".join("?" * len(srcs))
    cur = conn.execute(
        f"UPDATE trades SET state=?, updated=?{sets} WHERE msgid=? AND state IN ({marks})",
        (tgt.value, now, *fields.values(), *([note] if note is not None else []), msgid,
         *(s.value for s in srcs)),
    )
    if cur.rowcount != 1:
        row = _get(conn, msgid)
        raise IllegalTransition(msgid, event, row.state if row else None)
    _event(conn, msgid, now, event, tgt, note)
