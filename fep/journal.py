"""The journal: one SQLite row per trade, its state, request, answer and history.

One writer thread owns every write. The reactor hands it operations; it runs every operation that is
waiting in ONE transaction (each in its own savepoint when one fails, so one failure cannot spoil the
others), commits with synchronous=FULL in WAL mode, and fires every waiter with its own result.
Concurrent trades so share fsyncs (group commit) and the reactor thread never touches SQLite.

Reads never go through the writer: reader threads with connections of their own run them (WAL lets
readers and the writer go on side by side). A read sees every write committed before it began, so a
read issued after a write's Deferred fired sees that write. Reads that decide a trade's next step (its
row, the person's settlements, its history) have their own threads, so a long view (`fep trades`, a
day's reconciliation) never holds up a trade.

Every query names the index it reads (INDEXED BY), chosen here by what the journal knows of its rows:
nearly all are final, open ones are few, a person has few, a day is a small slice of years. None reads
the whole table, whatever its size (tests/test_journal_plans.py checks every one).

When the disk cannot take a write (full, read-only, I/O error), a write that records what already
happened (an answer, a transition) is held and tried again until it is durable; a new trade is refused
at once, and `cannot_write` says why until a write goes through again.

Requests and answers are kept whole, as evidence; one over COMPRESS_FROM bytes is stored as a zlib
stream (RFC 1950, a BLOB) when that saves at least a quarter, and read back byte for byte.

Callers ask by intent (`parked()`, `settlements_of(psn)`, `unresolved_between(...)`): all SQL is here.
Storage knows the state machine (fep.states) and nothing of sockets or of the bureau.

With `url` (journal.url: postgresql://...) the same journal lives in PostgreSQL (fep.journal_pg): the same
writer and readers, the same named queries, taken to PostgreSQL's SQL by fep.dialect. There several nodes
may share it, and `fence` makes every new trade and every move to SENT or QUEUED conditional on this node's
leader epoch (fep.leader).
"""

from __future__ import annotations

import concurrent.futures
import collections
import functools
import os
import queue
import re
import sqlite3
import threading
import time
import zlib
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import msgspec
import psycopg
from isal import isal_zlib
import sqlite_utils
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from fep import envelope, journal_pg, metrics, systemd
from fep.keyfilter import KeyFilter, KnownKeys
from fep.msgid import MsgidCounter
from fep.states import FINAL, IN_FORCE, OPEN, UNRESOLVED, State, sources, target

T = TypeVar("T")
log = Logger()
Op = Callable[[sqlite3.Connection], Any]

COLUMNS = ("id", "msgid", "infno", "psn_no", "state", "payload_hash", "request", "answer", "late_answer",
           "related", "resolver", "attempts", "next_try", "deadline", "endpoint", "note", "setl_id", "cancels",
           "created", "updated", "his_msgid")
UPDATABLE = frozenset({"request", "answer", "late_answer", "resolver", "attempts", "next_try", "deadline",
                       "endpoint", "note", "setl_id", "cancels"})
BODIES = frozenset({"request", "answer", "late_answer"})  # kept whole, compressed when that pays (stored_body)
RETRY_PAUSE = 1.0  # seconds between tries of a held write while the disk cannot take it
COMPRESS_FROM = 256  # bytes: a body this long or longer is stored compressed when that saves a quarter
# Bodies are compressed by ISA-L (isal_zlib), which writes the zlib format stdlib zlib reads back, 5 to 10 times
# faster than zlib itself: a bureau's 2.4 KB answer in 10 us against 74 (zlib sets up its window each call),
# the bench's 2 MB upload answer in 0.3 ms against 3.9, on the writer's thread before each commit. Level 1 of
# its four compresses as zlib's level 1 does, a few per cent either way.
COMPRESS_LEVEL = 1
WAL_KEEP = 64 << 20  # bytes of WAL kept after a checkpoint; the rest is given back to the disk
DECISION_READERS = 2  # threads reading what decides a trade's next step
VIEW_READERS = 1  # threads reading for people and metrics: views, reconciliation, recovery
# An upper bound of what building schema 3's indexes costs, per trade, on a slow disk (6 us measured
# with the journal in the page cache): systemd is told to wait that much longer for the start.
MIGRATE_SECONDS_PER_TRADE = 100e-6
# SQLite's primary result codes that mean "the disk would not take it", not "the operation is wrong".
WRITE_FAILURES = {5: "database busy", 8: "read-only", 10: "disk I/O error", 13: "disk full", 14: "cannot open"}
DB_ERRORS = (sqlite3.Error, psycopg.Error)  # what either backend raises for a statement or a session


class JournalError(Exception):
    """The journal cannot be opened, or cannot take a new trade now; the message says why."""


class Fenced(Exception):
    """This node's leader epoch is no longer the journal's: another node leads, and nothing more is sent."""


class KeyInArchive(Exception):
    """A new trade's HIS msgid, which was not looked up (the filter of keys called it new), is in the archive
    after all: keys can enter it other than through this journal's writer (on PostgreSQL, another node's
    start takes an earlier release's month files in). Nothing was journalled: look the key up and decide again."""


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
    stored_request: str | bytes  # as the journal stores it (stored_body): read by `request` and `request_bytes`
    stored_answer: str | bytes | None
    stored_late_answer: str | bytes | None
    related: str | None
    resolver: str | None
    attempts: int  # tries spent: sends whose outcome stayed unknown, or refused resolving trades
    next_try: float | None
    deadline: float | None
    endpoint: str | None  # where it went: a resend goes there again
    note: str | None
    setl_id: str | None  # the bureau's settlement id, for settlements and cancels that succeeded
    cancels: str | None  # for a cancel (2208/2305): the setl_id it cancels
    created: float
    updated: float
    his_msgid: str | None  # the HIS's own key for it, whatever its form; None for fep's own trades
    archived: bool = False  # read from the archive: nothing moves it any more

    @classmethod
    def from_db(cls, row: tuple[Any, ...]) -> TradeRow:
        r = cls(*row)
        r.state = State(r.state)
        return r

    # A body is unpacked when it is read, not when its row is: a transition of a big upload hands back its
    # row, and nobody reads the 3.5 MB request again on the way to the HIS.
    @functools.cached_property
    def request_bytes(self) -> bytes:
        """The request as it is sent: UTF-8."""
        return body_bytes(self.stored_request)

    @functools.cached_property
    def request(self) -> str:
        return self.request_bytes.decode("utf-8")

    @functools.cached_property
    def answer(self) -> str | None:
        return None if self.stored_answer is None else body_text(self.stored_answer)

    @functools.cached_property
    def late_answer(self) -> str | None:
        return None if self.stored_late_answer is None else body_text(self.stored_late_answer)

    @property
    def envelope(self) -> dict[str, Any]:
        return envelope.loads(self.request_bytes)


@dataclass(frozen=True)
class ArchivedKey:
    """A msgid the HIS or the bureau knew, of a trade the archive holds now (fep.archive): `msgid` there. It
    names that trade forever, as one in the journal does."""
    msgid: str


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
    his_msgid: str | None = None  # the HIS's idempotency key; msgid is the one the bureau sees
    input_json: msgspec.Raw | None = None  # envelope["input"] as the HIS wrote it (HisRequest.input_json)
    packed_input: concurrent.futures.Future[bytes] | None = None  # input_json being compressed (pack)
    looked_up: bool = True  # False: his_msgid was not looked up, so the accept searches the archive for it


@dataclass
class Accepted:
    row: TradeRow
    created: bool  # False: the msgid was already journalled; row is the first submission


@dataclass(frozen=True)
class TradeFilter:
    """What `fep trades` asks for; None: any."""
    state: State | None = None
    psn_no: str | None = None
    infno: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


Move = tuple[str, str, "str | None", dict[str, Any]]  # (msgid, event, note, fields)

SCHEMA_VERSION = 9
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM trades"
_NOT_FINAL = f"state NOT IN ({', '.join(repr(s.value) for s in sorted(FINAL))})"
# The indexes the queries name (schema 3).
BY_MSGID, BY_PERSON, BY_STATE, BY_INFNO, BY_TIME = ("idx_trades_msgid", "idx_trades_psn_no_id", "trades_state",
                                                    "trades_infno", "trades_created")
BY_RELATED, SETTLED = "trades_related", "trades_settled"
BY_HIS_MSGID = "trades_his_msgid"  # schema 4
AUDIT_BY_TIME = "audit_at"  # schema 6
# Final states nearly every trade ends in: a filter on one of them narrows nothing.
COMMON = frozenset({State.ANSWERED, State.CONFIRMED})
EVER = (-1e18, 1e18)  # no bound on `created`, as numbers SQL can print (inf it cannot)


