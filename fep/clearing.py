"""Month-end clearing (清算), as the insurance office and finance do it.

- apply: one application (3203) per group (insutype, setl_optins, clr_type) of the month's settlements, its
  amounts summed from the journal, and only for a group every day of which has balanced in the daily
  reconciliation (else the days that have not are named); the bureau's clr_appy_evt_id is kept.
- cancel: the application undone (3204), to be made again after a correction.
- remote: the month's 异地 clearing detail (3260, paged to the last page) compared row by row with the
  journal's 异地 settlements; every difference named; confirmed (3261) only when there is none.
- status: per group, settlements, applied, approved and refused (拒付, with reasons: the region's status
  trade, fep.yaml `clearing.status_trade`), disbursed (拨付) and what is still to come.
- paid: a disbursement from the bank's notice, kept with who entered it (as are applications and cancels).

The state is the journal's (schema 7: fep.journal's clearing queries), every change one durable write; the
trades go through the engine like any other (fep.reconcile.Reconciler.call).
"""

from __future__ import annotations

import re
from calendar import monthrange
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from twisted.internet import threads

from fep import envelope, journal
from fep.days import so_far
from fep.reconcile import CLR_TYPE, INSUTYPE, ZERO, Reconciler, ReconcileError, Settlement, dec

Group = tuple[str, str, str]  # (insutype, setl_optins, clr_type)
STATUS_HEADERS = ["险种类别", "结算经办机构", "清算类别", "结算笔数", "申请金额", "审核通过", "拒付", "拒付原因", "已拨付",
                  "未拨付", "状态"]
AMOUNT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")  # as the bank's notice writes yuan: plain, to the fen
STATES = {"applied": "已申请", "cancelled": "已撤销", None: "未申请"}
ALREADY_CONFIRMED = "已确认"  # the clearing centre's refusal of a 3261 for a month it holds confirmed
LEARN_LIMIT = 1000  # the month's 3203/3204 trades read back: a few per group, however often they are retried
CONFIRM_RUNS = 50  # the month's stored remote pulls searched for fep's own confirmation


class ClearingError(ValueError):
    """A clearing command cannot be done as asked; the message says why and what to do."""


def month_of(text: Any) -> tuple[date, date]:
    """"YYYY-MM" -> its first and last day."""
    try:
        first = datetime.strptime(str(text), "%Y-%m").date()
    except ValueError:
        raise ClearingError(f"month must be YYYY-MM, got {text!r}") from None
    return first, first.replace(day=monthrange(first.year, first.month)[1])


def not_over(month: str) -> str | None:
    """Why the month cannot be applied for or confirmed yet, or None once its last day is over: the days still
    to come cannot have balanced, and a settlement on them would never be applied for."""
    _, last = month_of(month)
    if date.today() > last:
        return None
    return f"{month} is not over: it ends on {last} (apply from {last + timedelta(days=1)})"


def group_of(text: Any) -> Group:
    parts = str(text or "").split("/")
    if len(parts) != 3 or not all(parts):
        raise ClearingError(f"a group is INSUTYPE/SETL_OPTINS/CLR_TYPE (e.g. 310/430199/11), got {text!r}")
    return parts[0], parts[1], parts[2]


