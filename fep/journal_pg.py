"""The journal on PostgreSQL (journal.url: postgresql://...): its connections and its schema.

fep.journal runs every named query through a connection object; here that object is `PgConnection`, which
speaks psycopg 3 and takes the journal's statements through fep.dialect, so each query is written once. The
writer keeps the journal's promises on PostgreSQL's terms: one transaction per batch (group commit), durable
when PostgreSQL says so (synchronous_commit on, set on the writer's session, whatever the server's default).
Readers see one snapshot per read (REPEATABLE READ, READ ONLY), as a SQLite read transaction does.

A session that is gone (PostgreSQL restarted, the network down) is opened again at the next transaction;
the write that met it is a write failure (`write_failure`), held and tried again as a full disk is.

Long requests and answers are stored as their text: PostgreSQL compresses long values itself (TOAST), so
the journal's own zlib streams are unpacked before they are written.
"""

from __future__ import annotations

import time
import uuid
import zlib
from contextlib import contextmanager
from enum import IntEnum, unique
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import psycopg
from psycopg import pq

from fep import dialect
from fep.backup import fsync

CONNECT_TIMEOUT = 5  # seconds: a journal that cannot be reached in this time is a write failure, tried again
# A session whose node is gone (power, network) is noticed within about idle + interval * count seconds and
# ended: its locks (the leader's lease, fep.leader) are released with it.
# Both ends: libpq's keepalives tell this node, the server's (set per session) tell PostgreSQL.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1, "keepalives_count": 3,
              "options": "-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 "
                         "-c tcp_user_timeout=5000"}
READ_PATIENCE = 30.0  # seconds a read waits for a database that is not there (restarting) before it fails
# A writer's commit writes its token under a meta key of its own, `last_commit:` and the writer's id: under one
# shared key another node's commit (a standby's audit row) would overwrite it, and a lost commit that happened
# would be taken as not done and written again. The key goes when the writer closes (a killed node's stays).
COMMIT_TOKEN = "last_commit"


@unique
class Lock(IntEnum):
    """The journal database's advisory lock keys, in one place: two uses sharing a key wait on each other (a
    take-in under the lease's key waits on the leader for as long as it leads)."""
    SCHEMA = 0x66657001  # xact: two nodes starting at once create the schema once
    LEASE = 0x66657002  # session: the leader's lease (fep.leader)
    CODEBOOK_TAKE_IN = 0x66657003  # xact: nodes taking in their own code-book files, one after the other
    ARCHIVE_TAKE_IN = 0x66657004  # xact: two nodes taking in copies of one monthly file, one after the other


# A node frozen (SIGSTOP, a paused VM) inside a transaction holds its locks while its kernel still answers the
# keepalives: the writer's hold of the leader row (fep.journal `_hold_epoch`) would keep a standby's takeover
# waiting for as long. PostgreSQL ends such a session after this long, well inside the 10 s takeover budget;
# a live node's transactions never sit idle for a fraction of it.
IDLE_IN_TRANSACTION_MS = 4000
IDLE_IN_TRANSACTION_SINCE = 90600  # server_version_num of PostgreSQL 9.6, the first with that setting


def write_failure(e: BaseException) -> str | None:
    """What kept PostgreSQL from taking a write, or None when `e` is something else (a wrong statement)."""
    if isinstance(e, psycopg.errors.DiskFull):  # (an OperationalError too: asked first)
        return "disk full"
    if isinstance(e, psycopg.OperationalError):  # AdminShutdown among them: the server going down
        return "database unreachable"
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
        return "read-only"  # a hot standby: the URL names a replica, or the primary was demoted
    return None


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    host, db = info.get("host", "localhost"), info.get("dbname", "")
    return f"postgresql://{info.get('user', '')}@{host}:{info.get('port', 5432)}/{db}"


def connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **KEEPALIVES, **options)


