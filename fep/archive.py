"""The archive: finished trades older than `journal.keep_days` leave the journal, where `fep show` and `fep
trades` still read them (merged by msgid, the journal's row first). Where they go is the backend's:
- SQLite: one file per month beside the journal (journal-2025-03.db for journal.db), `MonthlyFiles`;
- PostgreSQL: the archive tables of the same database (`ArchiveTables`; journal_pg.ARCHIVE_TABLES). Both nodes
  of a pair read them, whichever node led when they were moved; they are in pg_dump and in the replicas, and
  the move is one transaction (copy and delete), with no window in which a trade is in both or in neither.
  Monthly files an earlier release wrote beside journal.path are taken into the tables when the node starts,
  before it takes a trade (`Archive.take_in`): until then no node would know their msgids.

What never leaves the journal:
- a trade that is not final (open, or parked for a person), nor one whose resolving trades are not; a trade and
  its resolving trades leave together, into the month of the original;
- a settlement or a cancel the bureau holds in force: it may still be cancelled (2208/2305 are allowed after
  clearing), and refund order (fep.refunds) needs every later settlement of the person;
- a trade that moves money (conf/trades.yaml) of a day not reconciled and balanced, nor of the day before one
  that is not (the bureau's settlement time may be after midnight): reconciliation may still find the bureau
  holds it and reopen it. With no reconciliation stored, nothing that moves money leaves;
- a trade changed since it was read for the move.

Moving into files is crash-safe and idempotent, in bounded batches: a batch is written into its month's file
and committed there (synchronous=FULL: on the disk) before it is deleted from the journal; a crash in between
leaves it in both, and the next run writes it again (INSERT OR REPLACE) and deletes it. Reads look in the
journal first. Each batch is a few statements, whatever its size. Every file operation runs on the reactor's
thread pool, the journal's part on its own threads. On PostgreSQL only the leader runs the daily job (fep.daemon
starts the daily jobs at takeover), and the record of its last run is in the shared journal.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from fep import journal_pg, systemd
from fep.backup import fsync
from fep.journal import (COLUMNS, EVENT_COLUMNS, EVER, Family, Journal, JournalError, TradeFilter, TradeRow,
                         archive_filter, archive_in_tables, archivable, archived, archived_matching, forget,
                         monthly_files)
from fep.states import State

log = Logger()
T = TypeVar("T")
BATCH = 500  # trades read per batch: one batch holds the journal's writer for a few milliseconds
TAKE_IN_BYTES_PER_S = 2e6  # of a month's file copied into PostgreSQL, bodies and all: a cautious rate
_TRADES = (f"CREATE TABLE IF NOT EXISTS trades (id INTEGER PRIMARY KEY, msgid TEXT NOT NULL UNIQUE, "
           f"{', '.join(c for c in COLUMNS if c not in ('id', 'msgid'))})")  # no types: bodies stay as stored
_SCHEMA = (_TRADES,
           "CREATE INDEX IF NOT EXISTS trades_created ON trades(created)",
           "CREATE INDEX IF NOT EXISTS trades_psn_no ON trades(psn_no, created)",
           "CREATE INDEX IF NOT EXISTS trades_related ON trades(related) WHERE related IS NOT NULL",
           f"CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, {', '.join(EVENT_COLUMNS[1:])})",
           "CREATE INDEX IF NOT EXISTS events_msgid ON events(msgid)")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM trades"
Found = tuple[TradeRow, list[tuple[float, str, str, str]], list[TradeRow], str]  # row, history, resolving, where


def month_of(family: Family) -> str:
    return datetime.fromtimestamp(family.head.created).strftime("%Y-%m")


class Archive:
    """What may leave the journal and when; where it goes is the store's (the module's docstring)."""

    def __init__(self, reactor: Any, journal: Journal, keep_days: int | None, money: Iterable[str],
                 batch: int = BATCH) -> None:
        self.reactor, self.journal, self.keep_days, self.batch = reactor, journal, keep_days, batch
        self.money = frozenset(money)  # trade numbers that move money: they wait for their day's reconciliation
        self._one_at_a_time = defer.DeferredLock()  # two runs at once: the second would delete the first's copies
        self.monthly = MonthlyFiles(reactor, journal)  # on PostgreSQL: what an earlier release left on this node
        self.tables = ArchiveTables(journal) if journal.url else None
        self.store: MonthlyFiles | ArchiveTables = self.tables or self.monthly

    def files(self) -> list[tuple[str, Path]]:
        """Blocking: (YYYY-MM, file) of every monthly archive file beside the journal, newest first."""
        return self.monthly.files()

    # --- moving ------------------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Move what may leave, batch by batch; what was moved, and into which months. One run at a time: a
        second caller (another operator, the nightly job) waits for the run under way, then finds what is left."""
        waited = self._one_at_a_time.locked
        result = await self._one_at_a_time.run(lambda: defer.ensureDeferred(self._run()))
        return {**result, "waited": True} if waited else result

    async def take_in(self, strict: bool = False) -> list[str]:
        """PostgreSQL: the monthly files an earlier release wrote on this node, into the archive tables, whose
        msgids every node then knows (fep.engine asks for_his); the names of the files taken in."""
        return await self.tables.take_in(self.monthly, strict) if self.tables is not None else []

    async def _run(self) -> dict[str, Any]:
        if self.keep_days is None:
            return {"moved": 0, "months": [], "note": "journal.keep_days is not set: every trade stays"}
        taken = await self.take_in()  # a file restored beside journal.path since the start
        cutoff = time.time() - self.keep_days * 86400
        after, moved, months = (EVER[0], 0), 0, set()
        reconciled: dict[date, bool] = {}
        while True:
            families, following = await self.journal.read(archivable(after, cutoff, self.batch))
            if following == after:
                break
            after = following
            ready = [f for f in families if await self._reconciled(f, reconciled)]
            if ready:
                gone = await self.store.move(ready)
                moved += sum(len(f.trades) for f in gone)
                months |= {month_of(f) for f in gone}
        log.info("archive: {moved} finished trades older than {days} days moved to {into}", moved=moved,
                 days=self.keep_days, into=self.store.names(sorted(months)))
        return {"moved": moved, "months": sorted(months), "keep_days": self.keep_days, "into": self.store.INTO,
                **({"taken_in": taken} if taken else {})}

    async def _reconciled(self, family: Family, known: dict[date, bool]) -> bool:
        """Every money trade of the family is of a day reconciled and balanced, and so is the day after it."""
        for raw in family.trades:
            row = TradeRow.from_db(raw)
            if row.infno not in self.money or row.state is State.NOT_SENT:
                continue
            day = date.fromtimestamp(row.created)
            for d in (day, day + timedelta(days=1)):
                if d not in known:
                    runs = await self.journal.runs("reconcile", d.isoformat())
                    known[d] = bool(runs) and not runs[0]["unbalanced"] and not runs[0]["unresolved"]
                if not known[d]:
                    return False
        return True

    # --- reading -----------------------------------------------------------------------------------------------
    async def get(self, msgid: str) -> Found | None:
        found = await self.store.get(msgid)
        if found is None and self.tables is not None:  # files an earlier release wrote on this node
            found = await self.monthly.get(msgid)
        return found

    async def row(self, msgid: str) -> TradeRow | None:
        found = await self.get(msgid)
        return found[0] if found is not None else None

    async def find(self, f: TradeFilter) -> list[TradeRow]:
        """The newest `limit` archived trades that match, oldest first."""
        rows = await self.store.find(f)
        if self.tables is not None:
            seen = {r.msgid for r in rows}
            rows += [r for r in await self.monthly.find(f) if r.msgid not in seen]
            rows.sort(key=lambda r: (r.created, r.id))
        return rows[-f.limit:]


