"""What each console page shows, gathered from fep's own figures: the admin status and trade views
(fep.admin), the stored reconciliations (fep.reconcile) and the month's clearing (fep.clearing).

Every figure is read through the journal's named queries on its reader threads; nothing here asks the bureau
for a page of its own, or runs when nobody looks: the month's clearing status is what the region's status trade
last said (`fep clearing status` asks it anew)."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any, Callable

import simplejson
from twisted.internet import threads

from fep import health, reconcile
from fep.admin import AdminService
from fep.admin_cli import show_text
from fep.clearing import STATUS_HEADERS, Clearing, month_of, render as clearing_render, status_rows
from fep.console.svg import Series, bars
from fep.days import so_far, span
from fep.journal import ANSWERED_STATES, TradeFilter, TradeRow, answered_outcomes, latest_runs, trade_counts
from fep.reconcile import ZERO
from fep.states import State

LISTED = 50  # rows of a queue shown on Today; the command lists them all
BEING_RESOLVED = (State.UNKNOWN, State.RESOLVING, State.REVOKING)
ANSWERED = {s.value for s in ANSWERED_STATES}


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
        week_ago = today - timedelta(days=7)
        counts, outcomes = await self.journal.read(lambda conn: (
            trade_counts(*span(today))(conn), answered_outcomes(*span(today))(conn)))
        before = await self.journal.read(trade_counts(*span(week_ago)))
        kinds, results = by_kind(counts, outcomes)
        queued = await self.journal.find(TradeFilter(state=State.QUEUED, limit=LISTED))
        resolving = [r for s in BEING_RESOLVED for r in await self.journal.find(TradeFilter(state=s, limit=LISTED))]
        chart = bars(f"trades per hour, today and {week_ago:%A} last week",
                     [f"{h:02d}" for h in range(24)],
                     [Series("today", hours(counts)), Series("a week ago", hours(before))], every=2)
        return {"status": status, "day": today.isoformat(), "total": sum(n for *_, n in counts),
                "kinds": [{"infno": infno, "name": self._name(infno), "results": c, "total": sum(c.values())}
                          for infno, c in sorted(kinds.items())], "results": results,
                "queued": [self._brief(r) for r in queued],
                "resolving": [self._brief(r) for r in sorted(resolving, key=lambda r: r.created)],
                "attention": attention(status, datetime.now(), self._name), "chart": chart}

    def _brief(self, r: TradeRow) -> dict[str, Any]:
        return {"msgid": r.msgid, "infno": r.infno, "name": self._name(r.infno), "state": r.state.value,
                "psn_no": r.psn_no, "since": datetime.fromtimestamp(r.created).strftime("%H:%M:%S"),
                "attempts": r.attempts, "note": r.note or ""}

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
        runs = await self.journal.read(latest_runs("reconcile", first.isoformat(), last.isoformat()))
        for day in so_far(first, last):
            doc = runs.get(day.isoformat())
            days.append({"day": day.isoformat(), "result": None if doc is None else
                         ("平" if not doc.get("unbalanced") and not doc.get("unresolved") else "不平"),
                         "unbalanced": (doc.get("unbalanced") or 0) if doc else 0})  # (early runs lack counts)
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
        text, sent, answer = await threads.deferToThread(readable, t)  # a 9102's answer holds a whole file
        return {"t": t, "name": self._name(t["infno"]), "text": text, "sent": sent, "answer": answer}


def readable(t: dict[str, Any]) -> tuple[str, str, str]:
    """The trade's story, its request and its answer, as the trade page shows them."""
    return show_text(t), pretty(t["request"]), pretty(t["answer"]) if t["answer"] else "none"


def attention(status: dict[str, Any], now: datetime, name: Callable[[str], str]) -> list[dict[str, Any]]:
    """What needs a person today, by the rules `fep status --check` judges by (fep.health): what happened,
    what to do, and the `fep` command that does it. `name`: a trade number's name."""
    return [item for p in health.check(status, now).problems for item in _todo(p, status, name)]