def stored_body(body: str | bytes) -> str | bytes:
    """A request or an answer (its text, or its UTF-8) as the journal stores it: the text, or its zlib stream
    when that pays."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if len(raw) >= COMPRESS_FROM:
        packed = isal_zlib.compress(raw, COMPRESS_LEVEL)
        if len(packed) <= len(raw) * 3 // 4:
            return packed
    return body if isinstance(body, str) else raw.decode("utf-8")


# A big input is compressed on a thread of its own while fep checks it, before its write is queued (pack).
PACK_FROM = 64 << 10
_packer = concurrent.futures.ThreadPoolExecutor(1, "journal-pack")
_HOLE = msgspec.Raw(b"\0")  # where the input goes in a request's envelope: no JSON text holds a NUL byte


def pack(data: bytes | msgspec.Raw) -> concurrent.futures.Future[bytes] | None:
    """`data` compressed as a middle piece of a zlib stream, ready for _spliced_body; None when too small to
    pay for the thread."""
    return _packer.submit(_deflated, data) if len(data) >= PACK_FROM else None


def _deflated(data: bytes | msgspec.Raw) -> bytes:
    # Raw deflate ended on a byte boundary, not final: what follows is appended as its own deflate blocks.
    c = isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    return c.compress(data) + c.flush(isal_zlib.Z_SYNC_FLUSH)


def _request(env: dict[str, Any], input_json: msgspec.Raw | None,
             packed: concurrent.futures.Future[bytes] | None) -> tuple[bytes, str | bytes]:
    """A new trade's request and what the journal stores of it (stored_body), the input as the HIS wrote it
    when it is given, compressed beforehand (pack) when that was begun."""
    if input_json is None:
        request = envelope.dumps(env)
        return request, stored_body(request)
    head, tail = envelope.dumps({**env, "input": _HOLE}).split(b"\0")
    request = b"".join((head, input_json, tail))
    if packed is None:
        return request, stored_body(request)
    start = isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    end = isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)  # its own: no reference into the input
    check = isal_zlib.adler32(request)  # ISA-L's: 0.2 ms for a 3.5 MB upload, zlib's 1.0
    stored = b"".join((b"\x78\x01", start.compress(head), start.flush(isal_zlib.Z_SYNC_FLUSH), packed.result(),
                       end.compress(tail), end.flush(), check.to_bytes(4, "big")))  # zlib's header and trailer
    return request, stored if len(stored) <= len(request) * 3 // 4 else request.decode("utf-8")


def body_text(value: str | bytes) -> str:
    """A stored request or answer, as it was sent or received."""
    return value if isinstance(value, str) else zlib.decompress(value).decode("utf-8")


def body_bytes(value: str | bytes) -> bytes:
    """A stored request or answer as its UTF-8 bytes."""
    return value.encode("utf-8") if isinstance(value, str) else zlib.decompress(value)


def _body(value: str | bytes | None) -> str | bytes | None:
    return None if value is None else stored_body(value)


def _states(states: Iterable[State]) -> str:
    return ", ".join(repr(s.value) for s in sorted(states))


class Journal:
    def __init__(self, path: Path, fixmedins_code: str, max_batch: int = 512, url: str | None = None) -> None:
        self.path = path
        self.url = url  # PostgreSQL's; None: SQLite at `path`
        self.where = journal_pg.redacted(url) if url else str(path)  # for messages: never the password
        self.fence: int | None = None  # the leader epoch new trades and sends must still hold (shared journals)
        self._code = fixmedins_code
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Op, defer.Deferred[Any], bool] | None] = queue.SimpleQueue()
        self._held: list[tuple[Op, defer.Deferred[Any], bool]] = []  # writes waiting for the disk (writer thread)
        self._thread: threading.Thread | None = None
        self._decisions = _Readers(self, "decide", DECISION_READERS)
        self._views = _Readers(self, "view", VIEW_READERS)
        self._counter: MsgidCounter | None = None
        self._reactor: Any = None
        self._inbox: _Inbox | None = None  # results on their way to the reactor (set by open)
        self._dead: Exception | None = None  # the writer could not start: every call fails with this
        self.cannot_write: str | None = None  # why the last write failed, until one goes through again
        self.last_commit = time.monotonic()  # the watchdog reads it: the writer is making progress
        # Told (on the reactor) of every transition once it is durable: (event, the row as it now is).
        self.observers: list[Callable[[str, TradeRow], None]] = []
        self.keys = KnownKeys()  # which keys it may hold, once know_keys has read them
        self._made: list[str] = []  # keys of the trades the writer's open batch journals (writer thread)
        self._keys_reader: threading.Thread | None = None
        self._closing = threading.Event()

    # --- life cycle -------------------------------------------------------------------------
    def open(self, reactor: Any) -> defer.Deferred[None]:
        """Fails with JournalError, naming the file and the reason, if the journal cannot be written."""
        self._reactor = reactor
        self._inbox = _Inbox(reactor)
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()
        return self._call(self._setup)

    @property
    def closing(self) -> bool:
        """close() was called: fep is stopping, and what it had in hand is picked up by the next start."""
        return self._closing.is_set()

    def close(self) -> defer.Deferred[None]:
        if self._thread is None:
            return defer.succeed(None)
        self._closing.set()
        readers = [*self._decisions.stop(), *self._views.stop(), *filter(None, [self._keys_reader])]
        writer, self._thread = self._thread, None
        from twisted.internet.threads import deferToThreadPool

        def join() -> None:
            for t in readers:
                t.join()
            self._queue.put(None)  # the writer's connection closes last: it checkpoints and removes the WAL
            writer.join()

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), join)

    def _setup(self, conn: sqlite3.Connection) -> None:
        """Create the schema, or bring a journal of an earlier version forward, in one transaction."""
        if self.url:
            migrate_pg(conn, self.where)
        else:
            migrate(conn, str(self.path))
        self._load_counter(conn)

    def _load_counter(self, conn: sqlite3.Connection) -> None:
        last = conn.execute("SELECT value FROM meta WHERE key='msgid_counter'").fetchone()
        self._counter = MsgidCounter(self._code, last[0] if last else None)

    def lead(self, epoch: int) -> defer.Deferred[None]:
        """This node leads under `epoch` (fep.leader): moves to SENT hold it, and msgids go on from the last
        one the journal numbered, whoever numbered it."""
        def op(conn: sqlite3.Connection) -> None:
            self.fence = epoch
            self._load_counter(conn)

        return self._call(op)

    def know_keys(self) -> None:
        """Read every key the journal and its archive hold into `keys`, on a thread of its own (a year's take
        seconds); meanwhile every key may be held. At start, and again at each takeover: another node may
        have journalled trades since."""
        reading = self.keys.reading()
        self._keys_reader = threading.Thread(target=self._read_keys, args=(reading,), name="journal-keys",
                                             daemon=True)
        self._keys_reader.start()

    def _read_keys(self, reading: int) -> None:
        started, stored, rows = time.monotonic(), KeyFilter(), 0
        try:
            conn = self._reader()
            try:
                conn.execute("BEGIN")  # one snapshot for every read below
                for sql in _KEYS_PG if self.url else _KEYS:
                    if (read := _read_key_slices(conn, sql, stored, self._closing)) is None:
                        return
                    rows += read
            finally:
                conn.close()
        except Exception as e:  # the filter stays unread (nor are keys kept for it): every key is looked up
            self.keys.failed(reading, f"the reading failed ({type(e).__name__}: {e}; see the log)")
            log.failure("the journal's keys could not be read; each new trade's key is looked up instead")
            return
        self.keys.read(reading, stored)
        log.info("journal: the keys it holds were read ({rows} rows of the journal and its archive) in {s:.1f} s; "
                 "a new trade's key is looked up only when it may be one of them", rows=rows,
                 s=time.monotonic() - started)

    # --- the writer thread --------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.url:
            try:
                return journal_pg.PgConnection(self.url, reader=False,  # type: ignore[return-value]
                                               unsettled=lambda why: setattr(self, "cannot_write", why))
            except psycopg.Error as e:
                raise JournalError(f"journal {self.where} cannot be opened for writing: {e}") from None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created 0600: it holds personal data and the bureau's answers.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            sqlite_utils.Database(conn).enable_wal()
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP}")  # a burst's WAL is not kept for ever
            return conn
        except (OSError, sqlite3.Error) as e:
            raise JournalError(f"journal {self.path} cannot be opened for writing: {e}") from None

    def _reader(self) -> sqlite3.Connection:
        """A connection for one reader thread: it can only read."""
        if self.url:
            try:
                return journal_pg.PgConnection(self.url, reader=True)  # type: ignore[return-value]
            except psycopg.Error as e:
                raise JournalError(f"journal {self.where} cannot be opened for reading: {e}") from None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            conn.execute("PRAGMA query_only=ON")
            return conn
        except sqlite3.Error as e:
            raise JournalError(f"journal {self.path} cannot be opened for reading: {e}") from None

    def _run(self) -> None:
        try:
            conn = self._connect()
        except JournalError as e:
            self._fail_all(e)
            return
        try:
            while True:
                try:
                    item = self._queue.get(timeout=RETRY_PAUSE if self._held else None)
                except queue.Empty:
                    item = ()  # time to try the held writes again
                if item is None:
                    return
                batch, self._held = self._held + ([item] if item else []), []
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

    def _fail_all(self, error: Exception) -> None:
        """The writer cannot run at all: every waiter, now and later, hears why."""
        self._dead = error
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item:
                self._reactor.callFromThread(item[1].errback, Failure(error))

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Op, defer.Deferred[Any], bool]]) -> None:
        started = time.perf_counter()
        changes = conn.total_changes
        try:
            results = self._apply(conn, batch, guarded=False)
        except DB_ERRORS:  # rare: run the batch again, each op in its own savepoint
            results = self._apply(conn, batch, guarded=True)
        if self._made:  # (after the commit: see KnownKeys; a key of a write undone makes only a false "maybe")
            self.keys.committed(self._made)
            self._made = []
        self.last_commit = time.monotonic()
        if not self._held and conn.total_changes > changes:
            self.cannot_write = None
        metrics.JOURNAL_COMMIT.observe(time.perf_counter() - started)
        metrics.JOURNAL_BATCH.observe(len(batch))
        self._inbox.put(results)  # type: ignore[union-attr]

    def _apply(self, conn: sqlite3.Connection, batch: list[tuple[Op, defer.Deferred[Any], bool]],
               guarded: bool) -> list[tuple[defer.Deferred[Any], bool, Any]]:
        """One transaction for the batch. Unguarded, any op's failure undoes the batch and raises;
        guarded, an op's failure undoes only that op: a write the disk refused is held to be tried
        again (or, for a new trade, refused), any other failure goes to its own waiter."""
        results: list[tuple[defer.Deferred[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                op, d, hold = item
                if not guarded:
                    try:
                        results.append((d, True, op(conn)))
                    except Exception:
                        conn.execute("ROLLBACK")
                        raise sqlite3.Error("an op failed; run again, guarded") from None
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((d, True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    if not self._disk_refused(e, item):
                        results.append((d, False, e))
            conn.execute("COMMIT")
        except DB_ERRORS as e:  # the transaction itself failed: nothing in the batch is durable
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not guarded and _write_failure(e) is None:
                raise
            return [(d, False, e) for op, d, hold in batch if not self._disk_refused(e, (op, d, hold))]
        return results

    def _disk_refused(self, e: Exception, item: tuple[Op, defer.Deferred[Any], bool]) -> bool:
        """True when `e` is the disk refusing a write and the op is held to be tried again."""
        why = _write_failure(e)
        if why is None:
            return False
        self.cannot_write = f"{why} ({e})"
        if not item[2]:
            return False  # a new trade: refused now, the HIS may send it again later
        self._held.append(item)
        return True

    def run(self, op: Callable[[sqlite3.Connection], T]) -> defer.Deferred[T]:
        """Another store's operation (the code book's), on the journal's writer: one writer for the database."""
        return self._call(op)

    def _call(self, op: Callable[[sqlite3.Connection], T], hold: bool = True) -> defer.Deferred[T]:
        """`hold`: if the disk refuses it, keep it and try again until it is durable (what already
        happened must be recorded); otherwise fail it at once."""
        d: defer.Deferred[T] = defer.Deferred()
        if self._dead is not None:
            d.errback(Failure(self._dead))
            return d
        self._queue.put((op, d, hold))
        return d

    # --- writes (each one durable write, run in the writer thread) -----------------------------
    def accept(self, new: NewTrade) -> defer.Deferred[Accepted]:
        """Journal a new trade, or return the row already journalled under its msgid. While the disk
        cannot take writes it fails with JournalError: nothing was accepted."""
        d = self._call(lambda conn: self._accept(conn, new), hold=False)
        return d.addErrback(self._not_accepted)

    def _not_accepted(self, f: Failure) -> Failure:
        if _write_failure(f.value) is not None:
            raise JournalError(f"journal cannot write: {self.cannot_write or f.getErrorMessage()}")
        return f

    def _accept(self, conn: sqlite3.Connection, new: NewTrade) -> Accepted:
        now = time.time()
        if new.his_msgid is not None and (seen := _by_his_msgid(conn, new.his_msgid)) is not None:
            return Accepted(seen, created=False)  # the HIS sent it before: the first submission stands
        if not new.looked_up and new.his_msgid is not None and _in_archive(conn, new.his_msgid):
            raise KeyInArchive(new.his_msgid)
        _hold_epoch(conn, self.fence)  # a new trade is a promise to the HIS: only the leader makes one
        while True:
            msgid = new.msgid or self._number(conn)
            if (new.msgid is None or new.his_msgid is not None) and _archived_key(conn, msgid) is not None:
                new.msgid = None  # a number the bureau saw, on a trade now archived (a restored journal's counter)
                continue
            new.envelope["msgid"] = msgid
            request, stored = _request(new.envelope, new.input_json, new.packed_input)
            cur = conn.execute(
                "INSERT INTO trades (msgid, infno, psn_no, state, payload_hash, request, related, deadline, "
                "attempts, created, updated, his_msgid) VALUES (?,?,?,?,?,?,?,?,0,?,?,?) ON CONFLICT(msgid) DO NOTHING",
                (msgid, new.infno, new.psn_no, new.state.value, new.payload_hash, stored, new.related,
                 new.deadline, now, now, new.his_msgid),
            )
            if cur.rowcount == 1:
                break
            if new.msgid is not None and new.his_msgid is None:  # fep's own number, seen before: it stands
                return Accepted(_get(conn, msgid), created=False)  # type: ignore[arg-type]
            new.msgid = None  # the number is taken (by fep's own trade, or another HIS key): fep numbers it
        _event(conn, msgid, now, "accept", new.state, None)
        self._made += [msgid] if new.his_msgid in (None, msgid) else [msgid, new.his_msgid]
        row = TradeRow(cur.lastrowid, msgid, new.infno, new.psn_no, new.state, new.payload_hash, stored, None, None,
                       new.related, None, 0, None, new.deadline, None, None, None, None, now, now, new.his_msgid)
        row.request_bytes = request  # the sender sends these bytes: they are not unpacked again
        return Accepted(row, created=True)

    def _number(self, conn: sqlite3.Connection) -> str:
        assert self._counter is not None
        msgid = self._counter.next(datetime.now())
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('msgid_counter', ?)", (self._counter.state,))
        return msgid

    def transition(self, msgid: str, event: str, note: str | None = None, **fields: Any) -> defer.Deferred[TradeRow]:
        """Move one trade; returns its row as it now is. IllegalTransition if its state does not allow it."""
        d = self._call(lambda conn: _transition(conn, msgid, event, note, fields, self.fence))
        return d.addCallback(lambda row: self._tell([(event, row)])[0])

    def transitions(self, *moves: Move) -> defer.Deferred[list[TradeRow]]:
        """Several trades move together or not at all; their rows as they now are, in order."""
        d = self._call(lambda conn: [_transition(conn, *m, self.fence) for m in moves])
        return d.addCallback(lambda rows: self._tell(list(zip((m[1] for m in moves), rows))))

    def _tell(self, moved: list[tuple[str, TradeRow]]) -> list[TradeRow]:
        for event, row in moved:
            for observer in self.observers:
                try:
                    observer(event, row)
                except Exception:  # a log line that cannot be written never undoes a durable transition
                    log.failure("an observer of {event} on {msgid} failed", event=event, msgid=row.msgid)
        return [row for _, row in moved]

    def resolve_with(self, msgid: str, child: NewTrade, note: str, event: str = "resolve",
                     **fields: Any) -> defer.Deferred[tuple[TradeRow, TradeRow]]:
        """The original moves (to RESOLVING or REVOKING) and its resolving trade is journalled, in one
        write. Returns (original, resolving trade)."""

        def op(conn: sqlite3.Connection) -> tuple[TradeRow, TradeRow]:
            acc = self._accept(conn, child)
            if not acc.created:
                raise IllegalTransition(acc.row.msgid, "accept", acc.row.state)
            return _transition(conn, msgid, event, note, {"resolver": acc.row.msgid, **fields}, self.fence), acc.row

        return self._call(op)

    def store_late_answer(self, msgid: str, answer: str) -> defer.Deferred[TradeRow]:
        def op(conn: sqlite3.Connection) -> TradeRow:
            now = time.time()
            conn.execute("UPDATE trades SET late_answer=?, updated=? WHERE msgid=?", (stored_body(answer), now, msgid))
            _event(conn, msgid, now, "late_answer", None, "late answer stored for reconciliation")
            return _get(conn, msgid)  # type: ignore[return-value]

        return self._call(op)

    def save_run(self, kind: str, key: str, doc: dict[str, Any]) -> defer.Deferred[None]:
        """Keep the result of a reconciliation or a catalog sync so it can be shown again."""
        text = envelope.dumps(doc).decode("utf-8")

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO runs (kind, key, at, doc) VALUES (?,?,?,?)", (kind, key, time.time(), text))

        return self._call(op)

    # --- reads, by intent (reader threads: each sees every write committed before it began) --------------
    def get(self, msgid: str) -> defer.Deferred[TradeRow | None]:
        """By the msgid the bureau knows."""
        return self._decisions.call(lambda conn: _get(conn, msgid))

    def for_his(self, key: str) -> defer.Deferred[TradeRow | ArchivedKey | None]:
        """The trade the HIS means by `key`: its own msgid, or else the msgid fep answered it with; in the
        journal, or else archived."""
        return self._decisions.call(lambda conn: _by_his_msgid(conn, key) or _archived_key(conn, key, his=True)
                                    or _get(conn, key) or _archived_key(conn, key))

    def to_recover(self) -> defer.Deferred[list[TradeRow]]:
        """What a start picks up, in journal order: every open trade, and parked originals (a parked
        upload still holds its person's queue)."""
        states = _states(OPEN | {State.NEEDS_ATTENTION})
        return self._views.call(_rows(f"INDEXED BY {BY_STATE} WHERE state IN ({states}) ORDER BY id"))

    def parked(self) -> defer.Deferred[list[TradeRow]]:
        return self._views.call(_rows(f"INDEXED BY {BY_STATE} WHERE state = 'NEEDS_ATTENTION' ORDER BY id"))

    def oldest(self, states: Iterable[State]) -> defer.Deferred[float | None]:
        """When the oldest original trade in one of these (open) states was accepted; None: there is none.
        Each state's trades are read oldest first, up to the first original."""
        sql = (f"SELECT created FROM trades INDEXED BY {BY_STATE} WHERE state = ? AND related IS NULL "
               f"ORDER BY created LIMIT 1")
        wanted = sorted(states)

        def op(conn: sqlite3.Connection) -> float | None:
            found = [r[0] for s in wanted for r in _fetch(conn, sql, (s.value,))]
            return min(found) if found else None

        return self._views.call(op)

    def settlements_of(self, psn_no: str, infnos: Iterable[str]) -> defer.Deferred[list[TradeRow]]:
        """The person's settlements and cancels of these trade numbers that the bureau holds."""
        numbers = tuple(infnos)
        return self._decisions.call(_rows(
            f"INDEXED BY {BY_PERSON} WHERE psn_no = ? AND state IN ({_states(IN_FORCE)}) AND setl_id IS NOT NULL "
            f"AND infno IN ({', '.join('?' * len(numbers))}) ORDER BY id", (psn_no, *numbers)))

    def pending_money_of(self, psn_no: str, infnos: Iterable[str]) -> defer.Deferred[list[TradeRow]]:
        """The person's original trades of these numbers whose outcome fep is still finding out, or that
        wait for a person: the bureau may hold them."""
        numbers = tuple(infnos)
        states = _states(UNRESOLVED | {State.NEEDS_ATTENTION})
        return self._decisions.call(_rows(
            f"INDEXED BY {BY_PERSON} WHERE psn_no = ? AND state IN ({states}) AND related IS NULL "
            f"AND infno IN ({', '.join('?' * len(numbers))}) ORDER BY id", (psn_no, *numbers)))

    def settled_between(self, start: float, end: float) -> defer.Deferred[list[TradeRow]]:
        """Settlements and cancels journalled in [start, end] that the bureau holds (reconciliation)."""
        return self._views.call(_rows(f"INDEXED BY {SETTLED} WHERE setl_id IS NOT NULL AND state IN "
                                      f"({_states(IN_FORCE)}) AND created BETWEEN ? AND ? ORDER BY id", (start, end)))

    def unresolved_between(self, start: float, end: float) -> defer.Deferred[list[TradeRow]]:
        """Original trades accepted in [start, end] whose outcome fep is still finding out, or that wait for
        a person."""
        states = _states(UNRESOLVED | {State.NEEDS_ATTENTION})
        return self._views.call(_rows(f"INDEXED BY {BY_STATE} WHERE state IN ({states}) AND related IS NULL "
                                      f"AND created BETWEEN ? AND ? ORDER BY id", (start, end)))

    def resolving_trades(self, msgid: str) -> defer.Deferred[list[TradeRow]]:
        return self._decisions.call(_rows(f"INDEXED BY {BY_RELATED} WHERE related = ? ORDER BY id", (msgid,)))

    def find(self, f: TradeFilter) -> defer.Deferred[list[TradeRow]]:
        """The newest `limit` trades that match, oldest first.

        The index is the filter that narrows most: a person's trades are few; so are the trades in a
        state other than the common final ones; then the trade number; then the time. Each is read
        newest first from its index and stops at `limit` (a person's few are read whole and sorted)."""
        if f.psn_no is not None:
            index = BY_PERSON
        elif f.state is not None and f.state not in COMMON:
            index = BY_STATE
        elif f.infno is not None:
            index = BY_INFNO
        elif f.state is not None:
            index = BY_STATE
        else:
            index = BY_TIME
        where, params = [], []
        for clause, value in (("state = ?", f.state and f.state.value), ("psn_no = ?", f.psn_no),
                              ("infno = ?", f.infno)):
            if value is not None:
                where.append(clause)
                params.append(value)
        since, until = (f.since if f.since is not None else EVER[0]), (f.until if f.until is not None else EVER[1])
        where.append("created BETWEEN ? AND ?")
        sql = f"INDEXED BY {index} WHERE {' AND '.join(where)} ORDER BY created DESC, id DESC LIMIT ?"
        return self._views.call(_rows(sql, (*params, since, until, f.limit))).addCallback(lambda rows: rows[::-1])

    def history(self, msgid: str) -> defer.Deferred[list[tuple[float, str, str, str]]]:
        return self._decisions.call(lambda conn: _fetch(
            conn, "SELECT at, event, state, note FROM events INDEXED BY idx_events_msgid WHERE msgid = ? "
                  "ORDER BY id", (msgid,)))

    def runs(self, kind: str, key: str | None = None, limit: int = 1) -> defer.Deferred[list[dict[str, Any]]]:
        if key:
            sql, params = "SELECT doc FROM runs INDEXED BY runs_key WHERE kind = ? AND key = ?", (kind, key)
        else:
            sql, params = "SELECT doc FROM runs INDEXED BY runs_kind WHERE kind = ?", (kind,)
        return self._views.call(lambda conn: [envelope.loads(r[0]) for r in _fetch(
            conn, f"{sql} ORDER BY id DESC LIMIT ?", (*params, limit))])

    def read(self, op: Callable[[sqlite3.Connection], T], decides: bool = False) -> defer.Deferred[T]:
        """Another store's read (the code book's, a named query below), on a reader thread: it never holds up
        the writer. `decides`: it decides a trade's next step, so it goes to the decision readers, where no
        long view waits ahead of it."""
        return (self._decisions if decides else self._views).call(op)

    def ping(self) -> defer.Deferred[None]:
        """Returns once the writer thread has run a (no-op) batch: the watchdog's proof of progress."""
        return self._call(lambda conn: None)

    def count_by_state(self) -> defer.Deferred[dict[str, int]]:
        return self._views.call(lambda conn: dict(_fetch(conn, "SELECT state, n FROM state_counts WHERE n > 0")))


