"""Daily jobs at a configured time of day (reconciliation, catalog sync), run once a day each."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()


class Daily:
    def __init__(self, reactor: Any, name: str, at: str | None, job: Callable[[], Awaitable[Any]]) -> None:
        self.name, self.at, self.job = name, at, job
        self.last: date | None = date.today() if at and datetime.now().strftime("%H:%M") >= at else None
        self.loop = task.LoopingCall(self._check)
        self.loop.clock = reactor

    def start(self) -> None:
        if self.at:
            self.loop.start(30.0, now=False)

    def _check(self) -> None:
        if self.last == date.today() or datetime.now().strftime("%H:%M") < (self.at or "99"):
            return
        self.last = date.today()
        d = defer.ensureDeferred(self.job())
        d.addCallbacks(lambda _: log.info("daily {name} done", name=self.name),
                       lambda f: log.failure("daily {name} failed; it runs again tomorrow, or by hand", f,
                                             name=self.name))

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
