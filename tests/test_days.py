"""Days as the office means them, on the local clock: a day named alone is all of it, a DST day included, and
a month's days are those that have begun."""

from __future__ import annotations

import time
from datetime import date
from typing import Iterator

import pytest

from fep import days


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clock that changes for summer time (China's does not, so the box's own zone cannot show it)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_day_runs_from_its_midnight_to_the_next_by_the_clock_even_when_it_is_23_or_25_hours(berlin: None) -> None:
    for day, hours in ((date(2026, 3, 28), 24), (date(2026, 3, 29), 23), (date(2026, 10, 25), 25)):
        start, end = days.span(day)
        assert time.localtime(start)[:6] == (day.year, day.month, day.day, 0, 0, 0)
        assert round(end - start) == hours * 3600  # less the microsecond that keeps the next midnight out
        assert end < days.span(date.fromordinal(day.toordinal() + 1))[0]


def test_a_month_s_days_so_far_end_today_and_a_month_to_come_has_none() -> None:
    nov, last = date(2026, 11, 1), date(2026, 11, 30)
    assert days.so_far(nov, last, today=date(2026, 11, 3)) == [date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)]
    assert len(days.so_far(nov, last, today=date(2026, 12, 5))) == 30
    assert days.so_far(nov, last, today=date(2026, 10, 31)) == []