class _Inbox:
    """Results of the journal's threads on their way to the reactor. Each callFromThread writes to the reactor's
    waker pipe; here one is outstanding at a time, and its call delivers every result that came meanwhile."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._results: collections.deque[tuple[defer.Deferred[Any], bool, Any]] = collections.deque()
        self._called = False  # a call to _deliver is queued and has not begun

    def put(self, results: list[tuple[defer.Deferred[Any], bool, Any]]) -> None:
        """From any thread. (The flag is cleared before the results are taken: a result put after the queued
        call has begun either is taken by it or queues another.)"""
        self._results.extend(results)
        if not self._called:
            self._called = True
            self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        self._called = False
        results = self._results
        # Only those here now (those put later queue another call): the reactor reads and writes its sockets
        # between deliveries, however busy the journal's threads are.
        for _ in range(len(results)):
            d, ok, value = results.popleft()
            try:
                if ok:
                    d.callback(value)
                else:
                    d.errback(Failure(value))
            except Exception:  # one waiter's fault must not strand the results behind it
                log.failure("delivering a journal result")


class _Readers:
    """Threads that read, each with its own connection. Every read sees the journal as committed when it was
    asked for, or later, and holds nothing once it is done.

    A reader is woken once for all the reads asked for meanwhile (each wake-up is a switch of threads and
    of the interpreter lock): the reactor queues a wake-up only when none is outstanding, and the reader
    that takes it takes every read waiting. Another read asked for while it works wakes another reader."""

    def __init__(self, journal: Journal, name: str, n: int) -> None:
        self._journal = journal
        self._name = name
        self._n = n
        self._queue: queue.SimpleQueue[bool | None] = queue.SimpleQueue()  # True: reads wait; None: stop
        self._reads: collections.deque[tuple[Op, defer.Deferred[Any]]] = collections.deque()
        self._woken = False  # a wake-up is queued, or taken by a reader that has not begun reading
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def call(self, op: Callable[[sqlite3.Connection], T]) -> defer.Deferred[T]:
        d: defer.Deferred[T] = defer.Deferred()
        if self._journal._dead is not None or self._stopped:
            d.errback(Failure(self._journal._dead or JournalError(f"journal {self._journal.where} is closed")))
            return d
        if not self._threads:  # the first read starts them (after open: the schema is there)
            self._threads = [threading.Thread(target=self._run, name=f"journal-{self._name}-{i}", daemon=True)
                             for i in range(self._n)]
            for t in self._threads:
                t.start()
        self._reads.append((op, d))
        if not self._woken:
            self._woken = True
            self._queue.put(True)
        return d

    def stop(self) -> list[threading.Thread]:
        self._stopped = True
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        return threads

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while self._queue.get() is not None:
                self._woken = False  # before taking reads: one asked for from now on queues a wake-up
                reads = []
                while True:
                    try:
                        reads.append(self._reads.popleft())
                    except IndexError:  # none left (another reader, woken since, may have taken the last)
                        break
                conn = self._read(conn, reads)
        finally:
            if conn is not None:
                conn.close()

    def _read(self, conn: sqlite3.Connection | None,
              reads: list[tuple[Op, defer.Deferred[Any]]]) -> sqlite3.Connection | None:
        """Reads asked for before it began, in one transaction (each of its statements costs this thread the
        interpreter lock once more) unless one fails: the next begins another. Each result goes on its way as
        soon as it is read. Returns the connection to read on next."""
        for op, d in reads:
            try:
                if conn is None:
                    conn = self._journal._reader()
                if not conn.in_transaction:
                    conn.execute("BEGIN")
                result: tuple[bool, Any] = (True, op(conn))
            except Exception as e:
                result = (False, e)
                conn = _end_read(conn)
            self._journal._inbox.put([(d, *result)])  # type: ignore[union-attr]
        return _end_read(conn)


# The journal's keys, read a slice at a time (a PostgreSQL cursor holds all it reads): each query takes the
# last position read and the slice's size, and gives (position, msgid, HIS msgid) rows. After each slice the
# reading rests as long as the slice took: it holds the interpreter lock while it hashes, and a year of
# trades (3 million, 8 s of CPU) read at full speed held the HIS's trades up (median 35 ms against 12 after).
_TRADE_KEYS = "SELECT id, msgid, his_msgid FROM {} WHERE id > ? ORDER BY id LIMIT ?"
_KEYS = (_TRADE_KEYS.format("trades"), "SELECT key, key, NULL FROM archived_keys WHERE key > ? ORDER BY key LIMIT ?")
_KEYS_PG = (_TRADE_KEYS.format("trades"), _TRADE_KEYS.format("archived_trades"))
KEYS_SLICE = 10_000


def _read_key_slices(conn: sqlite3.Connection, sql: str, into: KeyFilter, closing: threading.Event) -> int | None:
    """Every key a query gives, into `into`; how many rows gave them, or None: the journal closed meanwhile."""
    last: int | str = "" if "archived_keys" in sql else -1
    read = 0
    while True:
        started = time.perf_counter()
        rows = _fetch(conn, sql, (last, KEYS_SLICE))
        into.update(msgid for _, msgid, _ in rows)
        into.update(his for _, _, his in rows if his is not None)
        read += len(rows)
        if len(rows) < KEYS_SLICE:
            return read
        last = rows[-1][0]
        if closing.wait(time.perf_counter() - started):
            return None


def _end_read(conn: sqlite3.Connection | None) -> sqlite3.Connection | None:
    """The read transaction ended (a read keeps nothing: this only ends its snapshot); the connection, or None
    when it could not even be ended and the next read must start afresh."""
    if conn is None or not conn.in_transaction:
        return conn
    try:
        conn.execute("ROLLBACK")
        return conn
    except Exception:
        conn.close()
        return None


def _fetch(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Every query of a reader goes through here, read to the end."""
    return conn.execute(sql, params).fetchall()


