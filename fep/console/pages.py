"""What each console page shows, gathered from fep's own figures: the admin status and trade views
(fep.admin), the stored reconciliations (fep.reconcile) and the month's clearing (fep.clearing).

Every figure is read through the journal's named queries on its reader threads; nothing here asks the bureau
for a page of its own, or runs when nobody looks: the month's clearing status is what the region's status trade
last said (`fep clearing status` asks it anew)."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

import simplejson
from twisted.internet import threads

from fep import envelope, health, reconcile
from fep.admin import MAX_LIMIT, AdminService
from fep.admin_cli import show_text
from fep.clearing import STATUS_HEADERS, Clearing, month_of, render as clearing_render, status_rows
from fep.console.svg import Series, bars
from fep.journal import TradeFilter, TradeRow
from fep.reconcile import ZERO
from fep.states import State

LISTED = 50  # rows of a queue shown on Today; the command lists them all
BEING_RESOLVED = (State.UNKNOWN, State.RESOLVING, State.REVOKING)


def midnight(day: date) -> float:
    return datetime.combine(day, datetime.min.time()).timestamp()


class Pages:
    def __init__(self, service: AdminService, clearing: Clearing) -> None:
        self.service = service
        self.clearing = clearing
        self.engine = service.engine
        self.journal = service.engine.journal

    def _name(self, infno: str) -> str:
        trade = self.engine.trades.defs.get(infno)
        return trade.name if trade else ""

    # ---- Today ----------------------------------------------------------------------------------------------
    async def today(self) -> dict[str, Any]:
        status = await self.service.status()
        today = date.today()
        rows = await self._day_rows(today)
        week_ago = await self._day_rows(today - timedelta(days=7))
        kinds, results = await threads.deferToThread(by_kind, rows)
        queued = await self.journal.find(TradeFilter(state=State.QUEUED, limit=LISTED))
        resolving = [r for s in BEING_RESOLVED for r in await self.journal.find(TradeFilter(state=s, limit=LISTED))]
        chart = bars(f"trades per hour, today and {today - timedelta(days=7):%A} last week",
                     [f"{h:02d}" for h in range(24)],
                     [Series("today", hours(rows)), Series("a week ago", hours(week_ago))], every=2)
        return {"status": status, "day": today.isoformat(), "total": len(rows), "capped": len(rows) >= MAX_LIMIT,
                "kinds": [{"infno": infno, "name": self._name(infno), "results": c, "total": sum(c.values())}
                          for infno, c in sorted(kinds.items())], "results": results,
                "queued": [self._brief(r) for r in queued],
                "resolving": [self._brief(r) for r in sorted(resolving, key=lambda r: r.created)],
                "attention": await self._attention(status), "chart": chart}

    async def _day_rows(self, day: date) -> list[TradeRow]:
        start = midnight(day)
        return await self.journal.find(TradeFilter(since=start, until=start + 86400 - 0.001, limit=MAX_LIMIT))

    def _brief(self, r: TradeRow) -> dict[str, Any]:
        return {"msgid": r.msgid, "infno": r.infno, "name": self._name(r.infno), "state": r.state.value,
                "psn_no": r.psn_no, "since": datetime.fromtimestamp(r.created).strftime("%H:%M:%S"),
                "attempts": r.attempts, "note": r.note or ""}

    async def _attention(self, status: dict[str, Any]) -> list[dict[str, Any]]:
        """What needs a person today: what happened, what to do, and the `fep` command that does it."""
        items = []

        def need(what: str, todo: str, *commands: str, msgid: str | None = None, link: str | None = None) -> None:
            items.append({"what": what, "todo": todo, "commands": commands, "msgid": msgid, "link": link})

        if status.get("journal_cannot_write"):
            need("the journal cannot write: new trades are refused", "free space on the journal's disk (or fix "
                 "its fault); fep writes again by itself", "fep status")
        down = [e for e in status["endpoints"] if e["up"] is False]
        for e in down:
            need(f"the bureau endpoint {e['name']} is down ({e['url']})", "check the line to the bureau; uploads "
                 "that can wait are queued and sent when it is back", "fep status")
        if not status["signed_in"] and len(down) < len(status["endpoints"]):
            need("fep is not signed in to the bureau (9001)", "it signs in by itself; if this stays, read fep's log",
                 "journalctl -u fep")
        for t in status["needs_attention"]:
            need(f"{t['infno']} {self._name(t['infno'])} {t['msgid']} parked since {t['since']}: {t['note'] or ''}",
                 "read its life; once the cause is fixed send it on, or give it up saying why",
                 f"fep show {t['msgid']}", f"fep replay {t['msgid']}", f"fep drop {t['msgid']} --reason \"...\"",
                 msgid=t["msgid"])
        last = status.get("last_reconciliation")
        if last and (last["unbalanced"] or last["unresolved"]):
            need(f"the reconciliation of {last['stmt_date']}: {last['unbalanced']} group(s) not balanced, "
                 f"{last['unresolved']} trade(s) not resolved", "see each difference and what to do about it on the "
                 "day's page; reconcile again once they are undone", f"fep reconcile --date {last['stmt_date']}",
                 link=f"/day?date={last['stmt_date']}")
        yesterday = (date.today() - timedelta(days=1)).isoformat()
        if not await self.journal.runs("reconcile", yesterday, limit=1):
            need(f"{yesterday} has not been reconciled", "reconcile it with the bureau (schedule."
                 "reconcile_daily_at does it every day)", f"fep reconcile --date {yesterday}",
                 link=f"/day?date={yesterday}")
        for name, seconds in sorted(status.get("certificates", {}).items()):
            if seconds < health.CERT_WARNING:
                when = "has expired" if seconds <= 0 else f"expires in {seconds // 86400} days"
                need(f"the certificate {name} {when}",
                     "have a new one issued, put it in place, then reload", "fep reload")
        return items

    # ---- The day --------------------------------------------------------------------------------------------
    async def reconciliation(self, day: date) -> dict[str, Any] | None:
        runs = await self.journal.runs("reconcile", day.isoformat(), limit=1)
        return runs[0] if runs else None

    async def day(self, day: date) -> dict[str, Any]:
        doc = await self.reconciliation(day)
        return {"day": day.isoformat(), "doc": doc, "headers": reconcile.HEADERS,
                "rows": reconcile.table_rows(doc) if doc else [],
                "before": (day - timedelta(days=1)).isoformat(), "after": (day + timedelta(days=1)).isoformat()}

    async def day_csv(self, day: date) -> str | None:
        """As `fep reconcile --format csv` prints it (the stored run of the day)."""
        doc = await self.reconciliation(day)
        return None if doc is None else reconcile.render(doc, "csv") + "\n"

    # ---- The month ------------------------------------------------------------------------------------------
    async def month(self, month: str) -> dict[str, Any]:
        first, last = month_of(month)
        status = await self.clearing.status(month, ask_bureau=False)
        days = []
        for d in range(1, last.day + 1):
            day = first.replace(day=d)
            if day > date.today():
                break
            doc = await self.reconciliation(day)
            days.append({"day": day.isoformat(), "result": None if doc is None else
                         ("平" if not doc["unbalanced"] and not doc["unresolved"] else "不平"),
                         "unbalanced": doc["unbalanced"] if doc else 0})
        remote = await self.journal.runs("clearing-remote", month, limit=1)
        settled = await self.clearing.reconciler.settlements_between(first, min(last, date.today())) \
            if first <= date.today() else {}
        amounts = [sum((s.medfee for s in settled.get(first.replace(day=d), [])), ZERO) for d in range(1, last.day + 1)]
        chart = bars(f"settled amount (医疗费总额, yuan) per day of {month}",
                     [str(d) for d in range(1, last.day + 1)], [Series("settled", amounts)])
        return {"month": month, "status": status, "headers": STATUS_HEADERS, "rows": status_rows(status),
                "attention": month_attention(month, days, status, last < date.today()),
                "days": days, "remote": remote[0] if remote else None, "chart": chart, "total": sum(amounts, ZERO),
                "before": (first - timedelta(days=1)).strftime("%Y-%m"),
                "after": (last + timedelta(days=1)).strftime("%Y-%m")}

    async def month_csv(self, month: str) -> str:
        """As `fep clearing status --format csv` prints it."""
        return clearing_render(await self.clearing.status(month, ask_bureau=False), "csv", "status") + "\n"

    # ---- A trade ----------------------------------------------------------------------------------------------
    async def trade(self, msgid: str) -> dict[str, Any]:
        t = await self.service.show(msgid)  # Refused(404) when there is no such trade
        return {"t": t, "name": self._name(t["infno"]), "text": show_text(t), "sent": pretty(t["request"]),
                "answer": pretty(t["answer"]) if t["answer"] else "none"}


def pretty(doc: Any) -> str:
    """JSON for reading, its amounts exact (Decimal) and its Chinese as written."""
    return simplejson.dumps(doc, use_decimal=True, indent=1, ensure_ascii=False)


def month_attention(month: str, days: list[dict[str, Any]], status: dict[str, Any], over: bool) -> list[dict[str, Any]]:
    """What the month still needs before it can be cleared, and the commands that do it."""
    items = []
    bad = [d["day"] for d in days if d["result"] != "平"]
    if bad:
        items.append({"what": f"{len(bad)} day(s) not balanced or not reconciled: {', '.join(b[8:] for b in bad)}",
                      "todo": "undo each day's differences and reconcile it again: the month is applied for only "
                              "when every day balanced", "commands": [f"fep reconcile --date {d}" for d in bad[:5]],
                      "link": f"/day?date={bad[0]}", "msgid": None})
    waiting = [g for g in status["groups"] if g["state"] == "未申请" and g["settlements"]]
    if over and waiting and not bad:
        items.append({"what": f"{len(waiting)} group(s) not applied for clearing (清算申请)",
                      "todo": "apply for the month's clearing", "commands": [f"fep clearing apply --month {month}"],
                      "link": None, "msgid": None})
    return items


SUCCEEDED, REFUSED = "succeeded", "refused by the bureau"
ANSWERED = {State.ANSWERED, State.AWAITING_CONFIRM, State.CONFIRMED}


def result(r: TradeRow) -> str:
    """What the office calls a trade's result: the bureau's yes or no once answered, else where it stands."""
    if r.state not in ANSWERED or not r.answer:
        return r.state.value
    try:
        code = envelope.top_field(r.answer, "infcode")  # its infcode alone: a 9102 answer holds a whole file
    except ValueError:
        return r.state.value
    return SUCCEEDED if str(code).strip() == "0" else REFUSED


def by_kind(rows: list[TradeRow]) -> tuple[dict[str, Counter[str]], list[str]]:
    """Trades per trade number and result, and the results that occur: the bureau's yes and no first, then the
    states in the order of fep.states."""
    kinds: dict[str, Counter[str]] = {}
    for r in rows:
        kinds.setdefault(r.infno, Counter())[result(r)] += 1
    seen = {s for c in kinds.values() for s in c}
    return kinds, [s for s in (SUCCEEDED, REFUSED, *(s.value for s in State)) if s in seen]


def hours(rows: list[TradeRow]) -> list[int]:
    per = Counter(datetime.fromtimestamp(r.created).hour for r in rows)
    return [per.get(h, 0) for h in range(24)]

