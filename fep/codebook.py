"""The bureau's catalogs (医保目录 and the other 13xx lists) and the hospital's code mapping (目录对照).

Both live in the journal's database, SQLite's file or PostgreSQL's (one code book for every node sharing the
journal), written through the journal's writer and read on its reader threads: each catalog in its own table
(`catalog_1301`, ...) in its real layout (fep.catalogs), upserted by code and version for the downloaded files
(1301–1327: file_qury_no, then 9102) and by rid for the paged queries (1312, 1316–1319, followed to the last
page); the mapping in `medlist_map`. The SQL is written once, in what both databases speak (CREATE TABLE IF NOT
EXISTS, INSERT ... ON CONFLICT DO UPDATE), and goes to PostgreSQL through the journal's dialect. A file is
unpacked and parsed on a thread and stored in batches, so a big catalog neither blocks the reactor nor holds the
writer from trades for long; a mapping CSV is read and checked on a thread too.

An earlier release kept a pair's code book in each node's own SQLite file at journal.path. A node starting on
PostgreSQL copies what the shared tables lack of that file's into them (`CodeBook.take_in`), once, then keeps
the file as NAME.in-postgresql (as fep.archive keeps the monthly files it takes in), no longer read.

Fee lines (2204, 2301) that carry only the hospital's own code are mapped to national codes before they are
journalled, from an in-memory copy refreshed after every change (on a shared journal only the leader maps, and
changes, them: its copy is refreshed when it takes the lead, fep.daemon): an unmapped item, or one mapped to a
retired or unknown code, refuses the trade with one error naming every such item, instead of a reject from the
bureau later.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger

from fep import catalogs, envelope, journal_pg
from fep.catalogs import VALID, VERSION, Layout, Paged
from fep.jobs import progress
from fep.trades import InvalidInput, TradeDef
from fep.journal import Journal

if TYPE_CHECKING:
    import psycopg

log = Logger()

MAP_COLUMNS = ("hosp_code", "national_code", "hosp_name")
MAP_KEY = ("hosp_code",)
BATCH = 1000  # catalog rows per journal write (some 80 ms of the writer for 1301): trades go between batches
PAGE_SIZE = 100  # rows asked per page of a paged query (the interface caps its paged 3260 at 100)
VISIT_TIMES = ("begntime", "adm_time", "endtime")  # a visit's date, the first of these a trade's input has
FIRST_UPDATE = "2000-01-01"  # a first paged query asks after this (updt_time is required)
# A paged query's run that reached its last page, kept with the newest update it brought: the next run asks
# from that date (updt_time is a date, yyyy-MM-dd, asked with >=: a repeat is upserted away by rid)
PAGED_RUN = "catalog-paged"


@dataclass(frozen=True)
class Entry:
    code: str
    name: str
    catalog: str  # the trade it came with (1301, 1305, ...)
    valid: bool
    ver: str


@dataclass(frozen=True)
class Diagnosis:
    name: str
    retired: str | None  # the date (yyyy-MM-dd) its newest versions retired it from; "" retired from the start


T = TypeVar("T")
Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class CodeBook:
    def __init__(self, journal: Journal, reactor: Any) -> None:
        self.journal = journal
        self.reactor = reactor  # its thread pool parses files and mapping CSVs
        self.national: dict[str, Entry] = {}
        self.mapping: dict[str, str] = {}
        self.diagnoses: dict[str, dict[str, Diagnosis]] = {}  # diagnosis catalog (1307, ...) -> code -> state

    async def open(self) -> None:
        await self.journal.run(partial(_schema, shared=self.journal.url is not None))
        await self.refresh()

    async def refresh(self) -> None:
        self.national, self.mapping, self.diagnoses = await self.journal.read(_load)

    # ---- the hot path ----------------------------------------------------------------------------
    def leaves_as_sent(self, trade: TradeDef, input_: dict[str, Any]) -> bool:
        """Whether map_fees will leave the input as the HIS sent it: every fee line names its national code."""
        lines = input_.get(trade.map_codes or "")
        return not isinstance(lines, list) or _national_codes(lines) is not None

    def map_fees(self, trade: TradeDef, input_: dict[str, Any]) -> bool:
        """Fill med_list_codg from the mapping where the HIS sent only its own code; refuse what cannot go.
        A national code is judged once per upload: its 5,000 lines name a few hundred codes at most. Whether
        it filled any (the input is no longer what the HIS sent)."""
        lines = input_.get(trade.map_codes or "")
        if not isinstance(lines, list):
            return False
        codes = _national_codes(lines)
        if codes is not None and not any(map(self.national_problem, codes)):
            return False  # every line names a national code already, and each is in the catalog
        filled = False
        problems = []
        judged: dict[str, str | None] = {}
        for line in lines:
            if not isinstance(line, dict):
                continue
            national = str(line.get("med_list_codg") or "")
            if not national:
                national = self.mapping.get(str(line.get("medins_list_codg") or ""), "")
                if not national:
                    problems.append(f"{_item(line)}: no mapping to a national code")
                    continue
                line["med_list_codg"] = national
                filled = True
            if national not in judged:
                judged[national] = self.national_problem(national)
            if judged[national]:
                problems.append(f"{_item(line)}: {judged[national]}")
        if problems:
            raise InvalidInput(f"{trade.infno} {trade.name}: {len(problems)} fee item(s) cannot be uploaded: "
                               f"{'; '.join(problems)}. Fix the mapping (fep catalog map import) or the items")
        return filled

    def national_problem(self, code: str) -> str | None:
        return _problem(self.national, code)

    def check_diagnoses(self, trade: TradeDef, input_: dict[str, Any]) -> None:
        """Refuse diagnoses the bureau's catalog does not know, or had retired by the diagnosis's date."""
        node = trade.check_diagnoses or ""
        lines = input_.get(node)
        visit = visit_day(input_, node)
        problems = [p for line in (lines if isinstance(lines, list) else [lines]) if isinstance(line, dict)
                    and (p := self.diagnosis_problem(line, visit))]
        if problems:
            raise InvalidInput(f"{trade.infno} {trade.name}: {len(problems)} diagnosis code(s) cannot be used: "
                               f"{'; '.join(problems)}. Correct the diagnoses in the HIS (or bring the catalog "
                               f"current: fep catalog sync)")

    def diagnosis_problem(self, line: dict[str, Any], visit: tuple[str, str] | None = None) -> str | None:
        """`visit`: (the visit's date, where it was read), the date of a line without diag_time."""
        if str(line.get("vali_flag", "1")) == "0":
            return None  # a diagnosis withdrawn (作废): the code it withdraws may since have retired
        infno = catalogs.DIAGNOSIS_CATALOGS.get(str(line.get("diag_type") or "1"), "1307")
        book = self.diagnoses.get(infno)
        if not book:
            return None  # that catalog is not downloaded: the bureau is the judge
        code = str(line.get("diag_code") or "")
        if line.get("diag_time"):
            day, source = str(line["diag_time"])[:10], "its diag_time"
        else:
            day, source = visit or (datetime.now().strftime("%Y-%m-%d"), "today: no diag_time and no visit date")
        known = book.get(code)
        if known is None:
            named = f" ({line['diag_name']})" if line.get("diag_name") else ""
            return f"{code or '(no code)'}{named}: not in the bureau's catalog {infno}"
        if known.retired is not None and day >= known.retired:
            since = f" since {known.retired}" if known.retired else ""
            return f"{code} ({known.name}): retired in catalog {infno}{since}, diagnosed {day} ({source})"
        return None

    # ---- people's work: import, check, sync --------------------------------------------------------
    async def import_mapping(self, text: str) -> dict[str, Any]:
        """CSV with a header: hosp_code, national_code[, hosp_name]. Replaces the mapping of those codes."""
        rows = await self.on_thread(_mapping_rows, text)
        await self.journal.run(lambda conn: conn.executemany(_upsert("medlist_map", MAP_COLUMNS, MAP_KEY), rows))
        await self.refresh()
        return {"imported": len(rows), "problems": await self.on_thread(self.check)}

    async def take_in(self, local: Path) -> dict[str, Any] | None:
        """At start on PostgreSQL: the code book an earlier release kept in this node's own file at journal.path
        (`local`), into the shared tables (`_take_in`), then out of the way. Each node does it at its own
        start, not at takeover: each file is on its own node, and a standby's would wait for a lead that may
        never come. What it took in is logged; a file that cannot be taken in is logged and stays, for the next
        start to try again; the node starts either way. None: there was nothing to take in."""
        if self.journal.url is None:
            return None  # on SQLite that file is the journal, and the code book is in it
        try:
            taken = await self.on_thread(_take_in, self.journal.url, local)
        except Exception:
            log.failure("code book: {file}, left by an earlier release, could not be taken into the shared "
                        "tables; it stays, and the next start tries again", file=str(local))
            return None
        if taken is None:
            return None
        log.info("code book: {file}, written on this node by an earlier release, taken into the shared tables: "
                 "{added}; the file is kept as {kept}", file=taken["file"], kept=taken["kept"],
                 added=", ".join(f"{n} new row(s) of {t}" for t, n in taken["added"].items()) or "nothing new")
        if taken["differs"]:
            log.warn("code book: the mapping in {file} differs from the shared one in {n} hospital code(s) ({codes}); "
                     "the shared mapping stays, as the node that started first brought it: if it is not the "
                     "right one, import the right one on the leader (fep catalog map import)", file=taken["file"],
                     n=len(taken["differs"]), codes=", ".join(taken["differs"][:10]))
        await self.refresh()
        return taken

    def on_thread(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def check(self) -> list[dict[str, str]]:
        """Items with no mapping, or mapped to a retired or unknown code. Safe on a thread: a refresh replaces
        the copies whole, never changes them in place."""
        national, mapping = self.national, self.mapping
        out = []
        for hosp, code in sorted(mapping.items()):
            problem = "no mapping to a national code" if not code else _problem(national, code)
            if problem:
                out.append({"hosp_code": hosp, "national_code": code, "problem": problem})
        return out

    async def sync(self, call: Call) -> dict[str, Any]:
        """Download what is new in each catalog since the local version, then follow each paged query to its
        last page. A catalog the bureau refuses is named in the result; the others are still brought current."""
        result: dict[str, dict[str, Any]] = {}
        steps: list[tuple[str, str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            *((t.infno, t.title, partial(self._download, call, t)) for t in catalogs.LAYOUTS.values()),
            *((t.infno, t.title, partial(self._pages, call, t)) for t in catalogs.PAGED.values())]
        for n, (infno, title, step) in enumerate(steps, start=1):
            progress(f"catalog sync {n} of {len(steps)}: {infno} {title}")
            result[infno] = await self._attempt(step())
            log.info("catalog sync {n}/{of}: {infno} {title}: {result}", n=n, of=len(steps), infno=infno,
                     title=title, result=result[infno])
        await self.refresh()
        doc = {"run_at": datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "downloads": result,
               "codes": len(self.national), "retired": sum(1 for e in self.national.values() if not e.valid),
               "failed": sorted(k for k, v in result.items() if "error" in v)}
        await self.journal.save_run("catalog", "sync", doc)
        return doc

    @staticmethod
    async def _attempt(step: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        try:
            return await step
        except Exception as e:  # the bureau's refusal, a bad file: named for the operator, the next catalog goes on
            return {"error": str(e)}

    async def _download(self, call: Call, layout: Layout) -> dict[str, Any]:
        since = await self.journal.read(lambda conn: _top_version(conn, layout)) or catalogs.FIRST_VERSION
        out = await call(layout.infno, {"data": {"ver": since}})
        handle = out if isinstance(out, dict) and "file_qury_no" in out else (out or {}).get("data") or {}
        if not handle.get("file_qury_no"):
            raise catalogs.FileLayoutError(f"{layout.infno} answered without a file_qury_no: {out}")
        down = await call("9102", {"fsDownloadIn": {"file_qury_no": handle["file_qury_no"],
                                                    "filename": handle.get("filename", ""),
                                                    "fixmedins_code": catalogs.PLC}})
        rows = await self.on_thread(_read, layout, down)
        await self._store(layout.table, rows, layout.fields, (layout.code, VERSION))
        top = max([since, *(r[VERSION] for r in rows)], key=catalogs.version_key)
        return {"from_version": since, "rows": len(rows), "to_version": top}

    async def _pages(self, call: Call, paged: Paged) -> dict[str, Any]:
        """From the newest update a run that reached the last page brought: a run interrupted half-way moves
        nothing on, or the pages it never read would be skipped for good by the next."""
        done = await self.journal.runs(PAGED_RUN, paged.infno, limit=1)
        since = str(done[0]["next_update"]) if done else FIRST_UPDATE
        seen: set[str] = set()
        newest = since
        page = 1
        while True:
            out = await call(paged.infno, {"data": {"updt_time": since, "page_num": page, "page_size": PAGE_SIZE}})
            rows, last = _page(paged, out, page, len(seen))
            fresh = {r["rid"] for r in rows} - seen
            if rows and not fresh:
                raise ValueError(f"{paged.infno} page {page} repeats what earlier pages brought: stopped there")
            seen |= fresh
            await self._store(paged.table, rows, paged.fields, ("rid",))
            newest = max([newest, *(str(r["updt_time"])[:10] for r in rows if r.get("updt_time"))])
            if last:
                await self.journal.save_run(PAGED_RUN, paged.infno, {"next_update": newest, "pages": page})
                return {"from_update": since, "pages": page, "rows": len(seen)}
            page += 1

    async def _store(self, table: str, rows: list[dict[str, Any]], fields: tuple[str, ...],
                     key: tuple[str, ...]) -> None:
        upsert = _upsert(table, fields, key)
        for start in range(0, len(rows), BATCH):
            batch = [tuple(r.get(f) for f in fields) for r in rows[start:start + BATCH]]
            await self.journal.run(lambda conn, b=batch: conn.executemany(upsert, b))


def visit_day(input_: dict[str, Any], node: str) -> tuple[str, str] | None:
    """The visit's date (yyyy-MM-dd) a trade's input names beside its diagnosis lines, and the field it came
    from: a visit uploaded late is diagnosed on its own date, not the day it reaches fep."""
    for name, value in input_.items():
        if name == node or not isinstance(value, dict):
            continue
        for field in VISIT_TIMES:
            if value.get(field):
                return str(value[field])[:10], f"{name}.{field}"
    return None


def _problem(national: dict[str, Entry], code: str) -> str | None:
    if not national:
        return None  # no catalog downloaded yet: the bureau is the judge
    entry = national.get(code)
    if entry is None:
        return f"national code {code} is not in the bureau's catalog"
    if not entry.valid:
        return f"national code {code} ({entry.name}) is retired since catalog version {entry.ver}"
    return None


def _mapping_rows(text: str) -> list[tuple[str, ...]]:
    """The mapping CSV's rows in MAP_COLUMNS order (on a thread: a hospital's list runs to tens of thousands)."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    missing = {"hosp_code", "national_code"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"mapping CSV needs the columns hosp_code and national_code (missing: "
                         f"{', '.join(sorted(missing))})")
    rows = []
    for n, r in enumerate(reader, start=2):
        if not (r.get("hosp_code") or "").strip():
            raise ValueError(f"mapping CSV line {n}: hosp_code is empty")
        rows.append(tuple((r.get(c) or "").strip() for c in MAP_COLUMNS))
    return rows


def _tables() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """The code book's tables: (name, columns, key), from the layouts (fep.catalogs), every column text."""
    return [*((t.table, t.fields, (t.code, VERSION)) for t in catalogs.LAYOUTS.values()),
            *((t.table, t.fields, ("rid",)) for t in catalogs.PAGED.values()),
            ("medlist_map", MAP_COLUMNS, MAP_KEY)]


def _names(columns: tuple[str, ...]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def _upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """A row in, or the row of its key replaced (SQLite 3.24+ and PostgreSQL speak the same upsert)."""
    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in key)
    return (f"INSERT INTO {table} ({_names(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({_names(key)}) DO UPDATE SET {sets}")


def _schema(conn: sqlite3.Connection, shared: bool) -> None:
    """Each table unless it is there, and the columns a newer layout added to one that is (a bureau's newer
    specification), in the writer's transaction. `shared`: PostgreSQL's, where nodes starting at once must
    create them once."""
    if shared:
        journal_pg.schema_lock(conn)  # type: ignore[arg-type]
    for table, columns, key in _tables():
        typed = ", ".join(f'"{c}" TEXT' for c in columns)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({typed}, PRIMARY KEY ({_names(key)}))")
        have = set(journal_pg.columns(conn, table) if shared else  # type: ignore[arg-type]
                   (r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))))
        for column in columns:
            if column not in have:
                conn.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" TEXT')


def _take_in(url: str, path: Path) -> dict[str, Any] | None:
    """Blocking: what the shared tables lack of the code book in the file at `path`, in one transaction on a
    session of its own, then the file renamed (NAME.in-postgresql). Idempotent, so two nodes with copies of one
    file, or a crash before the rename, add nothing twice:
    - a catalog row is keyed by code and version: a version the shared tables lack is added, one they have
      stays as it is (the newest version of a code is the one read, by its version key);
    - a paged query's row is keyed by rid: it is added, or replaces the shared one when its updt_time is newer;
    - the mapping is the office's, and two nodes' cannot be merged without knowing which is newer: the file's
      is copied only when the shared mapping is empty, else it is left, and the codes where it differs are
      returned (`differs`) for the log.
    None: no file there, or none of the code book's tables in it."""
    if not path.exists():
        return None
    with closing(sqlite3.connect(path)) as local:  # not read-only: a WAL a killed node left is folded in
        have = {r[0] for r in local.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables = [t for t in _tables() if t[0] in have]
        if not tables:
            return None
        added, differs = _copy(url, local, tables)
    return {"file": path.name, "kept": journal_pg.retire(path).name, "added": added, "differs": differs}


def _copy(url: str, local: sqlite3.Connection,
          tables: list[tuple[str, tuple[str, ...], tuple[str, ...]]]) -> tuple[dict[str, int], list[str]]:
    """In one PostgreSQL transaction (`_take_in`'s rules): the rows added by table, and the hospital codes whose
    mapping in the file differs from the shared one."""
    added: dict[str, int] = {}
    differs: list[str] = []
    with journal_pg.taking_in(url, journal_pg.Lock.CODEBOOK_TAKE_IN) as cur:
        for table, columns, key in tables:
            if table == "medlist_map":
                differs = _copy_mapping(cur, local, added)
                continue
            have = {r[0] for r in local.execute("SELECT name FROM pragma_table_info(?)", (table,))}
            kept = tuple(c for c in columns if c in have)  # an older layout's file lacks the newer columns
            rows = local.execute(f"SELECT {_names(kept)} FROM {table}")
            n = 0
            while chunk := rows.fetchmany(BATCH):
                cur.executemany(_add_new(table, kept, key), chunk)
                n += max(cur.rowcount, 0)
            if n:
                added[table] = n
    return added, differs


def _copy_mapping(cur: psycopg.Cursor[Any], local: sqlite3.Connection, added: dict[str, int]) -> list[str]:
    mine = local.execute(f"SELECT {_names(MAP_COLUMNS)} FROM medlist_map").fetchall()
    shared = dict(cur.execute("SELECT hosp_code, national_code FROM medlist_map").fetchall())
    if shared:
        return sorted(hosp for hosp, national, _ in mine if shared.get(hosp) != national)
    cur.executemany(_add_new("medlist_map", MAP_COLUMNS, MAP_KEY), mine)
    if mine:
        added["medlist_map"] = len(mine)
    return []


def _add_new(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """PostgreSQL's insert of a row the table lacks; a paged query's row (by rid) replaces an older one."""
    insert = f"INSERT INTO {table} ({_names(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
    if key != ("rid",):
        return f"{insert} ON CONFLICT ({_names(key)}) DO NOTHING"
    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in key)
    return (f'{insert} ON CONFLICT ("rid") DO UPDATE SET {sets} '
            f"WHERE excluded.updt_time > coalesce({table}.updt_time, '')")


def _load(conn: sqlite3.Connection) -> tuple[dict[str, Entry], dict[str, str], dict[str, dict[str, Diagnosis]]]:
    """Each fee code as its newest version has it (over the catalogs whose codes fee lines carry), the mapping,
    and each diagnosis code with the date it was retired from, if it was."""
    national: dict[str, Entry] = {}
    for layout in catalogs.LAYOUTS.values():
        if layout.fee_codes:
            national.update(_current(conn, layout))
    diagnoses = {infno: _diagnoses(conn, catalogs.LAYOUTS[infno])
                 for infno in set(catalogs.DIAGNOSIS_CATALOGS.values())}
    return national, dict(conn.execute("SELECT hosp_code, national_code FROM medlist_map")), diagnoses


def _diagnoses(conn: sqlite3.Connection, layout: Layout) -> dict[str, Diagnosis]:
    """A code retired by its newest versions is retired from the update time of the first of them."""
    versions: dict[str, list[tuple[str, str, str, str]]] = {}
    columns = ", ".join(f'"{c}"' for c in (layout.code, layout.name, VALID, VERSION, catalogs.UPDATED))
    for code, name, valid, ver, updated in conn.execute(f"SELECT {columns} FROM {layout.table}"):
        versions.setdefault(code, []).append((ver, name or "", valid, updated or ""))
    out = {}
    for code, rows in versions.items():
        rows.sort(key=lambda r: catalogs.version_key(r[0]))
        retired = None
        for ver, name, valid, updated in reversed(rows):
            if valid == "1":
                break
            retired = updated[:10]
        out[code] = Diagnosis(rows[-1][1], retired)
    return out


def _current(conn: sqlite3.Connection, layout: Layout) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for code, name, valid, ver in conn.execute(
            f'SELECT "{layout.code}", "{layout.name}", "{VALID}", "{VERSION}" FROM {layout.table}'):
        held = out.get(code)
        if held is None or catalogs.version_key(ver) >= catalogs.version_key(held.ver):
            out[code] = Entry(code, name or "", layout.infno, valid == "1", ver)
    return out


def _top_version(conn: sqlite3.Connection, layout: Layout) -> str | None:
    versions = [r[0] for r in conn.execute(f'SELECT DISTINCT "{VERSION}" FROM {layout.table}')]
    return max(versions, key=catalogs.version_key, default=None)


def _read(layout: Layout, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The downloaded file's records (on a thread: a national catalog is hundreds of thousands of lines)."""
    name = (answer.get("file") or {}).get("filename", "")
    return catalogs.unpack(envelope.file_content(answer), layout.fields, (layout.code, VERSION),
                           f"{layout.infno} {layout.title} file {name}".strip())


def _page(paged: Paged, out: Any, page: int, read: int) -> tuple[list[dict[str, Any]], bool]:
    """One page's records, and whether it is the last (`read`: the records earlier pages brought). The
    specification names no output node (无节点): the records come as a list, or under `data` (or `list`)
    beside the paging fields (pages, lastPage, recordCounts)."""
    meta = out if isinstance(out, dict) else {}
    records = out if isinstance(out, list) else meta.get("data", meta.get("list")) or []
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{paged.infno} page {page}: no list of records in the answer")
    rows = [{f: None if r.get(f) in (None, "") else str(r[f]) for f in paged.fields} for r in records]
    if any(r["rid"] is None for r in rows):
        raise ValueError(f"{paged.infno} page {page}: a record without its rid (唯一记录号)")
    return rows, _last(meta, page, len(rows), read + len(rows))


def _last(meta: dict[str, Any], page: int, rows: int, read: int) -> bool:
    """Whether a page is the last, by the bureau's paging fields (lastPage, pages, recordCounts), which it
    may set smaller than the size asked: only a bureau that gives none ends with a page short of its size.
    An empty page always ends it."""
    if not rows:
        return True
    flag = meta.get("lastPage")
    if isinstance(flag, bool) or str(flag).lower() in ("true", "false"):
        return flag is True or str(flag).lower() == "true"
    for field, done in (("pages", page), ("recordCounts", read)):
        if str(meta.get(field)).isdigit():
            return done >= int(meta[field])
    size = meta.get("pageSize")
    return rows < (int(size) if str(size).isdigit() and int(size) > 0 else PAGE_SIZE)


CODE = "med_list_codg"  # the national code of a fee line


def _national_codes(lines: list[Any]) -> set[str] | None:
    """The national codes of the lines when every line is an object naming one as text (nothing to map),
    read at C speed; else None."""
    if set(map(type, lines)) != {dict}:
        return None
    codes = list(map(dict.get, lines, repeat(CODE)))
    return set(codes) if set(map(type, codes)) == {str} and "" not in codes else None


def _item(line: dict[str, Any]) -> str:
    """A fee line as a refusal names it: its feedetl_sn and the hospital's own code."""
    return f"{line.get('feedetl_sn', '?')} ({line.get('medins_list_codg') or 'no hospital code'})"