def _rows(where: str, params: tuple[Any, ...] = ()) -> Callable[[sqlite3.Connection], list[TradeRow]]:
    return lambda conn: [TradeRow.from_db(r) for r in _fetch(conn, f"{_SELECT} {where}", params)]


# --- the schema and its migrations ------------------------------------------------------------------
def migrate(conn: sqlite3.Connection, where: str) -> None:
    """Create the schema, or bring a journal of an earlier version to SCHEMA_VERSION (in the caller's
    transaction). JournalError for a journal newer than this fep."""
    db = sqlite_utils.Database(conn)
    new = "trades" not in db.table_names()
    if new:
        _schema_v1(conn, db)
    _forward(conn, where, new)


def migrate_pg(conn: sqlite3.Connection, where: str) -> None:
    """A PostgreSQL journal: created at journal_pg.BASE_VERSION, then the migrations after it, in the caller's
    transaction, as on SQLite."""
    _forward(conn, where, journal_pg.create_schema(conn))  # type: ignore[arg-type]


def _forward(conn: sqlite3.Connection, where: str, new: bool) -> None:
    """The migrations after the journal's schema, on either backend; `new`: created just now (nothing to say)."""
    version = int(conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise JournalError(f"journal {where} is of schema {version}, newer than this fep ({SCHEMA_VERSION}): "
                           f"install the newer fep again")
    if version < SCHEMA_VERSION and not new:
        trades = conn.execute("SELECT max(id) FROM trades").fetchone()[0] or 0
        # A migration may build indexes over every trade once: a start that takes longer than usual.
        systemd.notify(f"EXTEND_TIMEOUT_USEC={int((120 + trades * MIGRATE_SECONDS_PER_TRADE) * 1e6)}\n"
                       f"STATUS=journal: migrating schema {version} to {SCHEMA_VERSION} ({trades:,} trades)")
        log.info("journal {where}: migrating schema {old} to {new} ({trades} trades), in one transaction",
                 where=where, old=version, new=SCHEMA_VERSION, trades=trades)
    for v in sorted(n for n in MIGRATIONS if version < n <= SCHEMA_VERSION):
        MIGRATIONS[v](conn)
    conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))


