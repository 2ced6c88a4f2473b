"""Backups of the live journal: `fep backup PATH`, and the daily copy that keeps the newest `backup.keep` (and
a copy of each monthly archive file that changed since the last one: they are needed for a whole restore).

The copy is SQLite's online backup API in one step: one read transaction, so the copy is the journal as
committed at one moment. In WAL mode a reader holds up neither the writer nor the reactor (a paged backup
would start over at every commit of the writer, and a busy fep commits all the time). The copy is written
beside its destination, checked whole (PRAGMA integrity_check), fsynced and only then renamed into place:
a backup that exists is a good one. It runs on a thread, never on the reactor.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger()
STAMP = "%Y%m%d-%H%M%S"


class BackupError(Exception):
    """The copy could not be made or did not pass its check; the message names the file and why."""


def copy(journal: Path, dest: Path, replace: bool = False) -> dict[str, Any]:
    """Blocking. A checked copy of `journal` at `dest` (a directory: a file named for now in it); an existing
    `dest` is refused, or with `replace` replaced once the new copy is good."""
    if dest.is_dir():
        dest = dest / f"{journal.stem}-{datetime.now().strftime(STAMP)}.db"
    if dest.exists() and not replace:
        raise BackupError(f"{dest} exists: give another name, or remove it first")
    partial = dest.with_name(f".{dest.name}.partial")
    started = time.monotonic()
    _clean_stale(dest.parent)
    try:
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # personal data: 0600 as the journal
    except OSError as e:
        raise BackupError(f"cannot write {dest}: {e.strerror or e}") from None
    try:
        trades = _copy(journal, partial, dest)
        fsync(partial)
        os.rename(partial, dest)
        fsync(dest.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"path": str(dest), "bytes": dest.stat().st_size, "trades": trades, "integrity_check": "ok",
            "seconds": round(time.monotonic() - started, 3)}


STALE = 3600  # s a partial copy has not been written to: its backup was killed (kill -9, a power cut)
PARTIAL = re.compile(r"\..+\.db\.partial")


def _clean_stale(directory: Path) -> None:
    """Partial copies a killed backup left (hidden: nothing else would ever remove them). One another backup is
    writing now is recent, and stays."""
    now = time.time()
    for p in directory.iterdir() if directory.is_dir() else ():
        try:
            if PARTIAL.fullmatch(p.name) and now - p.stat().st_mtime > STALE:
                p.unlink()
                log.warn("removed {path}, a partial copy left by a backup that did not finish", path=str(p))
        except FileNotFoundError:  # removed meanwhile
            pass


def _copy(journal: Path, target: Path, named: Path) -> int:
    """Copies into `target`; errors name `named`, the file the operator asked for (not the hidden partial)."""
    try:
        with closing(sqlite3.connect(journal, isolation_level=None)) as src, \
                closing(sqlite3.connect(target, isolation_level=None)) as dst:
            src.execute("PRAGMA query_only=ON")
            src.backup(dst)  # every page in one step: one snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, not a WAL database
            problems = [r[0] for r in dst.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise BackupError(f"the copy for {named} fails PRAGMA integrity_check: {'; '.join(problems[:5])}")
            return int(dst.execute("SELECT count(*) FROM trades").fetchone()[0])
    except sqlite3.Error as e:
        raise BackupError(f"cannot copy {journal} to {named}: {e}") from None


def fsync(path: Path) -> None:
    """A file's bytes, or a directory's entries (a rename into it), on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(directory: Path, stem: str, keep: int) -> list[Path]:
    """Remove all but the newest `keep` daily copies (named stem-YYYYmmdd-HHMMSS.db); returns those removed."""
    pattern = re.compile(rf"{re.escape(stem)}-\d{{8}}-\d{{6}}\.db")
    copies = sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))
    old = copies[:-keep] if keep > 0 else copies
    for p in old:
        p.unlink()
    return old


def refresh(files: list[Path], directory: Path) -> list[Path]:
    """Blocking: a checked copy in `directory`, under its own name, of each file changed since its last copy
    there (the monthly archive files: written only by the archive job). Returns the copies made."""
    made = []
    for src in files:
        dest = directory / src.name
        if not dest.exists() or dest.stat().st_mtime < src.stat().st_mtime:
            copy(src, dest, replace=True)
            made.append(dest)
    return made


class Backups:
    """Copies of the journal (and of its monthly archive files), made on the reactor's thread pool."""

    def __init__(self, reactor: Any, journal: Path, directory: Path | None, keep: int,
                 archives: Callable[[], list[Path]] = list) -> None:
        self.reactor, self.journal, self.directory, self.keep = reactor, journal, directory, keep
        self.archives = archives  # blocking: the archive files beside the journal

    def _thread(self, f: Any, *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def write(self, dest: Path) -> dict[str, Any]:
        done = await self._thread(copy, self.journal, dest)
        log.info("journal backed up to {path}: {trades} trades, {bytes} bytes, integrity_check ok, in {seconds} s",
                 **done)
        return done

    async def daily(self) -> dict[str, Any]:
        """The schedule's copy into backup.dir; then only the newest backup.keep stay."""
        if self.directory is None:
            raise BackupError("backup.dir is not set")
        await self._thread(lambda: self.directory.mkdir(parents=True, exist_ok=True))  # type: ignore[union-attr]
        done = await self.write(self.directory)
        removed = await self._thread(prune, self.directory, self.journal.stem, self.keep)
        if removed:
            log.info("old backups removed, the newest {keep} kept: {names}", keep=self.keep,
                     names=", ".join(p.name for p in removed))
        done["removed"] = [str(p) for p in removed]
        archived = await self._thread(lambda: refresh(self.archives(), self.directory))  # type: ignore[arg-type]
        if archived:
            log.info("archive files backed up to {dir}: {names}", dir=self.directory,
                     names=", ".join(p.name for p in archived))
        done["archives"] = [str(p) for p in archived]
        return done