def _todo(p: health.Problem, status: dict[str, Any], name: Callable[[str], str]) -> list[dict[str, Any]]:
    if p.rule == "journal":
        return [_need("the journal cannot write: new trades are refused", "free space on the journal's disk (or "
                      "fix its fault); fep writes again by itself", "fep status")]
    if p.rule == "link":
        return [_need(f"the bureau endpoint {e['name']} is down ({e['url']})", "check the line to the bureau; "
                      "uploads that can wait are queued and sent when it is back", "fep status") for e in p.about]
    if p.rule == "signin":
        return [_need("fep is not signed in to the bureau (9001)", "it signs in by itself; if this stays, read "
                      "fep's log", "journalctl -u fep")]
    if p.rule == "unknown":
        return [_need(p.text, "fep finds out by itself (the trades being resolved, below); if this stays, read "
                      "their lives and fep's log", "fep trades --state UNKNOWN")]
    if p.rule == "parked":
        return [_need(f"{t['infno']} {name(t['infno'])} {t['msgid']} parked since {t['since']}: "
                      f"{t['note'] or ''}", "read its life; once the cause is fixed send it on, or give it up "
                      "saying why", f"fep show {t['msgid']}", f"fep replay {t['msgid']}",
                      f"fep drop {t['msgid']} --reason \"...\"", msgid=t["msgid"]) for t in p.about]
    if p.rule == "queue":
        return [_need(p.text, "they are sent in order once the bureau takes them: check the line to the bureau",
                      "fep status")]
    if p.rule == "certificate":
        seconds = status["certificates"][p.about]
        when = "has expired" if seconds <= 0 else f"expires in {seconds // 86400} days"
        return [_need(f"the certificate {p.about} {when}", "have a new one issued, put it in place, then reload",
                      "fep reload")]
    if p.rule == "reconciliation":
        day = p.about["stmt_date"]
        return [_need(f"the reconciliation of {day}: {p.about['unbalanced']} group(s) not balanced, "
                      f"{p.about.get('unresolved') or 0} trade(s) not resolved", "see each difference and what to "
                      "do about it on the day's page; reconcile again once they are undone",
                      f"fep reconcile --date {day}", link=f"/day?date={day}")]
    if p.rule == "reconcile_due":
        yesterday = (date.today() - timedelta(days=1)).isoformat()
        return [_need(p.text, "reconcile with the bureau (schedule.reconcile_daily_at does it every day); if it "
                      "did not run, read fep's log", f"fep reconcile --date {yesterday}",
                      link=f"/day?date={yesterday}")]
    return [_need(p.text, "see what fep's check says", "fep status --check")]


def _need(what: str, todo: str, *commands: str, msgid: str | None = None, link: str | None = None) -> dict[str, Any]:
    return {"what": what, "todo": todo, "commands": commands, "msgid": msgid, "link": link}


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
Counts = list[tuple[float, str, str, int]]  # fep.journal.trade_counts: (quarter hour, infno, state, trades)
Outcomes = dict[tuple[str, str, "bool | None"], int]  # fep.journal.answered_outcomes


def by_kind(counts: Counts, outcomes: Outcomes) -> tuple[dict[str, Counter[str]], list[str]]:
    """Trades per trade number and result, and the results that occur: the bureau's yes and no first, then the
    states in the order of fep.states. A result is what the office calls it: the bureau's yes or no once
    answered, else where the trade stands (an answer that cannot be read: its state)."""
    kinds: dict[str, Counter[str]] = {}
    for _, infno, state, n in counts:
        if state not in ANSWERED:  # those are counted by what the bureau said
            kinds.setdefault(infno, Counter())[state] += n
    for (infno, state, ok), n in outcomes.items():
        kinds.setdefault(infno, Counter())[state if ok is None else SUCCEEDED if ok else REFUSED] += n
    seen = {s for c in kinds.values() for s in c}
    return kinds, [s for s in (SUCCEEDED, REFUSED, *(s.value for s in State)) if s in seen]


def hours(counts: Counts) -> list[int]:
    """Trades per hour of the local clock (a quarter hour of Unix time is within one hour of any zone's)."""
    per: Counter[int] = Counter()
    for quarter, _, _, n in counts:
        per[datetime.fromtimestamp(quarter).hour] += n
    return [per.get(h, 0) for h in range(24)]
