"""Daily reconciliation with the bureau: 对总账 (3201) per group, 对明细账 (9101 -> 3202 -> 9102) where a
group does not balance, and every difference named with what to do about it.

The journal is the hospital's side: every settlement and cancel the bureau answered (a cancel is its
own negative settlement and counts). Groups are (insutype, setl_optins, clr_type) over the bureau's
settlement time, as the interface requires: 异地 settlements fall in the clearing types and agency the
bureau reported on them (99963 异地门诊, ...) and balance like any other group. The trades themselves go
through the engine like any other.

The table reads as the insurance office reads it (908 hospital paper, figure 1): clearing types by name
beside their codes, a totals row, and for a group that does not balance, how many settlements and how
much money each side has more ("相差几笔，相差多少钱，哪边多哪边少").
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from twisted.internet import threads

from fep import catalogs, envelope, metrics
from fep.journal import Journal, TradeRow, latest_runs
from fep.trades import Kind
from fep.engine import Engine
from fep.jobs import progress

ZERO = Decimal("0.00")
WINDOW_DAYS = 31  # statement days `fep status --check` and the unbalanced alert watch: what a month's clearing needs
INSUTYPE = {"310": "职工基本医疗保险", "320": "公务员医疗补助", "330": "大额医疗费用补助", "340": "离休人员医疗保障",
            "390": "城乡居民基本医疗保险", "391": "城镇居民基本医疗保险", "392": "城乡居民大病医疗保险", "510": "生育保险"}
CLR_TYPE = {"11": "门诊", "1103": "意外伤害门诊", "12": "门诊挂号", "13": "急诊", "14": "门诊慢特病", "15": "两病门诊",
            "18": "特药购药", "21": "住院", "22": "意外伤害住院", "27": "单病种住院", "28": "日间手术", "41": "药店购药",
            "51": "暂缓结算", "53": "生育门诊", "99": "其他",
            # provincial 99xx codes (nhsa-interface.md §6); 99963/99968 are 域外异地门诊/住院 in the code table,
            # 异地门诊/异地住院 on the insurance office's table. A region's own: fep.yaml clearing.clr_type_names
            "9907": "总控", "9909": "域内异地", "99952": "异地医疗费用清算", "99963": "异地门诊", "99968": "异地住院"}
HEADERS = ["险种类别", "结算经办机构", "清算类别", "医疗费总额", "基金支付总额", "个人账户支付金额", "结算笔数", "结果", "错误说明"]


@dataclass
class Settlement:
    msgid: str
    infno: str
    psn_no: str
    setl_id: str
    mdtrt_id: str
    insutype: str
    clr_type: str
    setl_optins: str
    medfee: Decimal
    fund: Decimal
    acct: Decimal
    refund: bool  # a cancel: its own negative settlement
    insuplc: str = ""  # the insured region (参保地) its envelope carried: 异地 when not the hospital's


@dataclass
class Group:
    insutype: str
    setl_optins: str
    clr_type: str
    rows: list[Settlement] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.insutype, self.setl_optins, self.clr_type

    def total(self, attr: str) -> Decimal:
        return sum((getattr(r, attr) for r in self.rows), ZERO)


class Reconciler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def settlements(self, day: date) -> list[Settlement]:
        """The day's settlements and cancels in force in the journal, by the bureau's settlement time."""
        return (await self.settlements_between(day, day)).get(day, [])

    async def settlements_between(self, first: date, last: date) -> dict[date, list[Settlement]]:
        """The settlements and cancels in force of the days first..last, per day of the bureau's settlement
        time (a trade journalled just before midnight may be settled after it), read in one go: a month's
        clearing reads it once. Their answers are read on a worker thread, not the reactor's."""
        money = {t.infno for t in self.engine.trades.defs.values() if t.moves_money}
        undo = {t.infno for t in self.engine.trades.defs.values() if t.kind is Kind.UNDO_MONEY}
        start = datetime.combine(first, datetime.min.time()).timestamp()
        end = datetime.combine(last, datetime.min.time()).timestamp() + 86400
        rows = await self.engine.journal.settled_between(start - 86400, end + 86400)
        return await threads.deferToThread(_by_day, rows, money, undo, first.isoformat(), last.isoformat())

    async def run(self, day: date) -> dict[str, Any]:
        unresolved = await self._unresolved(day)
        groups = {key: Group(*key) for key in self.engine.cfg.reconcile_groups}  # asked about even when empty
        for s in await self.settlements(day):
            groups.setdefault((s.insutype, s.setl_optins, s.clr_type), Group(s.insutype, s.setl_optins,
                                                                              s.clr_type)).rows.append(s)
        ordered = sorted(groups.values(), key=lambda g: g.key)
        results = []
        for n, g in enumerate(ordered, start=1):
            progress(f"reconciling {day}: group {n} of {len(ordered)} ({'/'.join(g.key)})")
            results.append(await self._group(day, g))
        names = {**CLR_TYPE, **dict(self.engine.cfg.clr_type_names)}
        for r in results:  # the run keeps the names as the office saw them that day
            r["clr_type_name"] = names.get(r["clr_type"], "")
        doc = {"stmt_date": day.isoformat(), "run_at": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
               "unresolved": unresolved, "groups": results,
               "balanced": sum(1 for g in results if g["result"] == "平"),
               "unbalanced": sum(1 for g in results if g["result"] != "平")}
        await self.engine.journal.save_run("reconcile", day.isoformat(), doc)
        show_groups(await latest_of_each_day(self.engine.journal))
        metrics.RECONCILED_AT.set(time.time())
        return doc

    async def _unresolved(self, day: date) -> list[dict[str, Any]]:
        """Money trades whose outcome is not known yet and that the bureau may have settled on `day`: the
        day cannot balance until they are resolved. One sent just before midnight may be settled after it."""
        money = {t.infno for t in self.engine.trades.defs.values() if t.moves_money}
        start = datetime.combine(day, datetime.min.time()).timestamp()
        reach = max(t.timeout for t in self.engine.trades.defs.values()) + self.engine.cfg.bureau.late_grace
        rows = await self.engine.journal.unresolved_between(start - reach, start + 86400)
        return [{"msgid": r.msgid, "infno": r.infno, "state": r.state.value, "note": r.note}
                for r in rows if r.infno in money]

    async def call(self, infno: str, input_: dict[str, Any]) -> dict[str, Any]:
        """A trade fep makes itself, through the engine like any other; its output, or ReconcileError."""
        answer = (await self.engine.submit(envelope.HisRequest(infno, None, {
            "infno": infno, "input": input_}))).body
        if not envelope.succeeded(answer):
            raise ReconcileError(f"{infno} failed: {answer.get('err_msg')} (msgid {answer.get('fep_msgid')})")
        return answer["output"]

    async def _group(self, day: date, g: Group) -> dict[str, Any]:
        totals = {"medfee_sumamt": g.total("medfee"), "fund_pay_sumamt": g.total("fund"), "acct_pay": g.total("acct"),
                  "fixmedins_setl_cnt": len(g.rows)}
        row: dict[str, Any] = {"insutype": g.insutype, "setl_optins": g.setl_optins, "clr_type": g.clr_type, **totals}
        try:
            out = await self.call("3201", {"data": {
                "insutype": g.insutype, "clr_type": g.clr_type, "setl_optins": g.setl_optins,
                "stmt_begndate": day.isoformat(), "stmt_enddate": day.isoformat(), **totals,
                "refd_setl_flag": "1", "fixmedins_refd_setl_flag": "1" if any(r.refund for r in g.rows) else "0"}})
            info = out["stmtinfo"]
            balanced = str(info.get("stmt_rslt")) == "0"
            row.update(result="平" if balanced else "不平",
                       error="" if balanced else str(info.get("stmt_rslt_dscr") or ""), differences=[])
            if not balanced:
                row["differences"] = await self._detail(day, g, totals)
                row["more"] = more(row["differences"])
        except (ReconcileError, catalogs.FileLayoutError) as e:  # a result file not in its layout: named
            row.update(result="未对账", error=str(e), differences=[])
        return row

    async def _detail(self, day: date, g: Group, totals: dict[str, Any]) -> list[dict[str, Any]]:
        """9101 the hospital's detail file, 3202 against it, 9102 the result; name every difference."""
        name = f"{datetime.now():%Y%m%d%H%M%S}.txt"  # the detail file (表150), one per group, in a ZIP of its name
        packed = await threads.deferToThread(_detail_file, name, g.rows)  # zipped and encoded: not on the reactor
        up = await self.call("9101", {"fsUploadIn": {"in": packed,
                                                      "filename": name.replace(".txt", ".zip"),
                                                      "fixmedins_code": self.engine.cfg.institution.fixmedins_code}})
        out = await self.call("3202", {"data": {
            "setl_optins": g.setl_optins, "file_qury_no": up["file_qury_no"], "stmt_begndate": day.isoformat(),
            "stmt_enddate": day.isoformat(), "medfee_sumamt": totals["medfee_sumamt"],
            "fund_pay_sumamt": totals["fund_pay_sumamt"], "cash_payamt": totals["medfee_sumamt"]
            - totals["fund_pay_sumamt"] - totals["acct_pay"], "fixmedins_setl_cnt": totals["fixmedins_setl_cnt"],
            "clr_type": g.clr_type, "insutype": g.insutype, "refd_setl_flag": "1", "fixmedins_refd_setl_flag": "1"}})
        info = out["fileinfo"]
        down = await self.call("9102", {"fsDownloadIn": {"file_qury_no": info["file_qury_no"],
                                                          "filename": info["filename"],
                                                          "fixmedins_code": self.engine.cfg.institution.fixmedins_code}})
        rows = await threads.deferToThread(_result_file, down, info["filename"])
        ours = {r.setl_id: r for r in g.rows}
        diffs = []
        for r in rows:
            if r["stmt_rslt"] == "1":
                diffs.append(await self._name(g, ours.get(r["setl_id"] or ""), r["psn_no"], r["setl_id"], r["msgid"],
                                              r["refd_setl_flag"], r["memo"], r["medfee_sumamt"],
                                              r["fund_pay_sumamt"], r["acct_pay"]))
        return diffs

    async def _name(self, g: Group, ours: Settlement | None, psn_no: str | None, setl_id: str | None,
                    msgid: str | None, refd: str | None, memo: str | None, medfee: str | None, fund: str | None,
                    acct: str | None) -> dict[str, Any]:
        """What the difference is, and what a person (or `fep reverse`) should do about it."""
        d: dict[str, Any] = {"setl_id": setl_id, "msgid": msgid or (ours.msgid if ours else None), "psn_no": psn_no,
                             "bureau_medfee": medfee, "journal_medfee": str(ours.medfee) if ours else None,
                             "bureau_memo": memo}
        if ours is None and refd == "1":
            d["kind"] = "cancelled at the bureau only"
            d["action"] = (f"the bureau holds a cancel the HIS never made: fep reverse {msgid} --infno 2208 "
                           f"--person {psn_no}, then refund through the HIS, last settlement first")
        elif ours is None:
            oinfno = "2304" if g.clr_type.startswith("2") else "2207"
            row = await self.engine.journal.get(msgid) if msgid else None
            known = f" (the journal has it as {row.state.value})" if row else ""
            d["kind"] = "settled at the bureau, unknown to the journal (单边账)"
            d["action"] = f"reversal candidate{known}: fep reverse {msgid} --infno {oinfno} --person {psn_no}"
        elif medfee is None:
            d["kind"] = "cancel in the journal, not at the bureau" if ours.refund else "in the journal, not at the bureau"
            d["action"] = (f"ask the bureau about settlement {setl_id} (5203); if it is not there, the patient is not "
                           f"settled (or not refunded): settle or cancel again through the HIS")
        else:
            d["kind"] = "amounts differ"
            d["action"] = (f"the bureau has {medfee} (fund {fund}, account {acct}), the journal {ours.medfee}: the "
                           f"bureau's figures stand unless it corrects them; raise it with the bureau")
        return d