def _schema_v1(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    """The journal as the first release wrote it; later versions are migrations from here."""
    db["trades"].create(
        {c: t for c, t in zip(COLUMNS, (int, str, str, str, str, str, str, str, str, str, str, int,
                                         float, float, str, str, str, str, float, float))},
        pk="id", not_null={"msgid", "infno", "state", "payload_hash", "request", "attempts", "created", "updated"},
        defaults={"attempts": 0},
    )
    db["trades"].create_index(["msgid"], unique=True)
    db["trades"].create_index(["psn_no", "id"])
    db["trades"].create_index(["related"])
    conn.execute("CREATE INDEX trades_open ON trades(state) WHERE state NOT IN ('ANSWERED', 'CONFIRMED', "
                 "'NOT_NEEDED', 'NOT_SENT', 'REVERSED')")
    conn.execute("CREATE INDEX trades_settled ON trades(created) WHERE setl_id IS NOT NULL")
    _state_counts(conn, db)
    db["events"].create({"id": int, "msgid": str, "at": float, "event": str, "state": str, "note": str}, pk="id")
    db["events"].create_index(["msgid"])
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["runs"].create({"id": int, "kind": str, "key": str, "at": float, "doc": str}, pk="id")
    db["runs"].create_index(["kind", "key"])
    conn.execute("INSERT INTO meta VALUES ('schema', '1')")


def _to_v2(conn: sqlite3.Connection) -> None:
    """DROPPED is final: the index over open trades is rebuilt for the new set, by (state, id) so the
    oldest trade in a state is read from it."""
    conn.execute("DROP INDEX IF EXISTS trades_open")
    conn.execute(f"CREATE INDEX trades_open ON trades(state, id) WHERE {_NOT_FINAL}")


def _to_v3(conn: sqlite3.Connection) -> None:
    """Every question the journal is asked is answered from an index, whatever its size.

    - trades_state (state, created) over every trade, in place of the partial index over open ones
      (which SQLite could not prove usable for `state = ?`): any state, newest or oldest first;
    - trades_infno (infno, created) and trades_created (created): `fep trades --infno / --since`;
    - the index on `related` holds resolving trades only: `related IS NULL` (nearly every row) is no
      longer a reason to walk it, and it no longer holds a NULL for every original;
    - runs by (kind, id) and (kind, key, id): the latest run is read, not all of them sorted.
    Stored requests and answers are left as they were written: evidence is never rewritten."""
    conn.execute("DROP INDEX IF EXISTS trades_open")
    conn.execute(f"CREATE INDEX {BY_STATE} ON trades(state, created)")
    conn.execute(f"CREATE INDEX {BY_INFNO} ON trades(infno, created)")
    conn.execute(f"CREATE INDEX {BY_TIME} ON trades(created)")
    conn.execute("DROP INDEX IF EXISTS idx_trades_related")
    conn.execute(f"CREATE INDEX {BY_RELATED} ON trades(related) WHERE related IS NOT NULL")
    conn.execute("DROP INDEX IF EXISTS idx_runs_kind_key")
    conn.execute("CREATE INDEX runs_kind ON runs(kind, id)")
    conn.execute("CREATE INDEX runs_key ON runs(kind, key, id)")


def _to_v4(conn: sqlite3.Connection) -> None:
    """The HIS's msgid is its idempotency key whatever its form, kept beside the msgid the bureau sees.
    Earlier releases used a well-formed HIS msgid as the bureau's: those rows keep it as both."""
    conn.execute("ALTER TABLE trades ADD COLUMN his_msgid TEXT")
    conn.execute("UPDATE trades SET his_msgid = msgid WHERE related IS NULL AND infno NOT IN ('9001', '9002')")
    conn.execute(f"CREATE UNIQUE INDEX {BY_HIS_MSGID} ON trades(his_msgid) WHERE his_msgid IS NOT NULL")


def _to_v6(conn: sqlite3.Connection) -> None:
    """What operators did through the admin socket (fep.audit), and trades leaving for the monthly archive
    files (fep.archive): a deleted trade no longer counts in its state."""
    conn.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, uid INTEGER, action TEXT NOT NULL, "
                 "args TEXT NOT NULL, result TEXT, done REAL)")
    conn.execute(f"CREATE INDEX {AUDIT_BY_TIME} ON audit(at)")
    conn.execute("CREATE TRIGGER trades_count_delete AFTER DELETE ON trades "
                 "BEGIN UPDATE state_counts SET n = n - 1 WHERE state = OLD.state; END")


def _to_v7(conn: sqlite3.Connection) -> None:
    """异地 patients and month-end clearing (issue 14).

    - insured_places: each person's insured region (参保地, insuplc_admdvs) from their last 1101 answer,
      written in the same write as that answer, so a later trade whose HIS left it empty is filled from it;
    - clearings: one row per month and group (insutype, setl_optins, clr_type), what was applied (3203),
      what the bureau approved and refused, and what the bank paid; clearing_events: every change of one,
      with who made it (a payment is entered by a person)."""
    conn.execute("CREATE TABLE insured_places (psn_no TEXT PRIMARY KEY, insuplc_admdvs TEXT NOT NULL, "
                 "msgid TEXT NOT NULL, at REAL NOT NULL)")
    conn.execute("CREATE TABLE clearings (month TEXT NOT NULL, insutype TEXT NOT NULL, setl_optins TEXT NOT NULL, "
                 "clr_type TEXT NOT NULL, state TEXT NOT NULL, settlements INTEGER NOT NULL, medfee TEXT NOT NULL, "
                 "fund TEXT NOT NULL, acct TEXT NOT NULL, cash TEXT NOT NULL, clr_appy_evt_id TEXT, "
                 "approved TEXT, refused TEXT, refusals TEXT, paid TEXT NOT NULL DEFAULT '0.00', "
                 "updated REAL NOT NULL, "
                 "PRIMARY KEY (month, insutype, setl_optins, clr_type))")
    conn.execute("CREATE TABLE clearing_events (id INTEGER PRIMARY KEY, month TEXT NOT NULL, grp TEXT NOT NULL, "
                 "at REAL NOT NULL, event TEXT NOT NULL, amount TEXT, note TEXT, by TEXT)")
    conn.execute("CREATE INDEX clearing_events_month ON clearing_events(month, id)")


def _to_v8(conn: sqlite3.Connection) -> None:
    """On PostgreSQL the archive (journal.keep_days) is a pair of tables in the shared database, which every
    node reads (journal_pg.archive_tables). On SQLite nothing changes: its archive is the monthly files."""
    if isinstance(conn, journal_pg.PgConnection):
        journal_pg.archive_tables(conn)


