"""What the simulated bureau publishes of its catalog, in the interface's real layouts (fep.catalogs): the
13xx download files (every record newer than the hospital's version, the columns the simulator knows
filled, the rest `null`) and the pages of the paged queries (1312, 1316–1319).

The catalog is sim.yaml's `catalog:` (drugs, services and devices, by list_type) and `diagnoses:` (ICD-10,
1307), version by version. `catalog_bulk:` adds that many generated records to a catalog (a national catalog's
size) or to a paged query (pages to follow). No sockets or SQLite here.
"""

from __future__ import annotations

from typing import Any

from fep import catalogs
from fep.catalogs import UPDATED, VALID, VERSION

# Which download publishes which list_type (nhsa-interface.md §6 list_type; 104 民族药 is the paged 1304, 105 其他
# goes with the drugs).
DOWNLOAD_OF = {"101": "1301", "102": "1302", "103": "1303", "106": "1320", "201": "1305", "301": "1306"}
BULK_PREFIX = "XS"


def _updated(ver: str) -> str:
    """A record's update time follows its version: version n was published on day n of 2024."""
    day = max(1, min(28, (catalogs.version_key(ver) or (1,))[0]))
    return f"2024-01-{day:02d} 08:00:00"


def entries(catalog: list[dict[str, str]], diagnoses: list[dict[str, str]], bulk: dict[str, int]
            ) -> list[dict[str, str]]:
    """Every published version of every record, each with the download (`infno`) that carries it."""
    out = [{**c, "infno": DOWNLOAD_OF.get(c["list_type"], "1301")} for c in catalog]
    out += [{**d, "infno": "1307", "list_type": "", "lv": ""} for d in diagnoses]
    for infno, count in bulk.items():
        out += [{"code": f"{BULK_PREFIX}{infno}{n:012d}", "name": f"模拟目录{infno}-{n}", "list_type": "101",
                 "lv": "01", "selfpay_prop": "0", "vali_flag": "1", "ver": "1", "infno": infno} for n in range(count)]
    return out


def download(infno: str, published: list[dict[str, str]], since: str) -> list[list[str | None]]:
    """The lines of a 13xx file: the records of `infno` newer than version `since`, in the layout's columns."""
    layout = catalogs.LAYOUTS[infno]
    after = catalogs.version_key(since)
    return [_line(layout, e) for e in published if e["infno"] == infno and catalogs.version_key(e["ver"]) > after]


def _line(layout: catalogs.Layout, e: dict[str, str]) -> list[str | None]:
    known = {layout.code: e["code"], layout.name: e["name"], VERSION: e["ver"], VALID: e.get("vali_flag", "1"),
             "唯一记录号": f"{e['code']}-{e['ver']}", UPDATED: _updated(e["ver"]), "版本名称": f"模拟目录第{e['ver']}版"}
    return [known.get(f) for f in layout.fields]


def page(infno: str, published: list[dict[str, str]], admdvs: str, data: dict[str, Any]) -> dict[str, Any]:
    """One page of a paged query: the records updated since `updt_time`, with the paging fields beside them."""
    since, num, size = str(data["updt_time"])[:10], int(data["page_num"]), int(data["page_size"])
    records = [r for r in _paged(infno, published, admdvs) if r["updt_time"][:10] >= since]
    pages = max(1, -(-len(records) // size))
    return {"data": records[(num - 1) * size:num * size], "pageNum": num, "pageSize": size,
            "recordCounts": len(records), "pages": pages, "firstPage": num == 1, "lastPage": num >= pages}


def _paged(infno: str, published: list[dict[str, str]], admdvs: str) -> list[dict[str, Any]]:
    """1312 lists the catalog's codes, 1316 matches each to itself, 1319 gives the 乙类 items' self-pay share;
    the simulator has no hospital mapping (1317) and no price limits (1318). Generated records stay in their own
    list."""
    fields = catalogs.PAGED[infno].fields
    out = []
    for e in published:
        if e["infno"] != infno and not _listed(infno, e):
            continue
        known = {"hilist_code": e["code"], "hilist_name": e["name"], "med_list_codg": e["code"],
                 "list_type": e.get("list_type"), "chrgitm_lv": e.get("lv"), "insu_admdvs": admdvs,
                 "selfpay_prop": e.get("selfpay_prop"), "vali_flag": e.get("vali_flag", "1"),
                 "rid": f"{infno}-{e['code']}-{e['ver']}", "updt_time": _updated(e["ver"]), "begndate": "2024-01-01"}
        out.append({f: known.get(f) for f in fields})
    return out


def _listed(infno: str, e: dict[str, str]) -> bool:
    layout = catalogs.LAYOUTS.get(e["infno"])
    if layout is None or not layout.fee_codes or e["code"].startswith(BULK_PREFIX):
        return False
    return infno in ("1312", "1316") or (infno == "1319" and e.get("lv") == "02")
