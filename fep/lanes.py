"""Per insured person: one send at a time, and deferred work in arrival order.

One keyed queue (the shape of Synapse's BatchingQueue, keyed by psn_no). Each person's lane has a send
slot, held only while a trade of theirs is at the bureau, and the person's deferred work: uploads
acknowledged as queued, and any that are being resolved or are parked, in the order the HIS sent them.
The head holds the rest back. A lane with nothing in it is forgotten.

The drain sends the head with `deliver` and reads what became of it: gone on (NEXT), holding the
queue (HOLD: parked or being resolved), or not sent (LATER: the bureau is unreachable; tried again on
the next kick).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


class Step(Enum):
    NEXT = "next"
    HOLD = "hold"
    LATER = "later"


class LaneBusy(Exception):
    """The person's send slot did not come free in time; nothing was sent. The message names what holds it."""


@dataclass
class _Lane:
    slot: defer.DeferredLock = field(default_factory=defer.DeferredLock)
    holder: str = ""  # what is at the bureau for this person now, for the HIS's message
    deferred: list[str] = field(default_factory=list)  # msgids, in arrival order
    draining: bool = False

    @property
    def empty(self) -> bool:
        return not self.deferred and not self.draining and not self.slot.locked and not self.slot.waiting


class Lanes:
    def __init__(self, clock: Any, deliver: Callable[[str], Awaitable[Step]]) -> None:
        self._clock = clock
        self._deliver = deliver
        self._lanes: dict[str, _Lane] = {}

    def _lane(self, psn: str) -> _Lane:
        return self._lanes.setdefault(psn, _Lane())

    def _forget_if_empty(self, psn: str) -> None:
        lane = self._lanes.get(psn)
        if lane is not None and lane.empty:
            del self._lanes[psn]

    # ---- the send slot -------------------------------------------------------------------------
    @asynccontextmanager
    async def sending(self, psn: str | None, what: str,
                      within: float | None = None) -> AsyncIterator[Callable[[str], None]]:
        """Hold the person's send slot while `what` is at the bureau; yields a way to name it better once
        it has a msgid. `within`: seconds to wait for the slot, then LaneBusy. Without a person there is
        nothing to order."""
        if not psn:
            yield lambda _: None
            return
        lane = self._lane(psn)
        acquiring = lane.slot.acquire()
        if within is not None:
            acquiring.addTimeout(max(within, 0.0), self._clock)
        try:
            await acquiring
        except defer.TimeoutError:
            busy = lane.holder
            self._forget_if_empty(psn)
            raise LaneBusy(f"this person's {busy or 'earlier trade'} is still at the bureau") from None
        lane.holder = what

        def name(better: str) -> None:
            lane.holder = better

        try:
            yield name
        finally:
            lane.holder = ""
            lane.slot.release()
            self._forget_if_empty(psn)

    # ---- deferred work ----------------------------------------------------------------------------
    def defer(self, psn: str, msgid: str) -> None:
        """`msgid` joins the person's deferred work (once), behind what is there."""
        lane = self._lane(psn)
        if msgid not in lane.deferred:
            lane.deferred.append(msgid)

    def done(self, psn: str, msgid: str) -> None:
        """`msgid` has reached the bureau or was dropped: it no longer holds anything back."""
        lane = self._lanes.get(psn)
        if lane is not None and msgid in lane.deferred:
            lane.deferred.remove(msgid)
            self._forget_if_empty(psn)

    def waiting(self, psn: str | None) -> list[str]:
        """The person's deferred work not yet at the bureau, in order."""
        lane = self._lanes.get(psn or "")
        return list(lane.deferred) if lane else []

    def draining(self, psn: str) -> bool:
        lane = self._lanes.get(psn)
        return bool(lane and lane.draining)

    def people(self) -> list[str]:
        """Persons with deferred work, the longest-waiting lane first."""
        return [p for p, lane in self._lanes.items() if lane.deferred]

    def rotate(self, psn: str) -> None:
        """Move a person's lane to the back, so the next probe asks with someone else's work."""
        if psn in self._lanes:
            self._lanes[psn] = self._lanes.pop(psn)

    # ---- the drain --------------------------------------------------------------------------------
    def kick(self, psn: str) -> None:
        """Send the person's deferred work now, in order, unless that is under way."""
        lane = self._lanes.get(psn)
        if lane is None or lane.draining or not lane.deferred:
            return
        lane.draining = True
        defer.ensureDeferred(self._drain(psn, lane))

    def kick_all(self) -> None:
        for psn in self.people():
            self.kick(psn)

    async def _drain(self, psn: str, lane: _Lane) -> None:
        try:
            while lane.deferred:
                msgid = lane.deferred[0]
                step = await self._deliver(msgid)
                if step is not Step.NEXT:
                    return
                if lane.deferred and lane.deferred[0] == msgid:
                    lane.deferred.pop(0)
        except Exception:
            log.failure("replaying the deferred work of a person failed; it is tried again at the next kick")
        finally:
            lane.draining = False
            self._forget_if_empty(psn)