class ArchiveTables:
    """PostgreSQL: the archive tables of the journal's own database, moved into and read through the journal."""
    INTO = "the archive tables"

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def names(self, months: list[str]) -> str:
        return f"archived_trades ({', '.join(months)})" if months else "nothing"

    async def move(self, families: list[Family]) -> list[Family]:
        """One write: those that had not changed are in the archive tables and no longer in the journal."""
        return await self.journal.run(archive_in_tables(families))

    async def take_in(self, files: MonthlyFiles, strict: bool = False) -> list[str]:
        """The monthly files an earlier release wrote beside journal.path on this node, into the tables where
        every node reads them; each file is then renamed (NAME.in-postgresql) and kept until an operator
        removes it. Returns the names of the files taken in. `strict` (at start): a file that cannot be taken
        in is a JournalError naming it, since no node would know its msgids; otherwise it is logged and stays."""
        taken = []
        for _, path in await files.thread(files.files):
            # a year's file may take a while: systemd is told, as for a migration
            systemd.notify(f"EXTEND_TIMEOUT_USEC={int((60 + path.stat().st_size / TAKE_IN_BYTES_PER_S) * 1e6)}\n"
                           f"STATUS=archive: taking {path.name} into archived_trades")
            try:
                added, kept = await files.thread(self._take_in, path)
            except Exception as e:
                if strict:
                    raise JournalError(f"archive file {path} cannot be taken into archived_trades ({e}); until it "
                                       f"is, no node knows its trades' msgids: mend or restore it, then start fep "
                                       f"again") from None
                log.failure("archive: {file} could not be taken into archived_trades; it stays, read on this node",
                            file=path.name)
                continue
            log.info("archive: {added} trades of {file}, written on this node by an earlier release, taken into "
                     "archived_trades; the file is kept as {kept}", added=added, file=path.name,
                     kept=kept.name)
            taken.append(path.name)
        return taken

    def _take_in(self, path: Path) -> tuple[int, Path]:
        """Blocking: one file into the tables (one transaction), then out of the reads: the trades added, and
        the file's new name."""
        with closing(_reader(path)) as conn:
            added = journal_pg.take_in(self.journal.url, _chunks(conn, "trades", COLUMNS[1:]),  # type: ignore[arg-type]
                                       _chunks(conn, "events", EVENT_COLUMNS[1:]), COLUMNS[1:], EVENT_COLUMNS[1:])
        return added, journal_pg.retire(path)

    async def get(self, msgid: str) -> Found | None:
        found = await self.journal.read(archived(msgid))
        return None if found is None else (*found, "archived_trades")

    async def find(self, f: TradeFilter) -> list[TradeRow]:
        return (await self.journal.read(archived_matching(f)))[::-1]