class Clearing:
    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self.engine = reconciler.engine

    # ---- the month as the journal holds it --------------------------------------------------------------
    async def _by_day(self, month: str) -> dict[date, dict[Group, list[Settlement]]]:
        days = so_far(*month_of(month))
        found = await self.reconciler.settlements_between(days[0], days[-1]) if days else {}
        by_day: dict[date, dict[Group, list[Settlement]]] = {}
        for day in days:
            groups = by_day[day] = {}
            for s in found.get(day, []):
                groups.setdefault((s.insutype, s.setl_optins, s.clr_type), []).append(s)
        return by_day

    async def _settlements(self, month: str) -> dict[Group, list[Settlement]]:
        return merged(await self._by_day(month))

    async def _not_balanced(self, by_day: dict[date, dict[Group, list[Settlement]]]) -> dict[Group | None, list[str]]:
        """Days that did not balance, per group: its stored reconciliation said 不平 (or could not ask), or it
        holds other settlements than the journal now does (the amounts applied for would not be the ones that
        balanced); under None, days never reconciled."""
        out: dict[Group | None, list[str]] = {}
        runs = await self.engine.journal.read(journal.latest_runs(
            "reconcile", min(by_day).isoformat(), max(by_day).isoformat())) if by_day else {}
        for day, groups in by_day.items():
            run = runs.get(day.isoformat())
            if run is None:
                out.setdefault(None, []).append(f"{day} (not reconciled)")
                continue
            reconciled = {(g["insutype"], g["setl_optins"], g["clr_type"]): g for g in run["groups"]}
            for group, g in reconciled.items():
                if g["result"] != "平":
                    out.setdefault(group, []).append(f"{day} ({g['result']})")
            for group, rows in groups.items():
                g = reconciled.get(group)
                if g and g["result"] == "平" and (g["fixmedins_setl_cnt"], dec(g["medfee_sumamt"])) != (
                        len(rows), totals(rows)["medfee"]):
                    out.setdefault(group, []).append(f"{day} (settlements since it was reconciled)")
                elif g is None:
                    out.setdefault(group, []).append(f"{day} (not reconciled)")
        return out

    def _named(self, group: Group) -> dict[str, str]:
        names = {**CLR_TYPE, **dict(self.engine.cfg.clr_type_names)}
        return {"insutype": group[0], "setl_optins": group[1], "clr_type": group[2],
                "clr_type_name": names.get(group[2], "")}

    async def _clearings(self, month: str) -> dict[Group, dict[str, Any]]:
        return await self._learn(month)

    async def _learn(self, month: str) -> dict[Group, dict[str, Any]]:
        """Bring the clearing table up to the journal's stored answers of the month's 3203 and 3204: one
        whose answer was lost when it was sent is resent by fep and answered later, and the bureau holds what
        that answer says whether or not the office was told. The table as it then is, per group."""
        first, _ = month_of(month)
        since = datetime.combine(first, datetime.min.time()).timestamp()  # a month is applied for after it began
        trades = sorted([t for infno in ("3203", "3204") for t in await self.engine.journal.find(
            journal.TradeFilter(infno=infno, since=since, limit=LEARN_LIMIT))], key=lambda t: t.id)
        answered = await threads.deferToThread(_answered, trades, f"{first:%Y%m}")  # every body parsed: not here
        events = await self.engine.journal.read(journal.clearing_history(month))
        done = {(e["event"], e["note"]) for e in events}
        # read once, and kept as each write below leaves it: a 3204 may undo a 3203 learnt just before it
        held = {(r["insutype"], r["setl_optins"], r["clr_type"]): r
                for r in await self.engine.journal.read(journal.clearings_of(month))}
        for msgid, infno, data, evt in answered:
            if infno == "3203" and ("applied", f"clr_appy_evt_id {evt}") not in done:
                group = (str(data["insutype"]), str(data["clr_optins"]), str(data["clr_type"]))
                held[group] = await self.engine.journal.run(journal.clearing_applied(
                    month, group, _applied_totals(data), evt, f"fep, from the stored answer of 3203 {msgid}"))
                done.add(("applied", f"clr_appy_evt_id {evt}"))
            elif infno == "3204":
                group = next((g for g, r in held.items() if r["clr_appy_evt_id"] == evt and r["state"] == "applied"),
                             None)
                if group is not None:
                    held[group] = await self.engine.journal.run(journal.clearing_cancelled(
                        month, group, evt, f"fep, from the stored answer of 3204 {msgid}"))
        return held

    # ---- 3203 / 3204 ----------------------------------------------------------------------------------------
    async def apply(self, month: str, by: str) -> dict[str, Any]:
        first, last = month_of(month)
        unfinished = not_over(month)
        by_day = await self._by_day(month)
        groups = merged(by_day)
        bad = await self._not_balanced(by_day)
        done = await self._clearings(month)
        results = []
        for group, rows in sorted(groups.items()):
            t = totals(rows)
            r: dict[str, Any] = {**self._named(group), **{k: t[k] for k in ("settlements", "medfee", "fund", "acct")}}
            days = bad.get(None, []) + bad.get(group, [])
            if done.get(group, {}).get("state") == "applied":
                r.update(result="already applied", clr_appy_evt_id=done[group]["clr_appy_evt_id"])
            elif unfinished:
                r.update(result="not applied", why=unfinished)
            elif days:
                r.update(result="not applied", days=days,
                         why=f"every day must balance first: {', '.join(days)} (fep reconcile --date DAY)")
            else:
                r.update(await self._apply(month, first, last, group, t, by))
            results.append(r)
        return {"month": month, "groups": results, "applied": sum(r["result"] == "applied" for r in results)}

    async def _apply(self, month: str, first: date, last: date, group: Group, t: dict[str, Any],
                     by: str) -> dict[str, Any]:
        insutype, setl_optins, clr_type = group
        try:
            out = await self.reconciler.call("3203", {"data": {
                "insutype": insutype, "clr_optins": setl_optins, "clr_type": clr_type, "clr_way": "1",
                "setlym": first.strftime("%Y%m"), "psntime": t["settlements"], "medfee_sumamt": t["medfee"],
                "med_sumfee": t["medfee"], "fund_appy_sum": t["fund"], "cash_payamt": t["cash"], "acct_pay": t["acct"],
                "begndate": first.isoformat(), "enddate": last.isoformat()}})
        except ReconcileError as e:
            return {"result": "refused", "why": str(e)}
        evt = str((out.get("data") or {}).get("clr_appy_evt_id") or "")
        if not evt:
            return {"result": "refused", "why": "3203 answered without clr_appy_evt_id"}
        await self.engine.journal.run(journal.clearing_applied(month, group, t, evt, by))
        return {"result": "applied", "clr_appy_evt_id": evt}

    async def cancel(self, month: str, group: Group, by: str) -> dict[str, Any]:
        row = (await self._clearings(month)).get(group)
        if row is None or row["state"] != "applied":
            raise ClearingError(f"{month} {'/'.join(group)} has no application in force to cancel")
        try:
            await self.reconciler.call("3204", {"data": {"clr_appy_evt_id": row["clr_appy_evt_id"],
                                                         "clr_type": group[2]}})
        except ReconcileError as e:
            raise ClearingError(str(e)) from None
        return await self.engine.journal.run(journal.clearing_cancelled(month, group, row["clr_appy_evt_id"], by))

    # ---- 3260 / 3261: the 异地 clearing detail -------------------------------------------------------------
    async def remote(self, month: str) -> dict[str, Any]:
        first, _ = month_of(month)
        theirs = await self._remote_detail(first)
        home = self.engine.cfg.institution.mdtrtarea_admvs[:4]
        ours = {s.setl_id: s for rows in (await self._settlements(month)).values() for s in rows
                if s.insuplc and s.insuplc[:4] != home}
        diffs = [d for row in theirs if (d := _compared(row, ours.get(str(row.get("setl_sn")))))]
        listed = {str(row.get("setl_sn")) for row in theirs}
        diffs += [{"kind": "in the journal, not in the clearing detail", "setl_id": s.setl_id, "msgid": s.msgid,
                   "journal_medfee": s.medfee, "detail_medfee": None,
                   "action": "ask the clearing centre why it does not clear it: unconfirmed, it is not paid this "
                             "month"} for sid, s in ours.items() if sid not in listed]
        doc: dict[str, Any] = {"month": month, "rows": len(theirs), "journal": len(ours),
                               "medfee": sum((dec(r.get("medfee_sumamt")) for r in theirs), ZERO),
                               "differences": diffs, "confirmed": False}
        unfinished = not_over(month)
        if unfinished:
            doc["why"] = unfinished
        elif not diffs:
            await self._confirm(month, first, doc)
        await self.engine.journal.save_run("clearing-remote", month, doc)
        return doc

    async def _confirm(self, month: str, first: date, doc: dict[str, Any]) -> None:
        """3261, once: a month fep confirmed before (the same rows and fees) is not sent again, and the
        centre's "already confirmed" (已确认) is a confirmation, so a second run (cron's) says so and exits 0."""
        earlier = [r for r in await self.engine.journal.runs("clearing-remote", month, limit=CONFIRM_RUNS)
                   if r.get("confirmed") and (r.get("rows"), dec(r.get("medfee"))) == (doc["rows"], doc["medfee"])]
        if earlier:
            doc.update(confirmed=True, confirmed_earlier="by an earlier run of fep clearing remote")
            return
        try:
            await self.reconciler.call("3261", {"data": {"trt_year": f"{first:%Y}", "trt_month": f"{first:%m}",
                                                         "data_cnt": doc["rows"], "medfee_sumamt": doc["medfee"]}})
            doc["confirmed"] = True
        except ReconcileError as e:
            if ALREADY_CONFIRMED in str(e):
                doc.update(confirmed=True, confirmed_earlier=f"the clearing centre says so: {e}")
            else:
                doc["why"] = str(e)

    async def _remote_detail(self, first: date) -> list[dict[str, Any]]:
        """Every page of 3260, from the first row until a page comes back empty."""
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            try:
                out = await self.reconciler.call("3260", {"data": {
                    "trt_year": f"{first:%Y}", "trt_month": f"{first:%m}", "startrow": len(rows) + 1}})
            except ReconcileError as e:
                raise ClearingError(f"the 异地 clearing detail could not be fetched after {len(rows)} row(s): "
                                    f"{e}; nothing was confirmed") from None
            page = out.get("data") or []
            if not isinstance(page, list):
                raise ClearingError(f"3260 answered with {type(page).__name__} where a list of rows belongs")
            if not page:
                return rows
            again = seen & {str(r.get("setl_sn")) for r in page}
            if again:  # a bureau that ignores startrow would page for ever
                raise ClearingError(f"3260 from row {len(rows) + 1} answered rows already read "
                                    f"({', '.join(sorted(again))})")
            seen |= {str(r.get("setl_sn")) for r in page}
            rows += page

    # ---- status, and the bank's notice ------------------------------------------------------------------------
    async def status(self, month: str, ask_bureau: bool = True) -> dict[str, Any]:
        """The month's table; `ask_bureau`: first ask the region's status trade what its audit says now (the
        office's console does not: a page view sends nothing to the bureau, it shows what was last said)."""
        groups = await self._settlements(month)
        done = await self._clearings(month)
        trade = self.engine.cfg.clearing_status_trade if ask_bureau else None
        for group, row in list(done.items()):
            if trade and row["state"] == "applied":
                done[group] = await self._audit(trade, month, group, row)
        rows = []
        for group in sorted(set(groups) | set(done)):
            c = done.get(group) or {}
            # a cancelled application owes nothing either way: its audit (拒付) went with it
            in_force = c.get("state") == "applied"
            applied = dec(c.get("fund")) if in_force else ZERO
            refused, paid = dec(c.get("refused")) if in_force else ZERO, dec(c.get("paid"))
            rows.append({**self._named(group), "settlements": len(groups.get(group, [])), "applied": applied,
                         "approved": None if not in_force or c.get("approved") is None else dec(c["approved"]),
                         "refused": refused,
                         "refusals": envelope.loads(c["refusals"]) if in_force and c.get("refusals") else [],
                         "paid": paid,
                         "outstanding": applied - refused - paid if in_force else ZERO,
                         "state": STATES.get(c.get("state")),
                         "clr_appy_evt_id": c.get("clr_appy_evt_id")})
        history = await self.engine.journal.read(journal.clearing_history(month))
        return {"month": month, "groups": rows, "history": history}

    async def _audit(self, trade: str, month: str, group: Group, row: dict[str, Any]) -> dict[str, Any]:
        """What the bureau's audit says now; kept as it last said when the bureau cannot be asked."""
        try:
            out = (await self.reconciler.call(trade, {"data": {"clr_appy_evt_id": row["clr_appy_evt_id"]}})).get(
                "data") or {}
        except ReconcileError:
            return row
        refusals = [{"setl_id": r.get("setl_id"), "amount": dec(r.get("rej_amt")), "reason": r.get("rej_rea")}
                    for r in out.get("rejinfo") or []]
        return await self.engine.journal.run(journal.clearing_audited(
            month, group, str(dec(out.get("appr_amt"))), str(dec(out.get("rej_amt"))), refusals))

    async def paid(self, month: str, group: Group, amount: Any, note: str, by: str) -> dict[str, Any]:
        if not AMOUNT.fullmatch(str(amount)) or Decimal(str(amount)) <= 0:
            raise ClearingError(f"amount must be positive yuan with at most 2 places (1234.50), got {amount!r}")
        value = Decimal(str(amount))
        if not note.strip():
            raise ClearingError("say which bank notice it is (--note): it is kept with the payment")
        try:
            return await self.engine.journal.run(journal.clearing_paid(month, group, str(value), note.strip(), by))
        except LookupError as e:
            raise ClearingError(f"{e}: apply first (fep clearing apply --month {month})") from None
        except ValueError as e:
            raise ClearingError(str(e)) from None


