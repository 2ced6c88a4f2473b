"""Admin work that outlasts the caller's wait (a reconciliation of many groups, a large catalog sync) goes on
as a job: it is never cut off, the caller gets its id, and follows it or looks it up later (`fep job ID`).
The work says how far it is with `progress(...)`, which is a no-op outside a job (the daily schedule).

Jobs live in memory: a restart forgets them, not their work's results (reconciliations and syncs are stored
runs in the journal). Their numbers are never given twice: each is kept in the journal (a "job" run) before the
caller hears it, and numbering goes on from the last one after a restart, so `fep job 1` asked after a restart
is "no job 1", never some later call that got the same number."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger

from fep.journal import Journal

log = Logger()
KEEP = 100  # finished jobs kept to be looked up; the oldest go first

_current: ContextVar[Job | None] = ContextVar("fep_job", default=None)


def progress(text: str) -> None:
    """How far the running job is, in the operator's words ("group 3 of 40"); shown by `fep job`."""
    job = _current.get()
    if job is not None:
        job.progress = text


@dataclass
class Job:
    call: str  # "POST /reconcile"
    id: int = 0  # given when the work outlasts its caller's wait
    started: float = field(default_factory=time.time)
    progress: str = ""
    finished: float | None = None
    status: int | None = None  # the call's own HTTP status and answer, when finished
    result: Any = None
    _waiters: list[defer.Deferred[None]] = field(default_factory=list, repr=False)

    def run(self, work: Callable[[], Awaitable[tuple[int, Any]]]) -> None:
        async def in_job() -> None:
            _current.set(self)  # in this job's own context: seen by everything the work awaits
            try:
                self.status, self.result = await work()
            except Exception:
                log.failure("admin call {call} failed", call=self.call)
                self.status, self.result = 500, {"error": f"internal error in fep during {self.call} (logged)"}
            self.finished = time.time()
            for w in list(self._waiters):  # a woken waiter removes itself from the list
                if not w.called:
                    w.callback(None)

        defer.ensureDeferred(in_job())

    async def wait(self, reactor: Any, seconds: float) -> bool:
        """True when the work is finished, waiting for it at most `seconds`."""
        if self.finished is None and seconds > 0:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            timer = reactor.callLater(seconds, lambda: waiter.called or waiter.callback(None))
            await waiter
            if timer.active():
                timer.cancel()
            self._waiters.remove(waiter)
        return self.finished is not None

    def summary(self) -> dict[str, Any]:
        end = self.finished or time.time()
        return {"id": self.id, "call": self.call, "state": "running" if self.finished is None else "finished",
                "started": datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": round(end - self.started, 1), "progress": self.progress, "status": self.status,
                "result": self.result}


class Jobs:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.jobs: dict[int, Job] = {}
        self.last_id: int | None = None  # read from the journal at the first job

    async def add(self, job: Job) -> Job:
        """Numbers the job, durably, and keeps it to be looked up."""
        if self.last_id is None:
            last = await self.journal.runs("job")
            if self.last_id is None:  # a job added meanwhile has read it already
                self.last_id = int(last[0]["id"]) if last else 0
        self.last_id += 1
        job.id = self.last_id
        await self.journal.save_run("job", str(job.id), {"id": job.id, "call": job.call})
        self.jobs[job.id] = job
        done = [j for j in self.jobs.values() if j.finished is not None]
        for old in done[:max(0, len(done) - KEEP)]:
            del self.jobs[old.id]
        return job

    def get(self, job_id: int) -> Job | None:
        return self.jobs.get(job_id)
