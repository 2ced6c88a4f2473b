"""Days as the office means them: on the local clock, whatever a day's length (a DST day has 23 or 25 hours)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta


def span(day: date) -> tuple[float, float]:
    """The day's first and last instant (its next midnight less a microsecond): ranges include their ends."""
    return (datetime.combine(day, time.min).timestamp(),
            datetime.combine(day + timedelta(days=1), time.min).timestamp() - 1e-6)


def so_far(first: date, last: date, today: date | None = None) -> list[date]:
    """The days from first to last that have begun: up to today."""
    end = min(last, today or date.today())
    return [first + timedelta(days=n) for n in range((end - first).days + 1)]