def _answered(trades: list[journal.TradeRow], setlym: str) -> list[tuple[str, str, dict[str, Any], str]]:
    """(msgid, infno, data sent, clr_appy_evt_id) of the 3203s of month `setlym` (YYYYMM) and the 3204s the
    bureau said yes to, in the order given."""
    out = []
    for t in trades:
        answer = envelope.loads(t.answer) if t.answer else {}
        if not envelope.succeeded(answer):
            continue
        data = envelope.loads(t.request_bytes).get("input", {}).get("data") or {}
        if t.infno == "3203" and data.get("setlym") == setlym:
            evt = str(((answer.get("output") or {}).get("data") or {}).get("clr_appy_evt_id") or "")
            if evt:
                out.append((t.msgid, t.infno, data, evt))
        elif t.infno == "3204":
            out.append((t.msgid, t.infno, data, str(data.get("clr_appy_evt_id") or "")))
    return out


def _applied_totals(data: dict[str, Any]) -> dict[str, Any]:
    """The figures of an application, as its 3203 sent them."""
    return {"settlements": int(data.get("psntime") or 0), "medfee": dec(data.get("medfee_sumamt")),
            "fund": dec(data.get("fund_appy_sum")), "acct": dec(data.get("acct_pay")),
            "cash": dec(data.get("cash_payamt"))}