class MonthlyFiles:
    """SQLite: one archive file per month beside the journal."""
    INTO = "the archive files"

    def __init__(self, reactor: Any, journal: Journal) -> None:
        self.reactor, self.journal = reactor, journal

    def thread(self, f: Callable[..., T], *args: Any) -> Any:
        """Blocking file work, on the reactor's thread pool."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def path(self, month: str) -> Path:
        return self.journal.path.with_name(f"{self.journal.path.stem}-{month}.db")

    def names(self, months: list[str]) -> str:
        return ", ".join(self.path(m).name for m in months) or "no file"

    def files(self) -> list[tuple[str, Path]]:
        """Blocking: (YYYY-MM, file) of every archive file, newest first."""
        return monthly_files(self.journal.path)

    async def move(self, families: list[Family]) -> list[Family]:
        """Into their months' files (on the disk), then out of the journal; those that changed meanwhile stay in
        the journal only. Returns those that left."""
        await self.thread(self._store, families)
        gone = await self.journal.run(forget(families))
        left = {f.trades[0][1] for f in gone}  # a set: a batch's families against a batch's, on the reactor
        stale = [f for f in families if f.trades[0][1] not in left and await self._in_journal(f)]
        if stale:  # changed while it was copied: it stays in the journal only
            await self.thread(self._discard, stale)
        return gone

    async def _in_journal(self, family: Family) -> bool:
        """A family `forget` left is in the journal still (changed); one no longer there left it another way
        (moved by an earlier run): its archive copy is then its only one and stays."""
        return any([await self.journal.get(t[1]) is not None for t in family.trades])

    def _by_month(self, families: list[Family]) -> dict[str, list[Family]]:
        by_month: dict[str, list[Family]] = {}
        for f in families:
            by_month.setdefault(month_of(f), []).append(f)
        return by_month

    def _store(self, families: list[Family]) -> None:
        """Blocking: each family into its month's file, committed (and so on the disk) when this returns."""
        for month, group in self._by_month(families).items():
            path = self.path(month)
            new = not path.exists()
            with closing(self._open(path)) as conn:
                with conn:
                    conn.executemany(f"INSERT OR REPLACE INTO trades ({', '.join(COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(COLUMNS))})", [t for f in group for t in f.trades])
                    conn.executemany(f"INSERT OR REPLACE INTO events ({', '.join(EVENT_COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(EVENT_COLUMNS))})", [e for f in group for e in f.events])
            if new:
                fsync(path.parent)

    def _discard(self, families: list[Family]) -> None:
        """Blocking: copies of trades that stayed in the journal after all."""
        for month, group in self._by_month(families).items():
            msgids = [(t[1],) for f in group for t in f.trades]
            with closing(self._open(self.path(month))) as conn:
                with conn:
                    conn.executemany("DELETE FROM trades WHERE msgid = ?", msgids)
                    conn.executemany("DELETE FROM events WHERE msgid = ?", msgids)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # personal data, as the journal
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            conn.execute(statement)
        return conn

    async def get(self, msgid: str) -> Found | None:
        return await self.thread(self._get, msgid)

    def _get(self, msgid: str) -> Found | None:
        for _, path in self.files():
            with closing(_reader(path)) as conn:
                rows = conn.execute(f"{_SELECT} WHERE msgid = ?", (msgid,)).fetchall()
                if rows:
                    history = conn.execute("SELECT at, event, state, note FROM events WHERE msgid = ? ORDER BY id",
                                           (msgid,)).fetchall()
                    related = conn.execute(f"{_SELECT} WHERE related = ? ORDER BY id", (msgid,)).fetchall()
                    return (TradeRow.from_db(rows[0]), history, [TradeRow.from_db(r) for r in related], path.name)
        return None

    async def find(self, f: TradeFilter) -> list[TradeRow]:
        return await self.thread(self._find, f)

    def _find(self, f: TradeFilter) -> list[TradeRow]:
        """The newest `limit` archived trades that match, newest month first (a month's resolving trades may
        have been made in the next month: a file is read while it may hold any)."""
        since = f.since if f.since is not None else EVER[0]
        until = f.until if f.until is not None else EVER[1]
        where, params = archive_filter(f)
        found: list[TradeRow] = []
        for month, path in self.files():
            start = datetime.strptime(month, "%Y-%m").timestamp()
            if start > until or start + 62 * 86400 < since:
                continue
            if len(found) >= f.limit and start + 62 * 86400 < found[f.limit - 1].created:
                break
            with closing(_reader(path)) as conn:
                found += [TradeRow.from_db(r) for r in conn.execute(
                    f"{_SELECT} WHERE {where} ORDER BY created DESC, id DESC LIMIT ?", (*params, f.limit)).fetchall()]
            found.sort(key=lambda r: (r.created, r.id), reverse=True)
        return found[:f.limit][::-1]


def _reader(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def _chunks(conn: sqlite3.Connection, table: str, columns: tuple[str, ...]) -> Iterator[list[tuple[Any, ...]]]:
    """A file's rows of `table`, without their ids, BATCH at a time in id order."""
    after = -1
    while rows := conn.execute(f"SELECT id, {', '.join(columns)} FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                               (after, BATCH)).fetchall():
        after = rows[-1][0]
        yield [r[1:] for r in rows]

