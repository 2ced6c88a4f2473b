"""The bureau session (签到): one sign_no a day, put on every send.

The bureau refuses trades from a session it does not know ("签到信息不存在，请重新签到"). That refusal
is about the session, never an answer to the trade: the caller forgets the sign_no it sent under, signs
in again here, and sends the same trade again under the new one.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger

from fep import metrics

log = Logger()
RETRY_AFTER = 10.0  # seconds between sign-in attempts while they fail (each is a journalled 9001)


class SignInFailed(Exception):
    """9001 did not give a sign_no; the message says why."""


class Session:
    def __init__(self, now: Callable[[], float], sign_in: Callable[[], Awaitable[str]],
                 not_signed_in: tuple[str, ...]) -> None:
        """`sign_in` sends a 9001 and returns the bureau's sign_no, or raises SignInFailed."""
        self._now = now
        self._sign_in = sign_in
        self.markers = not_signed_in  # err_msg fragments of "sign in again" (bureau.not_signed_in)
        self.sign_no = ""
        self._day: date | None = None
        self._not_before = 0.0
        self._signing: defer.Deferred[None] | None = None

    @property
    def signed_in(self) -> bool:
        return self._day == self._today()

    def _today(self) -> date:
        return datetime.fromtimestamp(self._now()).date()

    async def ensure(self) -> str:
        """The sign_no to send under: signs in first on a new day or after the bureau forgot us. While
        sign-in fails, it is tried again only every RETRY_AFTER seconds, and the last sign_no is used."""
        if not self.signed_in and self._now() >= self._not_before:
            if self._signing is None:
                self._signing = defer.ensureDeferred(self._renew())
            signing = self._signing
            try:
                await signing
            finally:
                if self._signing is signing:  # (a sign-in that finished at once must not stay "under way")
                    self._signing = None
        return self.sign_no

    async def _renew(self) -> None:
        try:
            self.sign_no, self._day = await self._sign_in(), self._today()
            metrics.SIGNED_IN.set(1)
            log.info("signed in to the bureau, sign_no {sign_no}", sign_no=self.sign_no)
        except Exception as e:
            metrics.SIGNED_IN.set(0)
            self._not_before = self._now() + RETRY_AFTER
            log.warn("sign-in (9001) failed: {err}; tried again in {s:g} s", err=str(e), s=RETRY_AFTER)

    def refused(self, err_msg: str) -> bool:
        """The bureau's refusal says it does not know our session."""
        return any(m in err_msg for m in self.markers)

    def forget(self, sign_no: str) -> None:
        """The bureau did not know `sign_no`: the next ensure() signs in at once. A refusal of an older
        sign_no than the current one changes nothing (another trade signed in already)."""
        if sign_no == self.sign_no:
            self._day, self._not_before = None, 0.0
            metrics.SIGNED_IN.set(0)
