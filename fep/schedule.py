"""Daily jobs at a configured time of day (reconciliation, catalog sync, backup, archive), run once a day each.

Each remembers in the journal (runs of kind "daily") the day it last ran for: a job whose time passed while fep
was down runs as soon as fep is back, once, and the log names the days it missed (as anacron does).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from fep.journal import Journal

log = Logger()
KIND = "daily"


class Daily:
    def __init__(self, reactor: Any, name: str, at: str | None, job: Callable[[], Awaitable[Any]],
                 journal: Journal) -> None:
        self.name, self.at, self.job, self.journal = name, at, job, journal
        self.last: date | None = None  # the day it last ran for
        self.loop = task.LoopingCall(self._check)
        self.loop.clock = reactor

    def _due(self) -> date:
        """The latest day whose time has come: today once it is past `at`, else yesterday."""
        now = datetime.now()
        return now.date() if now.strftime("%H:%M") >= (self.at or "99") else now.date() - timedelta(days=1)

    async def start(self) -> None:
        if not self.at:
            return
        runs = await self.journal.runs(KIND, self.name)
        if runs:
            self.last = date.fromisoformat(runs[0]["day"])
            if self.last < self._due():
                missed = [self.last + timedelta(days=i) for i in range(1, (self._due() - self.last).days + 1)]
                log.warn("daily {name} (at {at}) did not run for {days}: fep was down; it runs now, once",
                         name=self.name, at=self.at, days=", ".join(d.isoformat() for d in missed))
        else:  # the first start with this job: nothing was missed yet
            self.last = self._due()
            await self.journal.save_run(KIND, self.name, {"day": self.last.isoformat(), "first": True})
        self.loop.start(30.0, now=True)

    def _check(self) -> None:
        due = self._due()
        if self.last is not None and self.last >= due:
            return
        self.last = due
        defer.ensureDeferred(self._run(due))

    async def _run(self, day: date) -> None:
        try:
            await self.job()
            ok = True
            log.info("daily {name} done", name=self.name)
        except Exception:
            ok = False
            log.failure("daily {name} failed; it runs again tomorrow, or by hand", name=self.name)
        await self.journal.save_run(KIND, self.name, {"day": day.isoformat(), "ok": ok,
                                                      "at": datetime.now().strftime("%Y-%m-%d %H:%M:%S")})

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