class ReconcileError(Exception):
    pass


def _by_day(rows: list[TradeRow], money: set[str], undo: set[str], first: str,
            last: str) -> dict[date, list[Settlement]]:
    """The money trades among `rows` settled by the bureau on a day from first to last (ISO dates), per day."""
    out: dict[date, list[Settlement]] = {}
    for r in rows:
        info = (envelope.loads(r.answer or "{}").get("output") or {}).get("setlinfo") or {}
        day = str(info.get("setl_time", ""))[:10]
        if r.infno not in money or not first <= day <= last:
            continue
        out.setdefault(date.fromisoformat(day), []).append(Settlement(
            r.msgid, r.infno, r.psn_no or "", r.setl_id or "", str(info.get("mdtrt_id", "")),
            str(info.get("insutype", "")), str(info.get("clr_type", "")), str(info.get("clr_optins", "")),
            dec(info.get("medfee_sumamt")), dec(info.get("fund_pay_sumamt")), dec(info.get("acct_pay")),
            r.infno in undo, str(envelope.top_field(r.request, "insuplc_admdvs", "") or "")))
    return out


def _detail_file(name: str, rows: list[Settlement]) -> str:
    """The hospital's detail file (表150) of a group's settlements, zipped under `name`, as 9101 carries it."""
    zipped = catalogs.pack(name, [(r.setl_id, r.mdtrt_id, r.psn_no, r.medfee, r.fund, r.acct,
                                   "1" if r.refund else "0") for r in rows])
    return base64.b64encode(zipped).decode("ascii")


