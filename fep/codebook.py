"""The bureau's catalog (医保目录) and the hospital's code mapping (目录对照).

Both live in the journal's database (tables `medlist` and `medlist_map`, written through the journal's
writer and read on its reader threads). Fee lines (2204, 2301) that carry only the hospital's own code are mapped to national codes
before they are journalled, from an in-memory copy refreshed after every change: an unmapped item, or one
mapped to a retired or unknown code, refuses the trade with one error naming every such item, instead of
a reject from the bureau later.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import zipfile
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable

import sqlite_utils

from fep import envelope
from fep.jobs import progress
from fep.trades import InvalidInput, TradeDef
from fep.journal import Journal

# Which download holds which list types (nhsa-interface.md §6 list_type).
DOWNLOADS = {"1301": ("101", "102", "103", "104", "105", "106"), "1305": ("201",), "1306": ("301",)}
MAP_COLUMNS = ("hosp_code", "national_code", "hosp_name")


@dataclass(frozen=True)
class Entry:
    code: str
    name: str
    list_type: str
    lv: str
    valid: bool
    ver: int


Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class CodeBook:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.national: dict[str, Entry] = {}
        self.mapping: dict[str, str] = {}

    async def open(self) -> None:
        await self.journal.run(_schema)
        await self.refresh()

    async def refresh(self) -> None:
        national, mapping = await self.journal.read(_load)
        self.national, self.mapping = national, mapping

    # ---- the hot path ----------------------------------------------------------------------------
    def map_fees(self, trade: TradeDef, input_: dict[str, Any]) -> None:
        """Fill med_list_codg from the mapping where the HIS sent only its own code; refuse what cannot go."""
        lines = input_.get(trade.map_codes or "")
        if not isinstance(lines, list):
            return
        problems = []
        for line in lines:
            if not isinstance(line, dict):
                continue
            own, national = str(line.get("medins_list_codg") or ""), str(line.get("med_list_codg") or "")
            item = f"{line.get('feedetl_sn', '?')} ({own or 'no hospital code'})"
            if not national:
                national = self.mapping.get(own, "")
                if not national:
                    problems.append(f"{item}: no mapping to a national code")
                    continue
                line["med_list_codg"] = national
            problem = self.national_problem(national)
            if problem:
                problems.append(f"{item}: {problem}")
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
        """Download what is new in each catalog since the local version (13xx, then 9102)."""
        result = {}
        for n, (infno, types) in enumerate(DOWNLOADS.items(), start=1):
            since = max((e.ver for e in self.national.values() if e.list_type in types), default=0)
            step = f"catalog sync {n} of {len(DOWNLOADS)}: {infno} since version {since}"
            progress(f"{step}: asking the bureau")
            out = await call(infno, {"data": {"ver": str(since)}})
            progress(f"{step}: downloading {out['filename']}")
            down = await call("9102", {"fsDownloadIn": {"file_qury_no": out["file_qury_no"],
                                                        "filename": out["filename"], "fixmedins_code": "plc"}})
            rows = _rows(envelope.file_content(down))
            progress(f"{step}: storing {len(rows)} row(s)")
            await self.journal.run(lambda conn, rows=rows: _upsert(conn, rows))
            await self.refresh()
            result[infno] = {"from_version": since, "rows": len(rows),
                             "to_version": max([since] + [int(r[5]) for r in rows])}
        doc = {"run_at": datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "downloads": result,
               "codes": len(self.national), "retired": sum(1 for e in self.national.values() if not e.valid)}
        await self.journal.save_run("catalog", "sync", doc)
        return doc


def _schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["medlist"].create({"code": str, "name": str, "list_type": str, "lv": str, "vali_flag": str, "ver": int},
                         pk="code", if_not_exists=True)
    db["medlist_map"].create({c: str for c in MAP_COLUMNS}, pk="hosp_code", if_not_exists=True)


def _load(conn: sqlite3.Connection) -> tuple[dict[str, Entry], dict[str, str]]:
    national = {r[0]: Entry(r[0], r[1], r[2], r[3], r[4] == "1", int(r[5]))
                for r in conn.execute("SELECT code, name, list_type, lv, vali_flag, ver FROM medlist")}
    return national, dict(conn.execute("SELECT hosp_code, national_code FROM medlist_map"))


def _rows(zipped: bytes) -> list[list[str]]:
    """The download: TAB-separated lines (code, name, list_type, lv, vali_flag, ver), UTF-8, in a ZIP."""
    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        text = z.read(z.namelist()[0]).decode("utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def _upsert(conn: sqlite3.Connection, rows: list[list[str]]) -> None:
    """A newer version of a code replaces the older one; an older one never replaces a newer."""
    for code, name, list_type, lv, vali_flag, ver in rows:
        conn.execute("INSERT INTO medlist VALUES (?,?,?,?,?,?) ON CONFLICT(code) DO UPDATE SET name=excluded.name, "
                     "list_type=excluded.list_type, lv=excluded.lv, vali_flag=excluded.vali_flag, ver=excluded.ver "
                     "WHERE excluded.ver >= medlist.ver", (code, name, list_type, lv, vali_flag, int(ver)))