# What an earlier release kept in a node's own files (its code book, its monthly archive files) is taken into the
# shared database once, and the file then kept under this suffix, no longer read, until an operator removes it.
RETIRED = ".in-postgresql"


@contextmanager
def taking_in(url: str, lock: Lock) -> Iterator[psycopg.Cursor[Any]]:
    """Blocking: a session of its own (the journal's writer goes on meanwhile) and one transaction for copying a
    node's file in, durable before the caller retires the file, one node at a time."""
    with connect(url) as pg, pg.transaction(), pg.cursor() as cur:
        cur.execute("SET LOCAL synchronous_commit = on")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (int(lock),))
        yield cur


def retire(path: Path) -> Path:
    """A file once taken in: renamed NAME.in-postgresql, the rename on the disk. Returns the new path."""
    kept = path.with_name(path.name + RETIRED)
    path.rename(kept)
    fsync(path.parent)
    return kept


class Result:
    """What a statement gave, as the journal reads a sqlite3 cursor: rows, rowcount, lastrowid."""

    def __init__(self, cur: psycopg.Cursor[Any] | None, numbered: bool) -> None:
        self._cur = cur
        self.rowcount = cur.rowcount if cur is not None else -1
        self.lastrowid: int | None = None
        if numbered and cur is not None and self.rowcount == 1:
            self.lastrowid = cur.fetchone()[0]  # type: ignore[index]

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cur.fetchone() if self._cur is not None and self._cur.description else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._cur.fetchall() if self._cur is not None and self._cur.description else []

    def __iter__(self) -> Any:
        return iter(self.fetchall())