def _result_file(down: dict[str, Any], filename: str) -> list[dict[str, str | None]]:
    """The rows of the 3202 result file a 9102 brought back (base64, unzipped, parsed): FileLayoutError for one
    not in its layout."""
    return catalogs.unpack(envelope.file_content(down), catalogs.STATEMENT_RESULT, ("psn_no", "stmt_rslt"),
                           f"3202 result file {filename}")


def dec(value: Any) -> Decimal:
    return Decimal(str(value)) if value not in (None, "") else ZERO


def more(differences: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each side has that the other has not: settlements (a cancel counts, with its negative amount) and
    medical-fee money, for the office's "相差几笔，相差多少钱，哪边多哪边少"."""
    sides = {"bureau": {"settlements": 0, "medfee": ZERO}, "journal": {"settlements": 0, "medfee": ZERO}}
    for d in differences:
        bureau, journal = dec(d.get("bureau_medfee")), dec(d.get("journal_medfee"))
        if d.get("journal_medfee") is None:
            sides["bureau"]["settlements"] += 1
            sides["bureau"]["medfee"] += bureau
        elif d.get("bureau_medfee") is None:
            sides["journal"]["settlements"] += 1
            sides["journal"]["medfee"] += journal
        else:
            side = "bureau" if bureau > journal else "journal"
            sides[side]["medfee"] += abs(bureau - journal)
    return sides


def _error_cell(g: dict[str, Any]) -> str:
    """错误说明: for a group that does not balance, what each side has more, then the bureau's own words."""
    m = g.get("more")
    if not m:
        return g["error"]
    said = f"中心多{m['bureau']['settlements']}笔 {m['bureau']['medfee']}元; 医院多{m['journal']['settlements']}笔 " \
           f"{m['journal']['medfee']}元"
    return f"{said} ({g['error']})" if g["error"] else said


def yesterday() -> date:
    return date.today() - timedelta(days=1)


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The table the insurance office works from (908 hospital paper, figure 1), with a totals row."""
    rows = []
    for g in doc["groups"]:
        name = g.get("clr_type_name", CLR_TYPE.get(g["clr_type"], ""))
        rows.append([f"{g['insutype']} {INSUTYPE.get(g['insutype'], '')}".strip(), g["setl_optins"],
                     f"{g['clr_type']} {name}".strip(), str(g["medfee_sumamt"]),
                     str(g["fund_pay_sumamt"]), str(g["acct_pay"]), str(g["fixmedins_setl_cnt"]), g["result"],
                     _error_cell(g)])
    totals = [sum((Decimal(str(g[k])) for g in doc["groups"]), ZERO) for k in ("medfee_sumamt", "fund_pay_sumamt",
                                                                                 "acct_pay")]
    rows.append(["合计", "", "", *(str(t) for t in totals), str(sum(g["fixmedins_setl_cnt"] for g in doc["groups"])),
                 "", ""])
    return rows


def render(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return envelope.dumps(doc).decode("utf-8")
    from fep.admin_cli import csv_text, table

    if fmt == "csv":
        return csv_text(HEADERS, table_rows(doc))

    lines = [f"对账日期 {doc['stmt_date']}  (run {doc['run_at']})"]
    if doc["unresolved"]:
        lines.append(f"UNRESOLVED: {len(doc['unresolved'])} trade(s) of the day have an unknown outcome; the day "
                     f"cannot balance until they are resolved:")
        lines.append(table(doc["unresolved"], ["msgid", "infno", "state", "note"]))
    lines.append(table([dict(zip(HEADERS, r)) for r in table_rows(doc)], HEADERS))
    for g in doc["groups"]:
        if g["differences"]:
            lines.append(f"\n{g['insutype']} / {g['setl_optins']} / {g['clr_type']}: {len(g['differences'])} difference(s)")
            lines.append(table(g["differences"], ["kind", "setl_id", "msgid", "journal_medfee", "bureau_medfee",
                                                  "action"]))
    return "\n".join(lines)


async def latest_of_each_day(journal: Journal, today: date | None = None) -> list[dict[str, Any]]:
    """The latest run of each statement day of the last WINDOW_DAYS, newest day first, and the newest run of all
    if its day is older: an earlier day reconciled by hand must not hide today's difference."""
    today = today or date.today()
    days = list((await journal.read(latest_runs("reconcile", (today - timedelta(days=WINDOW_DAYS)).isoformat(),
                                                today.isoformat()))).values())
    newest = await journal.runs("reconcile")
    return days + [r for r in newest if all(r.get("stmt_date") != d.get("stmt_date") for d in days)]


def not_balanced(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of the latest runs of each day, those with groups not balanced or trades unresolved."""
    return [{"stmt_date": r.get("stmt_date"), "unbalanced": r.get("unbalanced") or 0,
             "unresolved": len(r.get("unresolved") or [])} for r in runs if r.get("unbalanced") or r.get("unresolved")]


def show_groups(runs: list[dict[str, Any]]) -> None:
    """fep_reconciliation_groups: the groups of the latest run of each watched day, by result (the alert fires
    while any day's are unbalanced, not only the last run's)."""
    for result in ("balanced", "unbalanced"):
        metrics.RECONCILED_GROUPS.labels(result).set(sum(r[result] for r in runs if type(r.get(result)) is int))
