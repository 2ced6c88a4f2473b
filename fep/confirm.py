"""The confirmation window: a settlement that has one is held (AWAITING_CONFIRM) until the HIS says it
recorded the result. If the window closes first, the HIS failed to record it, and it is undone."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger

from fep.journal import IllegalTransition, Journal, TradeRow
from fep.states import State

log = Logger()


class NotAwaiting(Exception):
    """The trade is past its window (or never had one); the message says where it is."""


class ConfirmWindows:
    def __init__(self, clock: Any, now: Callable[[], float], journal: Journal,
                 expired: Callable[[TradeRow], Awaitable[None]]) -> None:
        self._clock = clock
        self._now = now
        self._journal = journal
        self._expired = expired
        self._timers: dict[str, Any] = {}

    def arm(self, row: TradeRow) -> None:
        delay = max(0.0, (row.deadline or self._now()) - self._now())
        self._timers[row.msgid] = self._clock.callLater(delay, self._close, row.msgid)

    async def confirm(self, msgid: str, why: str = "confirmed by the HIS") -> TradeRow:
        """The HIS recorded it. Confirming twice is fine; confirming after the window closed is
        NotAwaiting, whichever came first by a hair."""
        current = await self._journal.get(msgid)
        if current is not None and current.state is State.AWAITING_CONFIRM and (current.deadline or 0) <= self._now():
            raise NotAwaiting(f"trade {msgid}'s confirmation window has closed; it is being undone")
        try:
            row = await self._journal.transition(msgid, "confirm", note=why)
        except IllegalTransition as e:
            if e.state == State.CONFIRMED:
                return await self._journal.get(msgid)  # type: ignore[return-value]
            raise NotAwaiting(f"trade {msgid} is {e.state}, not awaiting confirmation") from None
        self._cancel(msgid)
        return row

    def _close(self, msgid: str) -> None:
        self._timers.pop(msgid, None)
        defer.ensureDeferred(self._closed(msgid)).addErrback(
            lambda f: log.failure("closing the confirmation window of {msgid} failed", f, msgid=msgid))

    async def _closed(self, msgid: str) -> None:
        row = await self._journal.get(msgid)
        if row is not None and row.state is State.AWAITING_CONFIRM:
            await self._expired(row)

    def _cancel(self, msgid: str) -> None:
        timer = self._timers.pop(msgid, None)
        if timer is not None and timer.active():
            timer.cancel()

    def stop(self) -> None:
        for msgid in list(self._timers):
            self._cancel(msgid)

