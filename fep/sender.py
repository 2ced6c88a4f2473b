"""One send of a journalled trade to the bureau, under the current session, and what its answer records.

Shared by every path that sends (a fresh trade, a replay, a resend, a resolving trade): each puts the
current sign_no on the request, and each treats "not signed in" as a session fault, never as the
trade's answer: sign in again, record the request under the new sign_no (`resign`), send again.
"""

from __future__ import annotations

from typing import Any, Callable

from fep import envelope
from fep.bureau import BureauLink, Delivery, NotSent
from fep.config import RemoteRoute
from fep.journal import Journal, TradeRow
from fep.session import Session
from fep.trades import Kind, TradeDef

SESSION_TRIES = 2  # a trade refused for the session is sent again under a new one at most this often


class Sender:
    def __init__(self, link: BureauLink, session: Session, journal: Journal, now: Callable[[], float],
                 late: Callable[[TradeRow, bytes], None],
                 route: Callable[[], RemoteRoute] = RemoteRoute) -> None:
        self.link = link
        self._route = route  # where 异地 trades go, as the config in force says (a reload may change it)
        self.session = session
        self.journal = journal
        self._now = now
        self._late = late  # where an answer that came after the timeout goes

    async def refreshed(self, row: TradeRow) -> str:
        """The row's request as it is sent now: today's session and time (a trade that waited, or is sent
        again, goes under the session in force, not the one it was accepted under)."""
        env = row.envelope
        env.update(sign_no=await self.session.ensure(), inf_time=envelope.inf_time(self._now()))
        return envelope.dumps(env).decode("utf-8")

    async def deliver(self, trade: TradeDef, row: TradeRow, endpoint: str | None = None,
                      timeout: float | None = None) -> Delivery:
        """Send `row` (state SENT). Raises NotSent or Unknown, as the link does; `endpoint` pins it to
        where its original went; `timeout` (default the trade's) is how long the bureau is waited for."""
        if endpoint is not None and endpoint not in self.link.endpoint_names:
            endpoint = None  # renamed or removed by a reload: where it went is no longer configured
        remote_endpoint, base_path = self._routed(row)
        for _ in range(SESSION_TRIES):
            delivery = await self.link.send(trade.infno, row.request_bytes, timeout or trade.timeout, trade.path,
                                            on_late=lambda body, r=row: self._late(r, body),
                                            endpoint=endpoint or remote_endpoint, base_path=base_path)
            if delivery.answer.ok or trade.kind is Kind.SESSION or not self.session.refused(delivery.answer.err_msg):
                return delivery  # (a sign-in's own refusal is its answer: it is how a session begins)
            # read back only now: on a 3.5 MB upload it costs 1-1.5 ms, and the bytes sent are the row's
            sent_under = envelope.top_field(row.request_bytes, "sign_no", "")
            self.session.forget(sent_under)
            request = await self.refreshed(row)
            if envelope.top_field(request, "sign_no", "") == sent_under:
                break  # signing in again failed: there is no new session to send under
            row = await self.journal.transition(row.msgid, "resign", note=f"the bureau asked to sign in again "
                                                f"({delivery.answer.err_msg}); sent under the new session",
                                                request=request)
        raise NotSent(f"the bureau does not know fep's session and signing in again did not help "
                      f"({delivery.answer.err_msg})")

    def _routed(self, row: TradeRow) -> tuple[str | None, str | None]:
        route = self._route()
        if route.endpoint is None and route.path is None:
            return None, None  # the common case: the request is not read again
        return route.of(str(envelope.top_field(row.request_bytes, "insuplc_admdvs", "") or ""))


def recorded(trade: TradeDef, row: TradeRow, delivery: Delivery) -> dict[str, Any]:
    """What the journal keeps of an answer: the bytes, where it came from, and what reconciliation and
    refund order need from a successful settlement or cancel."""
    fields: dict[str, Any] = {"answer": delivery.body, "endpoint": delivery.endpoint}
    ans = delivery.answer
    if not (ans.ok and trade.moves_money):
        return fields
    setlinfo = ans.output.get("setlinfo") if isinstance(ans.output, dict) else None
    if isinstance(setlinfo, dict) and setlinfo.get("setl_id"):
        fields["setl_id"] = str(setlinfo["setl_id"])
    if trade.kind is Kind.UNDO_MONEY:
        data = row.envelope["input"].get("data") or {}
        if data.get("setl_id"):
            fields["cancels"] = str(data["setl_id"])
    return fields
