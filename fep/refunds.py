"""Refund order (逐笔按序退款): a person's settlements are undone last one first, in the bureau's order.

Pure functions over the rows the journal returns. The order is the bureau's: its settlement time, then
its settlement id; never the journal's row order, which differs when a trade that was not sent at first
is settled later.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from fep import envelope
from fep.journal import TradeRow


class OutOfOrder(Exception):
    """The refund would skip a later settlement; the message names what to cancel first."""


def _setl_time(row: TradeRow) -> str:
    output = envelope.loads(row.answer or "{}").get("output")
    info = output.get("setlinfo") if isinstance(output, dict) else None
    return str(info.get("setl_time") or "") if isinstance(info, dict) else ""


def bureau_order(rows: Iterable[TradeRow]) -> list[TradeRow]:
    # A settlement without the bureau's time counts as the latest, as in check_reversal: to be safe.
    return sorted(rows, key=lambda r: (_setl_time(r) or "~", len(r.setl_id or ""), r.setl_id or "", r.id))


def in_force(rows: Iterable[TradeRow], settlement_infnos: frozenset[str]) -> list[TradeRow]:
    """The settlements (not the cancels) that no cancel among `rows` has undone, in the bureau's order."""
    rows = list(rows)
    cancelled = {r.cancels for r in rows if r.cancels}
    return bureau_order(r for r in rows if r.infno in settlement_infnos and r.setl_id not in cancelled)


def check_cancel(settlements: list[TradeRow], setl_id: str) -> None:
    """A cancel of `setl_id` waits until every later settlement of the person is cancelled. A setl_id
    fep never settled is not fep's to judge: the bureau decides."""
    ids = [r.setl_id for r in settlements]
    if setl_id in ids:
        _refuse_if_later(settlements[ids.index(setl_id) + 1:], setl_id)


def check_reversal(settlements: list[TradeRow], omsgid: str, made_at: float) -> None:
    """A reversal of `omsgid` (a trade made at `made_at`) waits for every later settlement to be
    cancelled. When the trade is among `settlements` its place is known; otherwise only settlements
    the bureau made after that whole second are provably later."""
    msgids = [r.msgid for r in settlements]
    if omsgid in msgids:
        later = settlements[msgids.index(omsgid) + 1:]
    else:
        later = [r for r in settlements if _stamp(_setl_time(r)) >= int(made_at) + 1]
    _refuse_if_later(later, f"the reversal of {omsgid}")


def check_known(pending: list[TradeRow], what: str) -> None:
    """`pending`: the person's money trades whose outcome is not known yet, that `what` must not overtake."""
    if pending:
        names = ", ".join(f"{r.infno} {r.msgid} ({r.state})" for r in pending)
        raise OutOfOrder(f"refunds go last settlement first: the outcome of {names} is not known yet; {what} "
                         f"waits until it is resolved")


def _stamp(setl_time: str) -> float:
    try:
        return datetime.strptime(setl_time[:19], "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return float("inf")  # no time the bureau gave: count it as later, to be safe


def _refuse_if_later(later: list[TradeRow], what: str) -> None:
    if later:
        order = ", ".join(f"{r.setl_id} ({r.infno}, msgid {r.msgid})" for r in reversed(later))
        raise OutOfOrder(f"refunds go last settlement first: cancel {order} before {what}")
