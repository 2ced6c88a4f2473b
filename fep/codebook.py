"""The bureau's catalogs (医保目录 and the other 13xx lists) and the hospital's code mapping (目录对照).

Both live in the journal's database, written through the journal's writer and read on its reader threads:
each catalog in its own table (`catalog_1301`, ...) in its real layout (fep.catalogs), upserted by code and
version for the downloaded files (1301–1327: file_qury_no, then 9102) and by rid for the paged queries (1312,
1316–1319, followed to the last page); the mapping in `medlist_map`. A file is unpacked and parsed on a thread
and stored in batches, so a big catalog neither blocks the reactor nor holds the writer from trades for long.

Fee lines (2204, 2301) that carry only the hospital's own code are mapped to national codes before they are
journalled, from an in-memory copy refreshed after every change: an unmapped item, or one mapped to a retired
or unknown code, refuses the trade with one error naming every such item, instead of a reject from the bureau
later.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Awaitable, Callable

import sqlite_utils
from twisted.internet import threads
from twisted.logger import Logger

from fep import catalogs, envelope
from fep.catalogs import VALID, VERSION, Layout, Paged
from fep.jobs import progress
from fep.trades import InvalidInput, TradeDef
from fep.journal import Journal

log = Logger()

MAP_COLUMNS = ("hosp_code", "national_code", "hosp_name")
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


Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class CodeBook:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.national: dict[str, Entry] = {}
        self.mapping: dict[str, str] = {}
        self.diagnoses: dict[str, dict[str, Diagnosis]] = {}  # diagnosis catalog (1307, ...) -> code -> state

    async def open(self) -> None:
        await self.journal.run(_schema)
        await self.refresh()

    async def refresh(self) -> None:
        self.national, self.mapping, self.diagnoses = await self.journal.read(_load)

    # ---- the hot path ----------------------------------------------------------------------------
    def map_fees(self, trade: TradeDef, input_: dict[str, Any]) -> None:
        """Fill med_list_codg from the mapping where the HIS sent only its own code; refuse what cannot go.
        A national code is judged once per upload: its 5,000 lines name a few hundred codes at most."""
        lines = input_.get(trade.map_codes or "")
        if not isinstance(lines, list):
            return
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
            if national not in judged:
                judged[national] = self.national_problem(national)
            if judged[national]:
                problems.append(f"{_item(line)}: {judged[national]}")
        if problems:
            raise InvalidInput(f"{trade.infno} {trade.name}: {len(problems)} fee item(s) cannot be uploaded: "
                               f"{'; '.join(problems)}. Fix the mapping (fep catalog map import) or the items")

    def national_problem(self, code: str) -> str | None:
        if not self.national:
            return None  # no catalog downloaded yet: the bureau is the judge
        entry = self.national.get(code)
        if entry is None:
            return f"national code {code} is not in the bureau's catalog"
        if not entry.valid:
            return f"national code {code} ({entry.name}) is retired since catalog version {entry.ver}"
        return None

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
        def store(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO medlist_map (hosp_code, national_code, hosp_name) "
                             "VALUES (?,?,?)", rows)

        await self.journal.run(store)
        await self.refresh()
        return {"imported": len(rows), "problems": self.check()}

    def check(self) -> list[dict[str, str]]:
        """Items with no mapping, or mapped to a retired or unknown code."""
        out = []
        for hosp, national in sorted(self.mapping.items()):
            problem = "no mapping to a national code" if not national else self.national_problem(national)
            if problem:
                out.append({"hosp_code": hosp, "national_code": national, "problem": problem})
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
        rows = await threads.deferToThread(_read, layout, down)
        await self._store(layout.table, rows, (layout.code, VERSION))
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
            await self._store(paged.table, rows, "rid")
            newest = max([newest, *(str(r["updt_time"])[:10] for r in rows if r.get("updt_time"))])
            if last:
                await self.journal.save_run(PAGED_RUN, paged.infno, {"next_update": newest, "pages": page})
                return {"from_update": since, "pages": page, "rows": len(seen)}
            page += 1

    async def _store(self, table: str, rows: list[dict[str, Any]], pk: str | tuple[str, ...]) -> None:
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            await self.journal.run(lambda conn, b=batch: sqlite_utils.Database(conn)[table].upsert_all(b, pk=pk))


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


def _schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    for layout in catalogs.LAYOUTS.values():
        db[layout.table].create({f: str for f in layout.fields}, pk=(layout.code, VERSION), if_not_exists=True)
    for paged in catalogs.PAGED.values():
        db[paged.table].create({f: str for f in paged.fields}, pk="rid", if_not_exists=True)
    db["medlist_map"].create({c: str for c in MAP_COLUMNS}, pk="hosp_code", if_not_exists=True)


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


def _item(line: dict[str, Any]) -> str:
    """A fee line as a refusal names it: its feedetl_sn and the hospital's own code."""
    return f"{line.get('feedetl_sn', '?')} ({line.get('medins_list_codg') or 'no hospital code'})"