def _to_v9(conn: sqlite3.Connection) -> None:
    """An archived trade's msgid and HIS msgid name it forever: the HIS sending one again hears that trade, and
    the bureau is never sent one twice. PostgreSQL's archive table is searched by HIS msgid; SQLite's journal
    keeps the keys of what it moved to the monthly files (WITHOUT ROWID: about 70 bytes a trade), taken here
    from the files an earlier release wrote."""
    if isinstance(conn, journal_pg.PgConnection):
        conn.execute("CREATE INDEX archived_trades_his_msgid ON archived_trades (his_msgid) "
                     "WHERE his_msgid IS NOT NULL")
        return
    conn.execute("CREATE TABLE archived_keys (key TEXT PRIMARY KEY, msgid TEXT) WITHOUT ROWID")
    journal = Path(conn.execute("PRAGMA database_list").fetchone()[2])
    for _, path in monthly_files(journal):
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as month:
                if not month.execute("SELECT 1 FROM sqlite_master WHERE name = 'trades'").fetchone():
                    log.warn("journal: {file} holds no trades (empty): no msgids taken from it", file=path.name)
                    continue
                conn.executemany("INSERT OR IGNORE INTO archived_keys VALUES (?, NULL)",
                                 month.execute("SELECT msgid FROM trades"))
                conn.executemany("INSERT OR REPLACE INTO archived_keys VALUES (?, ?)", month.execute(
                    "SELECT his_msgid, msgid FROM trades WHERE his_msgid IS NOT NULL AND his_msgid != msgid"))
        except sqlite3.DatabaseError as e:  # not fep's to mend: the operator moves it away or restores it
            raise JournalError(f"archive file {path} cannot be read for the msgids it holds ({e}): restore it from "
                               f"the backup (or mend it), then start fep again. Moving it away instead forgets "
                               f"its trades' msgids: an HIS sending one again would make a new trade") from None


def monthly_files(journal: Path) -> list[tuple[str, Path]]:
    """Blocking: (YYYY-MM, file) of every monthly archive file beside a SQLite journal, newest first. An empty
    file (a `touch`, a copy that failed at once) holds nothing and is no archive file."""
    pattern = re.compile(rf"{re.escape(journal.stem)}-(\d{{4}}-\d{{2}})\.db")
    where = journal.parent
    found = [(m.group(1), p) for p in where.iterdir()
             if (m := pattern.fullmatch(p.name)) and p.stat().st_size > 0] if where.is_dir() else []
    return sorted(found, reverse=True)


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _to_v2, 3: _to_v3, 4: _to_v4, 6: _to_v6,
                                                             7: _to_v7, 8: _to_v8, 9: _to_v9}