def merged(by_day: dict[date, dict[Group, list[Settlement]]]) -> dict[Group, list[Settlement]]:
    """The month's settlements per group."""
    groups: dict[Group, list[Settlement]] = {}
    for day_groups in by_day.values():
        for group, rows in day_groups.items():
            groups.setdefault(group, []).extend(rows)
    return groups


def totals(rows: list[Settlement]) -> dict[str, Any]:
    medfee, fund, acct = (sum((getattr(r, k) for r in rows), ZERO) for k in ("medfee", "fund", "acct"))
    return {"settlements": len(rows), "medfee": medfee, "fund": fund, "acct": acct, "cash": medfee - fund - acct}




def _compared(row: dict[str, Any], ours: Settlement | None) -> dict[str, Any] | None:
    """The difference between a row of the clearing detail and the journal's settlement, or None."""
    medfee, pays = dec(row.get("medfee_sumamt")), dec(row.get("optins_pay_sumamt"))
    base = {"setl_id": row.get("setl_sn"), "detail_medfee": medfee}
    if ours is None:
        return {**base, "kind": "in the clearing detail, not in the journal", "msgid": None, "journal_medfee": None,
                "action": "a settlement cleared that fep does not hold: look it up (5203) and in the day's "
                          "reconciliation; a 单边账 is reversed with fep reverse"}
    if (medfee, pays) != (ours.medfee, ours.fund + ours.acct):
        return {**base, "kind": "amounts differ", "msgid": ours.msgid, "journal_medfee": ours.medfee,
                "action": f"the detail has {medfee} (the insured region pays {pays}), the journal {ours.medfee} "
                          f"(pays {ours.fund + ours.acct}): raise it with the clearing centre before confirming"}
    return None


