"""The office's views read the journal once per question, not once per day or per row: the reconciliation
watch (`fep status`, the console's Today) and the month's days take one statement for the whole window, and
the console's Today counts the day's trades in the store; on SQLite and PostgreSQL alike (the `journal_url`
fixture), with the answers the day-by-day and row-by-row reads gave."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

import pytest

from fep import journal as journal_mod
from fep import days, reconcile
from fep.console import pages
from tests.rooms import Bench
from tests.test_journal_backends import bench  # noqa: F401 (on both backends)

TODAY = date(2026, 11, 23)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the journal's readers run, as they run it."""
    seen: list[str] = []
    fetch = journal_mod._fetch

    def recording(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        seen.append(sql)
        return fetch(conn, sql, params)

    monkeypatch.setattr(journal_mod, "_fetch", recording)
    return seen


def reconciled(bench: Bench, day: date, run: int) -> None:
    bench.run(bench.journal.save_run("reconcile", day.isoformat(), {"stmt_date": day.isoformat(), "run": run,
                                                                   "unbalanced": run % 2, "unresolved": []}))


def test_the_watched_days_latest_runs_are_read_in_one_statement(bench: Bench, statements: list[str]) -> None:
    # Forty days reconciled each morning, every third one again by hand; then a day long past reconciled by hand
    # last of all: the newest run of all, outside the window.
    for n in range(40, -1, -1):
        day = TODAY - timedelta(days=n)
        reconciled(bench, day, 1)
        if n % 3 == 0:
            reconciled(bench, day, 2)
    reconciled(bench, TODAY - timedelta(days=90), 1)
    statements.clear()

    runs = bench.run(reconcile.latest_of_each_day(bench.journal, TODAY))

    window = [TODAY - timedelta(days=n) for n in range(reconcile.WINDOW_DAYS + 1)]
    assert [(r["stmt_date"], r["run"]) for r in runs] == [(d.isoformat(), 2 if (TODAY - d).days % 3 == 0 else 1)
                                                          for d in window] + [((TODAY - timedelta(days=90))
                                                                               .isoformat(), 1)]
    assert len(statements) == 2, statements  # the window's days at once, and the newest run of all


def test_a_month_s_days_are_read_in_one_statement_and_an_unreconciled_day_is_missing(
        bench: Bench, statements: list[str]) -> None:
    first = TODAY.replace(day=1)
    for d in range(1, 20):
        if d != 7:
            reconciled(bench, first.replace(day=d), 1)
    reconciled(bench, first.replace(day=3), 2)
    reconciled(bench, first - timedelta(days=1), 1)  # the month before: not this month's
    statements.clear()

    runs = bench.run(bench.journal.read(journal_mod.latest_runs("reconcile", first.isoformat(),
                                                                first.replace(day=30).isoformat())))

    assert len(statements) == 1
    assert list(runs) == [first.replace(day=d).isoformat() for d in range(19, 0, -1) if d != 7]
    assert runs[first.replace(day=3).isoformat()]["run"] == 2


def at(bench: Bench, infno: str, when: datetime, event: str | None = None, answer: str | None = None,
       **fields: Any) -> None:
    """A trade the HIS sent at `when` (the clock's), moved on by `event` with the bureau's `answer`."""
    row = bench.accept(infno, {"psn_no": "P1"})
    if event:
        bench.run(bench.journal.transition(row.msgid, event, answer=answer, **fields))
    bench.run(bench.journal.run(lambda conn: conn.execute("UPDATE trades SET created = ? WHERE msgid = ?",
                                                          (when.timestamp(), row.msgid))))


def test_today_s_trades_are_counted_per_hour_kind_and_result_in_the_store(bench: Bench,
                                                                          statements: list[str]) -> None:
    def clock(h: int, m: int, s: float = 0) -> datetime:
        return datetime.combine(TODAY, datetime.min.time()) + timedelta(hours=h, minutes=m, seconds=s)

    yes, no = '{"infcode": 0, "output": {}}', '{"infcode": -1, "err_msg": "参保人不存在"}'
    at(bench, "1101", clock(9, 10), "answer", yes)
    at(bench, "1101", clock(9, 50), "answer", no)
    at(bench, "2207", clock(10, 5), "answer", yes)
    at(bench, "2207", clock(10, 59, 59.5), "answer_held", yes, deadline=1e12)
    at(bench, "2207", clock(23, 59, 59.9), "lost", attempts=1)
    at(bench, "9102", clock(14, 0), "answer", "not an envelope")  # answered, but not in a form to read
    at(bench, "1101", clock(0, 0) - timedelta(seconds=1), "answer", yes)  # yesterday's
    at(bench, "1101", clock(24, 0), "answer", yes)  # tomorrow's
    statements.clear()

    counts, outcomes = bench.run(bench.journal.read(lambda conn: (
        journal_mod.trade_counts(*days.span(TODAY))(conn), journal_mod.answered_outcomes(*days.span(TODAY))(conn))))

    assert len(statements) == 2  # counted in the store: no trade's row is read out
    kinds, results = pages.by_kind(counts, outcomes)
    assert kinds == {"1101": Counter({pages.SUCCEEDED: 1, pages.REFUSED: 1}),
                     "2207": Counter({pages.SUCCEEDED: 2, "UNKNOWN": 1}), "9102": Counter({"ANSWERED": 1})}
    assert results == [pages.SUCCEEDED, pages.REFUSED, "ANSWERED", "UNKNOWN"]
    per_hour = pages.hours(counts)
    assert (per_hour[9], per_hour[10], per_hour[14], per_hour[23], sum(per_hour)) == (2, 2, 1, 1, 6)
