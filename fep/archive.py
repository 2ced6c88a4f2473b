"""Monthly archive files: finished trades older than `journal.keep_days` leave the journal for one SQLite file
per month beside it (journal-2025-03.db for journal.db), where `fep show` and `fep trades` still read them.

What never leaves the journal:
- a trade that is not final (open, or parked for a person), nor one whose resolving trades are not; a trade and
  its resolving trades leave together, into the month of the original;
- a settlement or a cancel the bureau holds in force: it may still be cancelled (2208/2305 are allowed after
  clearing), and refund order (fep.refunds) needs every later settlement of the person;
- a trade that moves money (conf/trades.yaml) of a day not reconciled and balanced, nor of the day before one
  that is not (the bureau's settlement time may be after midnight): reconciliation may still find the bureau
  holds it and reopen it. With no reconciliation stored, nothing that moves money leaves;
- a trade changed since it was read for the move.

Moving is crash-safe and idempotent, in bounded batches: a batch is written into its month's file and
committed there (synchronous=FULL: on the disk) before it is deleted from the journal; a crash in between
leaves it in both, and the next run writes it again (INSERT OR REPLACE) and deletes it. Reads look in the
journal first. Every file operation runs on the reactor's thread pool, the journal's part on its own threads.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from contextlib import closing
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from fep.backup import fsync
from fep.journal import COLUMNS, EVENT_COLUMNS, EVER, Family, Journal, TradeFilter, TradeRow, archivable, forget
from fep.states import State

log = Logger()
T = TypeVar("T")
BATCH = 500  # trades read per batch: one batch holds the journal's writer for a few milliseconds
_TRADES = (f"CREATE TABLE IF NOT EXISTS trades (id INTEGER PRIMARY KEY, msgid TEXT NOT NULL UNIQUE, "
           f"{', '.join(c for c in COLUMNS if c not in ('id', 'msgid'))})")  # no types: bodies stay as stored
_SCHEMA = (_TRADES,
           "CREATE INDEX IF NOT EXISTS trades_created ON trades(created)",
           "CREATE INDEX IF NOT EXISTS trades_psn_no ON trades(psn_no, created)",
           "CREATE INDEX IF NOT EXISTS trades_related ON trades(related) WHERE related IS NOT NULL",
           f"CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, {', '.join(EVENT_COLUMNS[1:])})",
           "CREATE INDEX IF NOT EXISTS events_msgid ON events(msgid)")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM trades"
Found = tuple[TradeRow, list[tuple[float, str, str, str]], list[TradeRow], str]  # row, history, resolving, file


class Archive:
    def __init__(self, reactor: Any, journal: Journal, keep_days: int | None, money: Iterable[str],
                 batch: int = BATCH) -> None:
        self.reactor, self.journal, self.keep_days, self.batch = reactor, journal, keep_days, batch
        self.money = frozenset(money)  # trade numbers that move money: they wait for their day's reconciliation
        self._one_at_a_time = defer.DeferredLock()  # two runs at once: the second would delete the first's copies
        self._pattern = re.compile(rf"{re.escape(journal.path.stem)}-(\d{{4}}-\d{{2}})\.db")

    def _thread(self, f: Callable[..., T], *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def path(self, month: str) -> Path:
        return self.journal.path.with_name(f"{self.journal.path.stem}-{month}.db")

    def files(self) -> list[tuple[str, Path]]:
        """Blocking: (YYYY-MM, file) of every archive file, newest first."""
        where = self.journal.path.parent
        found = [(m.group(1), p) for p in where.iterdir() if (m := self._pattern.fullmatch(p.name))] \
            if where.is_dir() else []
        return sorted(found, reverse=True)

    # --- moving ------------------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Move what may leave, batch by batch; what was moved, and into which files. One run at a time: a
        second caller (another operator, the nightly job) waits for the run under way, then finds what is left."""
        waited = self._one_at_a_time.locked
        result = await self._one_at_a_time.run(lambda: defer.ensureDeferred(self._run()))
        return {**result, "waited": True} if waited else result

    async def _run(self) -> dict[str, Any]:
        if self.keep_days is None:
            return {"moved": 0, "months": [], "note": "journal.keep_days is not set: every trade stays"}
        cutoff = time.time() - self.keep_days * 86400
        after, moved, months = (EVER[0], 0), 0, set()
        reconciled: dict[date, bool] = {}
        while True:
            families, following = await self.journal.read(archivable(after, cutoff, self.batch))
            if following == after:
                break
            after = following
            ready = [f for f in families if await self._reconciled(f, reconciled)]
            if not ready:
                continue
            months |= await self._thread(self._store, ready)
            gone = await self.journal.run(forget(ready))
            stale = [f for f in ready if all(f is not g for g in gone) and await self._in_journal(f)]
            if stale:  # changed while it was copied: it stays in the journal only
                await self._thread(self._discard, stale)
            moved += sum(len(f.trades) for f in gone)
        log.info("archive: {moved} finished trades older than {days} days moved to {files}", moved=moved,
                 days=self.keep_days, files=", ".join(self.path(m).name for m in sorted(months)) or "no file")
        return {"moved": moved, "months": sorted(months), "keep_days": self.keep_days}

    async def _in_journal(self, family: Family) -> bool:
        """A family `forget` left is in the journal still (changed); one no longer there left it another way
        (moved by an earlier run): its archive copy is then its only one and stays."""
        return any([await self.journal.get(t[1]) is not None for t in family.trades])

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

    def _store(self, families: list[Family]) -> set[str]:
        """Blocking: each family into its month's file, committed (and so on the disk) when this returns."""
        by_month: dict[str, list[Family]] = {}
        for f in families:
            by_month.setdefault(datetime.fromtimestamp(f.head.created).strftime("%Y-%m"), []).append(f)
        for month, group in by_month.items():
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
        return set(by_month)

    def _discard(self, families: list[Family]) -> None:
        """Blocking: copies of trades that stayed in the journal after all."""
        for f in families:
            path = self.path(datetime.fromtimestamp(f.head.created).strftime("%Y-%m"))
            with closing(self._open(path)) as conn:
                with conn:
                    for t in f.trades:
                        conn.execute("DELETE FROM trades WHERE msgid = ?", (t[1],))
                        conn.execute("DELETE FROM events WHERE msgid = ?", (t[1],))

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # personal data, as the journal
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            conn.execute(statement)
        return conn

    # --- reading -----------------------------------------------------------------------------------------------
    async def get(self, msgid: str) -> Found | None:
        return await self._thread(self._get, msgid)

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
        return await self._thread(self._find, f)

    def _find(self, f: TradeFilter) -> list[TradeRow]:
        """The newest `limit` archived trades that match, newest month first (a month's resolving trades may
        have been made in the next month: a file is read while it may hold any)."""
        since = f.since if f.since is not None else EVER[0]
        until = f.until if f.until is not None else EVER[1]
        where, params = ["created BETWEEN ? AND ?"], [since, until]
        for clause, value in (("state = ?", f.state and f.state.value), ("psn_no = ?", f.psn_no),
                              ("infno = ?", f.infno)):
            if value is not None:
                where.append(clause)
                params.append(value)
        found: list[TradeRow] = []
        for month, path in self.files():
            start = datetime.strptime(month, "%Y-%m").timestamp()
            if start > until or start + 62 * 86400 < since:
                continue
            if len(found) >= f.limit and start + 62 * 86400 < found[f.limit - 1].created:
                break
            with closing(_reader(path)) as conn:
                found += [TradeRow.from_db(r) for r in conn.execute(
                    f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY created DESC, id DESC LIMIT ?",
                    (*params, f.limit)).fetchall()]
            found.sort(key=lambda r: (r.created, r.id), reverse=True)
        return found[:f.limit][::-1]


def _reader(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