def _name(g: dict[str, Any]) -> list[str]:
    return [f"{g['insutype']} {INSUTYPE.get(g['insutype'], '')}".strip(), g["setl_optins"],
            f"{g['clr_type']} {g.get('clr_type_name', '')}".strip()]


def status_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The month's table, one row per group, with a totals row."""
    rows = [[*_name(g), str(g["settlements"]), str(g["applied"]), "" if g["approved"] is None else str(g["approved"]),
             str(g["refused"]), "; ".join(f"{r['setl_id']} {r['amount']} {r['reason']}" for r in g["refusals"]),
             str(g["paid"]), str(g["outstanding"]), g["state"]] for g in doc["groups"]]
    total = {k: sum((dec(g[k]) for g in doc["groups"]), ZERO) for k in ("applied", "refused", "paid", "outstanding")}
    approved = [g["approved"] for g in doc["groups"] if g["approved"] is not None]
    rows.append(["合计", "", "", str(sum(g["settlements"] for g in doc["groups"])), str(total["applied"]),
                 str(sum((dec(a) for a in approved), ZERO)) if approved else "", str(total["refused"]), "",
                 str(total["paid"]), str(total["outstanding"]), ""])
    return rows


def _confirmation(doc: dict[str, Any]) -> str:
    if doc["confirmed"]:
        return f"confirmed (3261, {doc['confirmed_earlier']})" if doc.get("confirmed_earlier") else "confirmed (3261)"
    return "NOT confirmed" + (f": {doc['why']}" if doc.get("why") else "")