class PgConnection:
    """One session on the journal's database, opened again at the next BEGIN when it was lost (a reader's is
    first opened there).

    A commit whose answer is lost (the server restarted, the network dropped at that moment) may or may not
    have happened: the writer's commit also writes a token of its own into `meta`, and such a commit is then
    settled by asking, on a new session, whether the token is there, waiting until the database can say. So a
    trade is never refused as "nothing accepted" when it was journalled, nor held as journalled when not.
    """

    def __init__(self, url: str, reader: bool, unsettled: Callable[[str], None] | None = None) -> None:
        self.url = url
        self._reader = reader
        # told why, while a commit is being settled: the journal refuses new trades meanwhile, not holding them
        self._unsettled = unsettled or (lambda why: None)
        self._pg: psycopg.Connection[Any] | None = None
        self.total_changes = 0  # rows written through this connection, as sqlite3's counter
        self._wrote = False  # this transaction has written: its commit carries a token
        self._token_key = f"{COMMIT_TOKEN}:{uuid.uuid4().hex[:16]}"
        if not reader:
            self._open()  # a journal that cannot be written is refused at start; a reader connects at its BEGIN

    def _open(self) -> None:
        self._pg = connect(self.url)
        if self._reader:
            self._pg.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        else:
            self._pg.execute("SET synchronous_commit = on")
        end_frozen_transactions(self._pg)

    @property
    def _lost(self) -> bool:
        return self._pg is None or self._pg.closed or self._pg.broken

    @property
    def in_transaction(self) -> bool:
        """A lost session holds no transaction: the server rolled it back when the session ended."""
        return not self._lost and self._pg.info.transaction_status != pq.TransactionStatus.IDLE  # type: ignore[union-attr]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        text = dialect.to_postgres(sql)
        if text is None:
            return Result(None, False)
        if text == "BEGIN":
            return self._begin()
        if text == "COMMIT":
            return self._commit()
        if text == "ROLLBACK":
            return self._rollback()
        cur = self._pg.execute(text, [_param(p) for p in params] if params else None)  # type: ignore[union-attr]
        if cur.rowcount > 0 and not text.startswith("SELECT"):
            self.total_changes += cur.rowcount
            self._wrote = True
        return Result(cur, text.endswith(" RETURNING id") and "RETURNING" not in sql.upper())

    def _begin(self) -> Result:
        """A transaction on a live session: one found dead at BEGIN (the server restarted since the last
        transaction) is opened again; nothing was done on it yet, so nothing is lost. The writer tries once
        more (its writes are held and tried again by the journal); a reader waits up to READ_PATIENCE for the
        database, so a lookup during a restart of PostgreSQL is answered late rather than failed."""
        self._wrote = False
        give_up = time.monotonic() + (READ_PATIENCE if self._reader else 0)
        tries = 0
        while True:
            tries += 1
            try:
                if self._lost:
                    self._open()
                self._pg.execute("BEGIN")  # type: ignore[union-attr]
                return Result(None, False)
            except psycopg.OperationalError:
                self._drop()
                if tries >= 2 and time.monotonic() >= give_up:
                    raise
                if tries >= 2:
                    time.sleep(0.5)

    def _rollback(self) -> Result:
        """A session that died is rolled back already (the server did it): a read's answer, had before, stands."""
        try:
            if not self._lost:
                self._pg.execute("ROLLBACK")  # type: ignore[union-attr]
        except psycopg.OperationalError:
            self._drop()
        return Result(None, False)

    def _commit(self) -> Result:
        if not self._wrote:
            self._pg.execute("COMMIT")  # type: ignore[union-attr]
            return Result(None, False)
        token = uuid.uuid4().hex
        try:
            self._pg.execute(f"INSERT INTO meta VALUES ('{self._token_key}', '{token}') ON CONFLICT (key) "  # type: ignore[union-attr]
                             f"DO UPDATE SET value = excluded.value; COMMIT")
        except psycopg.OperationalError as e:
            self._drop()
            if not self._committed(token):
                raise e
        return Result(None, False)

    def _committed(self, token: str) -> bool:
        """Whether the commit that wrote `token` happened, asked on a new session until one answers."""
        while True:
            try:
                self._open()
                row = self._pg.execute("SELECT value FROM meta WHERE key = %s", (self._token_key,)).fetchone()  # type: ignore[union-attr]
                return row is not None and row[0] == token
            except psycopg.OperationalError as e:
                self._drop()
                self._unsettled(f"PostgreSQL cannot be reached to learn whether the last commit happened ({e})")
                time.sleep(1.0)

    def _drop(self) -> None:
        if self._pg is not None:
            self._pg.close()
        self._pg = None

    def close(self) -> None:
        if not self._reader and not self._lost:
            try:
                self._pg.execute("DELETE FROM meta WHERE key = %s", (self._token_key,))  # type: ignore[union-attr]
            except psycopg.Error:
                pass  # the database is gone: the key stays, a row of meta
        self._drop()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many rows (the code book's batches of a catalog), pipelined by psycopg: one round
        trip for the batch, not one a row."""
        if not rows:
            return
        with self._pg.cursor() as cur:  # type: ignore[union-attr]
            cur.executemany(dialect.to_postgres(sql), [[_param(p) for p in row] for row in rows])  # type: ignore[arg-type]
        self.total_changes += len(rows)
        self._wrote = True


def end_frozen_transactions(pg: psycopg.Connection[Any]) -> None:
    """This session's transactions are ended by PostgreSQL, their locks released, when this node stops in one."""
    if pg.info.server_version >= IDLE_IN_TRANSACTION_SINCE:
        pg.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")


def _param(value: Any) -> Any:
    """A body the journal compressed is stored as its text (PostgreSQL compresses it itself)."""
    return zlib.decompress(value).decode("utf-8") if isinstance(value, bytes) else value


# --- the schema -----------------------------------------------------------------------------------------
# A PostgreSQL journal starts at this schema (there is nothing older to migrate from); later versions are
# fep.journal MIGRATIONS, run through PgConnection as on SQLite.
BASE_VERSION = 7
SCHEMA = f"""
CREATE TABLE trades (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, msgid TEXT NOT NULL, infno TEXT NOT NULL, psn_no TEXT,
    state TEXT NOT NULL, payload_hash TEXT NOT NULL, request TEXT NOT NULL, answer TEXT, late_answer TEXT,
    related TEXT, resolver TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_try DOUBLE PRECISION,
    deadline DOUBLE PRECISION, endpoint TEXT, note TEXT, setl_id TEXT, cancels TEXT,
    created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL, his_msgid TEXT);
CREATE UNIQUE INDEX idx_trades_msgid ON trades (msgid);
CREATE INDEX idx_trades_psn_no_id ON trades (psn_no, id);
CREATE INDEX trades_state ON trades (state, created);
CREATE INDEX trades_infno ON trades (infno, created);
CREATE INDEX trades_created ON trades (created);
CREATE INDEX trades_related ON trades (related) WHERE related IS NOT NULL;
CREATE INDEX trades_settled ON trades (created) WHERE setl_id IS NOT NULL;
CREATE UNIQUE INDEX trades_his_msgid ON trades (his_msgid) WHERE his_msgid IS NOT NULL;
CREATE TABLE events (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, msgid TEXT, at DOUBLE PRECISION,
    event TEXT, state TEXT, note TEXT);
CREATE INDEX idx_events_msgid ON events (msgid);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE runs (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, kind TEXT, key TEXT,
    at DOUBLE PRECISION, doc TEXT);
CREATE INDEX runs_kind ON runs (kind, id);
CREATE INDEX runs_key ON runs (kind, key, id);
CREATE TABLE state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE FUNCTION fep_state_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO state_counts VALUES (NEW.state, 1) ON CONFLICT (state) DO UPDATE SET n = state_counts.n + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER trades_count AFTER INSERT OR DELETE ON trades FOR EACH ROW EXECUTE FUNCTION fep_state_count();
CREATE TRIGGER trades_count_update AFTER UPDATE OF state ON trades FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION fep_state_count();
CREATE TABLE audit (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, at DOUBLE PRECISION NOT NULL,
    uid INTEGER, action TEXT NOT NULL, args TEXT NOT NULL, result TEXT, done DOUBLE PRECISION);
CREATE INDEX audit_at ON audit (at);
CREATE TABLE insured_places (psn_no TEXT PRIMARY KEY, insuplc_admdvs TEXT NOT NULL, msgid TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL);
CREATE TABLE clearings (month TEXT NOT NULL, insutype TEXT NOT NULL, setl_optins TEXT NOT NULL,
    clr_type TEXT NOT NULL, state TEXT NOT NULL, settlements INTEGER NOT NULL, medfee TEXT NOT NULL,
    fund TEXT NOT NULL, acct TEXT NOT NULL, cash TEXT NOT NULL, clr_appy_evt_id TEXT, approved TEXT, refused TEXT,
    refusals TEXT, paid TEXT NOT NULL DEFAULT '0.00', updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (month, insutype, setl_optins, clr_type));
CREATE TABLE clearing_events (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, month TEXT NOT NULL,
    grp TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, event TEXT NOT NULL, amount TEXT, note TEXT, by TEXT);
CREATE INDEX clearing_events_month ON clearing_events (month, id);
CREATE TABLE leader (one INTEGER PRIMARY KEY CHECK (one = 1), epoch BIGINT NOT NULL, node TEXT,
    since DOUBLE PRECISION);
INSERT INTO leader VALUES (1, 0, NULL, NULL);
INSERT INTO meta VALUES ('schema', '{BASE_VERSION}');
"""


# Schema 8 (fep.journal MIGRATIONS): the archive (fep.archive). Finished trades older than journal.keep_days
# leave trades/events for these, in the same database: in the dump and the replicas, read by every node. The
# rows keep their ids; state_counts does not count them. A column added to trades or events later is added
# to these in the same migration.
ARCHIVE_TABLES = """
CREATE TABLE archived_trades (LIKE trades INCLUDING DEFAULTS, PRIMARY KEY (id));
CREATE UNIQUE INDEX archived_trades_msgid ON archived_trades (msgid);
CREATE INDEX archived_trades_created ON archived_trades (created);
CREATE INDEX archived_trades_psn_no ON archived_trades (psn_no, created);
CREATE INDEX archived_trades_related ON archived_trades (related) WHERE related IS NOT NULL;
CREATE TABLE archived_events (LIKE events, PRIMARY KEY (id));
CREATE INDEX archived_events_msgid ON archived_events (msgid);
"""


def archive_tables(conn: PgConnection) -> None:
    """In the migration's transaction: the archive's tables."""
    for statement in _statements(ARCHIVE_TABLES):
        conn.execute(statement)



def take_in(url: str, trades: Iterable[list[tuple[Any, ...]]], events: Iterable[list[tuple[Any, ...]]],
            trade_columns: Sequence[str], event_columns: Sequence[str]) -> int:
    """Blocking, on a session of its own (a month's file is big: the journal's writer goes on meanwhile): the
    rows of a monthly archive file, read in chunks (columns without `id`), into the archive tables in one
    transaction. Each row takes a new id from its journal table's own numbering, so it clashes with no row
    there nor in the archive, whatever journal wrote the file. A trade already archived (a copy of the file
    was taken in on the other node) stays as it is, and so do its events. Returns the trades added."""
    msgid, at = list(trade_columns).index("msgid"), list(event_columns).index("msgid")
    added: set[str] = set()
    with taking_in(url, Lock.ARCHIVE_TAKE_IN) as cur:
        for chunk in trades:
            have = {r[0] for r in cur.execute("SELECT msgid FROM archived_trades WHERE msgid = ANY(%s)",
                                              ([t[msgid] for t in chunk],)).fetchall()}
            new = [t for t in chunk if t[msgid] not in have]
            cur.executemany(_numbered("archived_trades", "trades", trade_columns), [[_param(v) for v in t] for t in new])
            added |= {t[msgid] for t in new}
        for chunk in events:  # in the file's order, so a trade's history keeps its order
            cur.executemany(_numbered("archived_events", "events", event_columns),
                            [e for e in chunk if e[at] in added])
    return len(added)


def _numbered(table: str, numbering: str, columns: Sequence[str]) -> str:
    return (f"INSERT INTO {table} (id, {', '.join(columns)}) VALUES (nextval(pg_get_serial_sequence('{numbering}', "
            f"'id')), {', '.join(['%s'] * len(columns))})")


def create_schema(conn: PgConnection) -> bool:
    """In the caller's transaction: the schema, unless it is there. True when it was created now."""
    conn.execute(f"SELECT pg_advisory_xact_lock({Lock.SCHEMA:d})")
    if conn.execute("SELECT to_regclass('trades')").fetchone()[0] is not None:  # type: ignore[index]
        return False
    for statement in _statements(SCHEMA):
        conn.execute(statement)
    return True


def _statements(script: str) -> list[str]:
    """The script's statements; a $$ body's semicolons stay inside its statement."""
    out, part, quoted = [], [], False
    for piece in script.split(";"):
        part.append(piece)
        quoted ^= piece.count("$$") % 2 == 1
        if not quoted:
            text = ";".join(part).strip()
            if text:
                out.append(text)
            part = []
    return out


# --- the code book's tables (fep.codebook writes them in SQL both databases speak) ----------------------
def schema_lock(conn: PgConnection) -> None:
    """Held to the end of the caller's transaction: nodes starting at once create the tables once (two
    CREATE TABLE IF NOT EXISTS racing can both try, and one fails)."""
    conn.execute(f"SELECT pg_advisory_xact_lock({Lock.SCHEMA:d})")


def columns(conn: PgConnection, table: str) -> list[str]:
    """The columns `table` has (SQLite's pragma_table_info, asked of PostgreSQL)."""
    return [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                       "WHERE table_schema = current_schema() AND table_name = ?", (table,))]