def _state_counts(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    """Trades per state, kept by triggers in the same transaction as every insert and transition:
    metrics and `fep status` read them every few seconds, and a GROUP BY over a year of trades, on the
    writer thread, would hold up every trade behind it."""
    db["state_counts"].create({"state": str, "n": int}, pk="state")
    bump = "INSERT INTO state_counts (state, n) VALUES (NEW.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1;"
    conn.execute(f"CREATE TRIGGER trades_count_insert AFTER INSERT ON trades BEGIN {bump} END")
    conn.execute("CREATE TRIGGER trades_count_update AFTER UPDATE OF state ON trades "
                 f"WHEN OLD.state != NEW.state BEGIN UPDATE state_counts SET n = n - 1 WHERE state = OLD.state; "
                 f"{bump} END")


# --- helpers of the writer thread ----------------------------------------------------------------------
def _write_failure(e: BaseException) -> str | None:
    """What kept the disk from taking a write, or None when `e` is something else."""
    if isinstance(e, psycopg.Error):
        return journal_pg.write_failure(e)
    code = getattr(e, "sqlite_errorcode", None)
    return WRITE_FAILURES.get(code & 0xFF) if isinstance(e, sqlite3.Error) and code is not None else None


def _get(conn: sqlite3.Connection, msgid: str) -> TradeRow | None:
    rows = _fetch(conn, f"{_SELECT} INDEXED BY {BY_MSGID} WHERE msgid = ?", (msgid,))
    return TradeRow.from_db(rows[0]) if rows else None


def _archived_key(conn: sqlite3.Connection, key: str, his: bool = False) -> ArchivedKey | None:
    """The archived trade `key` names: with `his`, as its HIS msgid (an HIS msgid names its trade before an
    equal msgid of fep's, archived or not); else by any of its msgids. On PostgreSQL the archive's table itself;
    on SQLite the journal's record of the keys it moved to the monthly files (a key of its own msgid has none)."""
    if isinstance(conn, journal_pg.PgConnection):
        rows = _fetch(conn, f"SELECT msgid FROM archived_trades WHERE {'his_msgid' if his else 'msgid'} = ?", (key,))
    elif his:
        rows = _fetch(conn, "SELECT msgid FROM archived_keys WHERE key = ? AND msgid IS NOT NULL", (key,))
    else:
        rows = _fetch(conn, "SELECT coalesce(msgid, key) FROM archived_keys WHERE key = ?", (key,))
    return ArchivedKey(rows[0][0]) if rows else None


def _in_archive(conn: sqlite3.Connection, key: str) -> bool:
    """Whether any archived trade has `key` as its msgid or its HIS msgid (one statement, in the accept)."""
    if isinstance(conn, journal_pg.PgConnection):
        return bool(_fetch(conn, "SELECT 1 FROM archived_trades WHERE his_msgid = ? OR msgid = ? LIMIT 1", (key, key)))
    return bool(_fetch(conn, "SELECT 1 FROM archived_keys WHERE key = ?", (key,)))


def _by_his_msgid(conn: sqlite3.Connection, key: str) -> TradeRow | None:
    rows = _fetch(conn, f"{_SELECT} INDEXED BY {BY_HIS_MSGID} WHERE his_msgid = ?", (key,))
    return TradeRow.from_db(rows[0]) if rows else None


def _event(conn: sqlite3.Connection, msgid: str, at: float, event: str, state: State | None,
           note: str | None) -> None:
    conn.execute("INSERT INTO events (msgid, at, event, state, note) VALUES (?,?,?,?,?)",
                 (msgid, at, event, state.value if state else None, note))


# Moves a deposed leader must not make: a send, and a queued upload the new leader's recovery has not read (it
# would never be delivered). New trades are fenced likewise (Journal._accept).
FENCED = frozenset({State.SENT, State.QUEUED})


def _hold_epoch(conn: sqlite3.Connection, fence: int | None) -> None:
    """A new trade, or a move into FENCED, on a shared journal: only while `fence` is still the leader epoch. The
    row lock (FOR SHARE) holds a takeover's epoch bump until this write commits, so the new leader's recovery
    sees it; once the epoch moved on, the write fails: nothing is sent, nothing accepted. No fence (SQLite, one
    node): nothing to check."""
    if fence is not None and not conn.execute("SELECT 1 FROM leader WHERE epoch = ? FOR SHARE", (fence,)).fetchone():
        raise Fenced(f"leader epoch {fence} has ended: another node leads, this one accepts and sends nothing more")


def _transition(conn: sqlite3.Connection, msgid: str, event: str, note: str | None,
                fields: dict[str, Any], fence: int | None = None) -> TradeRow:
    bad = set(fields) - UPDATABLE
    if bad:
        raise ValueError(f"cannot set {sorted(bad)} on a transition")
    srcs, tgt = sources(event), target(event)
    if tgt in FENCED:
        _hold_epoch(conn, fence)
    now = time.time()
    fields = {k: (_body(v) if k in BODIES else v) for k, v in fields.items()}
    sets = "".join(f", {k}=?" for k in fields)
    if note is not None:
        sets += ", note=?"
    marks = ", ".join("?" * len(srcs))
    row = conn.execute(
        f"UPDATE trades SET state=?, updated=?{sets} WHERE msgid=? AND state IN ({marks}) RETURNING "
        f"{', '.join(COLUMNS)}",
        (tgt.value, now, *fields.values(), *([note] if note is not None else []), msgid,
         *(s.value for s in srcs)),
    ).fetchone()
    if row is None:
        current = _get(conn, msgid)
        raise IllegalTransition(msgid, event, current.state if current else None)
    _event(conn, msgid, now, event, tgt, note)
    return TradeRow.from_db(row)


# --- leaving for the archive, its files or its tables (fep.archive runs these through Journal.read and .run) -----
Raw = tuple[Any, ...]  # a trade's or an event's row exactly as stored: bodies stay as written (evidence)
EVENT_COLUMNS = ("id", "msgid", "at", "event", "state", "note")


@dataclass
class Family:
    """An original trade and its resolving trades, raw: they leave the journal together or not at all."""
    trades: list[Raw]
    events: list[Raw]

    @property
    def head(self) -> TradeRow:
        return TradeRow.from_db(self.trades[0])


def _finished(row: TradeRow, cutoff: float) -> bool:
    """Nothing more happens to it, nothing happened to it since `cutoff`, and the bureau holds no money by it (a
    settlement or cancel in force may still be cancelled, and refund order reads every later one)."""
    return row.state in FINAL and row.updated < cutoff and not (row.state in IN_FORCE and row.setl_id is not None)


def archivable(after: tuple[float, int], cutoff: float, limit: int) -> Callable[[sqlite3.Connection],
                                                                           tuple[list[Family], tuple[float, int]]]:
    """A read: of the next `limit` trades accepted before `cutoff` (from `after`, a (created, id) position,
    oldest first), the families that may leave; and the position the next batch starts from. A resolving
    trade is taken with its original; one whose original is still open stays with it. A few statements per
    batch, whatever its size: the batch, its originals still here, its resolving trades, their events."""

    def op(conn: sqlite3.Connection) -> tuple[list[Family], tuple[float, int]]:
        rows = _fetch(conn, f"{_SELECT} INDEXED BY {BY_TIME} WHERE created < ? AND (created, id) > (?, ?) "
                            f"ORDER BY created, id LIMIT ?", (cutoff, *after, limit))
        here = {r[0] for r in _fetch_in(conn, f"SELECT msgid FROM trades INDEXED BY {BY_MSGID} WHERE msgid",
                                        [r[RELATED] for r in rows if r[RELATED] is not None])}
        heads = [r for r in rows if r[RELATED] not in here]  # the others leave with their original
        members: dict[str, list[Raw]] = {r[1]: [r] for r in heads}
        for raw in sorted(_fetch_in(conn, f"{_SELECT} INDEXED BY {BY_RELATED} WHERE related", list(members))):
            members[raw[RELATED]].append(raw)  # by id, as they were made
        ready = [m for m in members.values() if all(_finished(TradeRow.from_db(t), cutoff) for t in m)]
        events: dict[str, list[Raw]] = {}
        for e in sorted(_fetch_in(conn, f"SELECT {', '.join(EVENT_COLUMNS)} FROM events INDEXED BY "
                                        f"idx_events_msgid WHERE msgid", [t[1] for m in ready for t in m])):
            events.setdefault(e[1], []).append(e)
        families = [Family(m, [e for t in m for e in events.get(t[1], [])]) for m in ready]
        last = rows[-1] if rows else None
        return families, ((last[COLUMNS.index("created")], last[0]) if last else after)

    return op


def forget(families: list[Family]) -> Callable[[sqlite3.Connection], list[Family]]:
    """A write: the families, now safe in an archive file, leave the journal; one that changed since it was
    read (a reconciliation reopened it) stays whole. Returns those that left."""

    def op(conn: sqlite3.Connection) -> list[Family]:
        gone = unchanged(conn, families)
        msgids = [t[1] for f in gone for t in f.trades]
        _keep_keys(conn, msgids)
        _leave(conn, msgids)
        return gone

    return op


def unchanged(conn: sqlite3.Connection, families: list[Family], lock: str = "") -> list[Family]:
    """In a write: the families whose every trade is in the journal as it was read (state and time of its
    last change). `lock`: " FOR UPDATE" on PostgreSQL, where another node's session may write meanwhile."""
    now = {(r[0], r[1], r[2]) for r in _fetch_in(
        conn, f"SELECT msgid, state, updated FROM trades INDEXED BY {BY_MSGID} WHERE msgid",
        [t[1] for f in families for t in f.trades], lock)}
    return [f for f in families if all((t[1], t[4], t[UPDATED]) in now for t in f.trades)]


def _keep_keys(conn: sqlite3.Connection, msgids: list[str]) -> None:
    """In the write that moves them to the monthly files: the trades' msgids and HIS msgids stay known (on
    PostgreSQL the archive's table is searched itself: _archived_key)."""
    if isinstance(conn, journal_pg.PgConnection):
        return
    # An HIS msgid names its trade before a msgid of fep's that is the same text, as in the journal (for_his):
    # it replaces such a key, and a msgid never replaces one.
    _run_in(conn, f"INSERT OR IGNORE INTO archived_keys SELECT msgid, NULL FROM trades INDEXED BY {BY_MSGID} "
                  f"WHERE msgid", msgids)
    _run_in(conn, f"INSERT OR REPLACE INTO archived_keys SELECT his_msgid, msgid FROM trades INDEXED BY {BY_MSGID} "
                  f"WHERE his_msgid IS NOT NULL AND his_msgid != msgid AND msgid", msgids)


def _leave(conn: sqlite3.Connection, msgids: list[str]) -> None:
    """In a write: the trades and their events leave the journal."""
    _run_in(conn, f"DELETE FROM trades INDEXED BY {BY_MSGID} WHERE msgid", msgids)
    _run_in(conn, "DELETE FROM events INDEXED BY idx_events_msgid WHERE msgid", msgids)


def archive_in_tables(families: list[Family]) -> Callable[[sqlite3.Connection], list[Family]]:
    """A write, on PostgreSQL: the families that did not change since they were read move to the archive tables
    (journal_pg.ARCHIVE_TABLES), copied and deleted in this one transaction, so a trade is never in neither
    nor in both. A copy already there (a restore brought the trade back) gives way to the journal's row."""

    def op(conn: sqlite3.Connection) -> list[Family]:
        gone = unchanged(conn, families, " FOR UPDATE")
        msgids = [t[1] for f in gone for t in f.trades]
        trades, events = ", ".join(COLUMNS), ", ".join(EVENT_COLUMNS)
        for table in ("archived_trades", "archived_events"):
            _run_in(conn, f"DELETE FROM {table} WHERE msgid", msgids)
        _run_in(conn, f"INSERT INTO archived_trades ({trades}) SELECT {trades} FROM trades WHERE msgid", msgids)
        _run_in(conn, f"INSERT INTO archived_events ({events}) SELECT {events} FROM events WHERE msgid", msgids)
        _leave(conn, msgids)
        return gone

    return op


def archive_filter(f: TradeFilter) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause and its values of `fep trades` over an archive (its files' or its tables')."""
    where, params = ["created BETWEEN ? AND ?"], [f.since if f.since is not None else EVER[0],
                                                   f.until if f.until is not None else EVER[1]]
    for clause, value in (("state = ?", f.state and f.state.value), ("psn_no = ?", f.psn_no),
                          ("infno = ?", f.infno)):
        if value is not None:
            where.append(clause)
            params.append(value)
    return " AND ".join(where), tuple(params)


_ARCHIVED = f"SELECT {', '.join(COLUMNS)} FROM archived_trades"
Archived = tuple[TradeRow, list[tuple[float, str, str, str]], list[TradeRow]]  # row, history, resolving trades


def archived(msgid: str) -> Callable[[sqlite3.Connection], Archived | None]:
    """A read, on PostgreSQL: an archived trade, its history and its resolving trades."""

    def op(conn: sqlite3.Connection) -> Archived | None:
        rows = _fetch(conn, f"{_ARCHIVED} WHERE msgid = ?", (msgid,))
        if not rows:
            return None
        history = _fetch(conn, "SELECT at, event, state, note FROM archived_events WHERE msgid = ? ORDER BY id",
                         (msgid,))
        related = _fetch(conn, f"{_ARCHIVED} WHERE related = ? ORDER BY id", (msgid,))
        return TradeRow.from_db(rows[0]), [tuple(h) for h in history], [TradeRow.from_db(r) for r in related]

    return op


def archived_matching(f: TradeFilter) -> Callable[[sqlite3.Connection], list[TradeRow]]:
    """A read, on PostgreSQL: the newest `f.limit` archived trades that match, newest first."""
    where, params = archive_filter(f)
    sql = f"{_ARCHIVED} WHERE {where} ORDER BY created DESC, id DESC LIMIT ?"
    return lambda conn: [TradeRow.from_db(r) for r in _fetch(conn, sql, (*params, f.limit))]


RELATED, UPDATED = COLUMNS.index("related"), COLUMNS.index("updated")
CHUNK = 500  # keys per `IN (...)`: padded to it, so each statement is one text (cached and planned once)


def _chunks(keys: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(keys), CHUNK):
        part = keys[i:i + CHUNK]
        yield part + [None] * (CHUNK - len(part))  # NULL matches nothing


def _fetch_in(conn: sqlite3.Connection, head: str, keys: list[Any], tail: str = "") -> list[Raw]:
    """`head IN (keys)`, read in chunks: every row of every chunk."""
    marks = ", ".join("?" * CHUNK)
    return [r for part in _chunks(keys) for r in _fetch(conn, f"{head} IN ({marks}){tail}", tuple(part))]


def _run_in(conn: sqlite3.Connection, head: str, keys: list[Any]) -> None:
    marks = ", ".join("?" * CHUNK)
    for part in _chunks(keys):
        conn.execute(f"{head} IN ({marks})", tuple(part))


# --- the audit trail (fep.audit runs these through Journal.run and Journal.read) ----------------------------
AUDIT_COLUMNS = ("id", "at", "uid", "action", "args", "result", "done")


def audit_begin(uid: int | None, action: str, args: dict[str, Any]) -> Callable[[sqlite3.Connection], int]:
    """A write, before the action runs: a crash in the middle leaves it recorded, without a result."""
    text = envelope.dumps(args).decode("utf-8")
    return lambda conn: conn.execute("INSERT INTO audit (at, uid, action, args) VALUES (?,?,?,?)",
                                     (time.time(), uid, action, text)).lastrowid


def audit_end(entry: int, result: str) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET result = ?, done = ? WHERE id = ?", (result, time.time(), entry))

    return op


def audit_between(since: float, until: float, limit: int) -> Callable[[sqlite3.Connection], list[Raw]]:
    """A read: the newest `limit` actions begun in [since, until], oldest first."""
    return lambda conn: _fetch(conn, f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit INDEXED BY {AUDIT_BY_TIME} "
                                     f"WHERE at BETWEEN ? AND ? ORDER BY at DESC LIMIT ?", (since, until, limit))[::-1]


# --- 异地 persons and month-end clearing (schema 7): named queries, run through Journal.run / Journal.read ----------
# Each write below is one op, so one durable write on the journal's writer; each read is one op on a reader.
def answer_with_place(msgid: str, fields: dict[str, Any], psn_no: str, insuplc_admdvs: str) -> Op:
    """A 1101's answer and the person's insured region it names, in one write."""

    def op(conn: sqlite3.Connection) -> TradeRow:
        row = _transition(conn, msgid, "answer", None, fields)
        conn.execute("INSERT INTO insured_places VALUES (?,?,?,?) ON CONFLICT(psn_no) DO UPDATE SET "
                     "insuplc_admdvs=excluded.insuplc_admdvs, msgid=excluded.msgid, at=excluded.at",
                     (psn_no, insuplc_admdvs, msgid, time.time()))
        return row

    return op


def insured_place(psn_no: str) -> Callable[[sqlite3.Connection], str | None]:
    """The person's insured region from their last 1101 answer; None: fep has seen no 1101 of theirs."""
    def op(conn: sqlite3.Connection) -> str | None:
        rows = _fetch(conn, "SELECT insuplc_admdvs FROM insured_places WHERE psn_no = ?", (psn_no,))
        return rows[0][0] if rows else None

    return op


CLEARING_COLUMNS = ("month", "insutype", "setl_optins", "clr_type", "state", "settlements", "medfee", "fund", "acct",
                    "cash", "clr_appy_evt_id", "approved", "refused", "refusals", "paid", "updated")
Group = tuple[str, str, str]  # (insutype, setl_optins, clr_type)


def _clearing_row(conn: sqlite3.Connection, month: str, group: Group) -> dict[str, Any] | None:
    rows = _fetch(conn, f"SELECT {', '.join(CLEARING_COLUMNS)} FROM clearings WHERE month = ? AND insutype = ? AND "
                        f"setl_optins = ? AND clr_type = ?", (month, *group))
    return dict(zip(CLEARING_COLUMNS, rows[0])) if rows else None


def _clearing_event(conn: sqlite3.Connection, month: str, group: Group, event: str, amount: Any = None,
                    note: str | None = None, by: str | None = None) -> None:
    conn.execute("INSERT INTO clearing_events (month, grp, at, event, amount, note, by) VALUES (?,?,?,?,?,?,?)",
                 (month, "/".join(group), time.time(), event, None if amount is None else str(amount), note, by))


def clearing_applied(month: str, group: Group, totals: dict[str, Any], evt_id: str, by: str) -> Op:
    """The bureau took the month's application (3203) for the group: its figures and clr_appy_evt_id."""

    def op(conn: sqlite3.Connection) -> dict[str, Any]:
        conn.execute("INSERT INTO clearings (month, insutype, setl_optins, clr_type, state, settlements, medfee, "
                     "fund, acct, cash, clr_appy_evt_id, updated) VALUES (?,?,?,?,'applied',?,?,?,?,?,?,?) "
                     "ON CONFLICT(month, insutype, setl_optins, clr_type) DO UPDATE SET state='applied', "
                     "settlements=excluded.settlements, "
                     "medfee=excluded.medfee, fund=excluded.fund, acct=excluded.acct, cash=excluded.cash, "
                     "clr_appy_evt_id=excluded.clr_appy_evt_id, approved=NULL, refused=NULL, refusals=NULL, "
                     "updated=excluded.updated",
                     (month, *group, totals["settlements"], str(totals["medfee"]), str(totals["fund"]),
                      str(totals["acct"]), str(totals["cash"]), evt_id, time.time()))
        _clearing_event(conn, month, group, "applied", totals["fund"], f"clr_appy_evt_id {evt_id}", by)
        return _clearing_row(conn, month, group)  # type: ignore[return-value]

    return op


def clearing_cancelled(month: str, group: Group, evt_id: str, by: str) -> Op:
    """The bureau cancelled the application (3204)."""

    def op(conn: sqlite3.Connection) -> dict[str, Any]:
        conn.execute("UPDATE clearings SET state='cancelled', updated=? WHERE month = ? AND insutype = ? AND "
                     "setl_optins = ? AND clr_type = ?", (time.time(), month, *group))
        _clearing_event(conn, month, group, "cancelled", None, f"clr_appy_evt_id {evt_id}", by)
        return _clearing_row(conn, month, group)  # type: ignore[return-value]

    return op


def clearing_audited(month: str, group: Group, approved: str, refused: str, refusals: list[dict[str, Any]]) -> Op:
    """What the bureau's audit says of the application (the status trade): approved, refused (拒付) and why.
    An unchanged answer is not recorded again."""

    def op(conn: sqlite3.Connection) -> dict[str, Any]:
        text = envelope.dumps(refusals).decode("utf-8")
        before = _clearing_row(conn, month, group)
        if before and (before["approved"], before["refused"], before["refusals"]) != (approved, refused, text):
            conn.execute("UPDATE clearings SET approved=?, refused=?, refusals=?, updated=? WHERE month = ? AND "
                         "insutype = ? AND setl_optins = ? AND clr_type = ?",
                         (approved, refused, text, time.time(), month, *group))
            _clearing_event(conn, month, group, "audited", approved, f"refused {refused}")
        return _clearing_row(conn, month, group)  # type: ignore[return-value]

    return op


def clearing_paid(month: str, group: Group, amount: str, note: str, by: str) -> Op:
    """A disbursement (拨付) from the bank's notice, entered by a person (`by`), against an application in
    force; LookupError without one, ValueError for a notice already entered."""

    def op(conn: sqlite3.Connection) -> dict[str, Any]:
        row = _clearing_row(conn, month, group)
        if row is None:
            raise LookupError(f"no clearing application for {month} {'/'.join(group)}")
        if row["state"] != "applied":
            raise LookupError(f"the clearing application for {month} {'/'.join(group)} is {row['state']}")
        entered = _fetch(conn, "SELECT at, by FROM clearing_events INDEXED BY clearing_events_month WHERE "
                               "month = ? AND grp = ? AND event = 'paid' AND note = ?", (month, "/".join(group), note))
        if entered:
            at = time.strftime("%Y-%m-%d %H:%M", time.localtime(entered[0][0]))
            raise ValueError(f"the bank notice {note!r} was entered already ({entered[0][1]}, {at}): a notice "
                             f"is paid once")
        conn.execute("UPDATE clearings SET paid=?, updated=? WHERE month = ? AND insutype = ? AND setl_optins = ? "
                     "AND clr_type = ?", (str(Decimal(row["paid"]) + Decimal(amount)), time.time(), month, *group))
        _clearing_event(conn, month, group, "paid", amount, note, by)
        return _clearing_row(conn, month, group)  # type: ignore[return-value]

    return op


def clearings_of(month: str) -> Callable[[sqlite3.Connection], list[dict[str, Any]]]:
    def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        return [dict(zip(CLEARING_COLUMNS, r)) for r in _fetch(
            conn, f"SELECT {', '.join(CLEARING_COLUMNS)} FROM clearings WHERE month = ? "
                  f"ORDER BY insutype, setl_optins, clr_type", (month,))]

    return op


def clearing_history(month: str) -> Callable[[sqlite3.Connection], list[dict[str, Any]]]:
    def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        cols = ("grp", "at", "event", "amount", "note", "by")
        return [dict(zip(cols, r)) for r in _fetch(
            conn, f"SELECT {', '.join(cols)} FROM clearing_events INDEXED BY clearing_events_month WHERE month = ? "
                  f"ORDER BY id", (month,))]

    return op


# --- the office's views: reconciliation's watch and the console (read-only named queries) -------------
ANSWERED_STATES = (State.ANSWERED, State.AWAITING_CONFIRM, State.CONFIRMED)  # the bureau's answer is kept
QUARTER = 900  # s: trades are counted per quarter hour of Unix time, which every time zone's hours are made of


def latest_runs(kind: str, first: str, last: str) -> Callable[[sqlite3.Connection], dict[str, dict[str, Any]]]:
    """The newest run of each key from `first` to `last` (ISO days sort as they follow), newest key first: a
    month's statement days in one statement, not one each."""
    def op(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
        return {key: envelope.loads(doc) for key, doc in _fetch(
            conn, "SELECT key, doc FROM runs WHERE id IN (SELECT max(id) FROM runs INDEXED BY runs_key "
                  "WHERE kind = ? AND key BETWEEN ? AND ? GROUP BY key) ORDER BY key DESC", (kind, first, last))}

    return op


def trade_counts(since: float, until: float) -> Callable[[sqlite3.Connection], list[tuple[float, str, str, int]]]:
    """How many trades were accepted in [since, until], per quarter hour (its start), trade number and state;
    counted in the store, no row read out."""
    def op(conn: sqlite3.Connection) -> list[tuple[float, str, str, int]]:
        return [(float(q) * QUARTER, infno, state, n) for q, infno, state, n in _fetch(
            conn, f"SELECT floor(created / {QUARTER}) AS q, infno, state, count(*) FROM trades INDEXED BY {BY_TIME} "
                  f"WHERE created BETWEEN ? AND ? GROUP BY q, infno, state", (since, until))]

    return op


def answered_outcomes(since: float, until: float) -> Callable[[sqlite3.Connection], dict[tuple[str, str, bool | None],
                                                                                     int]]:
    """Of the answered trades accepted in [since, until], how many per trade number and state the bureau said
    yes to (True), no to (False), or whose answer is empty or cannot be read (None). Only the answer's infcode
    is read (a 9102's answer holds a whole file), here on the reader thread."""
    def op(conn: sqlite3.Connection) -> dict[tuple[str, str, bool | None], int]:
        out: dict[tuple[str, str, bool | None], int] = {}
        for infno, state, answer in _fetch(
                conn, f"SELECT infno, state, answer FROM trades INDEXED BY {BY_TIME} WHERE created BETWEEN ? AND ? "
                      f"AND state IN ({_states(ANSWERED_STATES)})", (since, until)):
            text = body_text(answer) if answer is not None else ""
            try:
                ok: bool | None = str(envelope.top_field(text, "infcode")).strip() == "0" if text else None
            except ValueError:
                ok = None
            out[infno, state, ok] = out.get((infno, state, ok), 0) + 1
        return out

    return op