def render(doc: dict[str, Any], fmt: str, what: str) -> str:
    """`what`: status, apply or remote; as a table, CSV or JSON, like reconciliation."""
    if fmt == "json":
        return envelope.dumps(doc).decode("utf-8")
    from fep.admin_cli import csv_text, table

    if what == "status":
        headers, rows = STATUS_HEADERS, status_rows(doc)
    elif what == "apply":
        headers = ["险种类别", "结算经办机构", "清算类别", "结算笔数", "医疗费总额", "基金申请金额", "结果", "清算申请事件ID", "说明"]
        rows = [[*_name(g), str(g["settlements"]), str(g["medfee"]), str(g["fund"]), g["result"],
                 g.get("clr_appy_evt_id") or "", g.get("why") or ""] for g in doc["groups"]]
    else:
        headers = ["kind", "setl_id", "msgid", "journal_medfee", "detail_medfee", "action"]
        rows = [[str(d.get(h) if d.get(h) is not None else "") for h in headers] for d in doc["differences"]]
    if fmt == "csv":
        return csv_text(headers, rows)
    lines = [f"清算月份 {doc['month']}"]
    if what == "remote":
        lines.append(f"异地清分明细 {doc['rows']} 行 (journal: {doc['journal']}), {len(doc['differences'])} difference(s); "
                     + _confirmation(doc))
    if rows:
        lines.append(table([dict(zip(headers, r)) for r in rows], headers))
    return "\n".join(lines)
