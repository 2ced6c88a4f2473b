"""What the HIS hears about a trade, as a pure function of its journal row.

A fresh answer, a resubmitted msgid and a lookup all go through here, so they can never disagree.
HTTP 200 means fep holds the trade in its journal; `infcode` is what the bureau said (or -1 when it
said nothing yet); `fep_state` is where the trade is in its life.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fep import envelope
from fep.journal import TradeRow
from fep.states import State
from fep.trades import Kind, TradeDef

S = State


@dataclass
class Reply:
    body: dict[str, Any]
    raw: bytes | None = None  # the body already encoded, when it could be had without encoding it

    @property
    def head(self) -> dict[str, Any]:
        """What `outcome` reads: the envelope's infcode and fep's fields (here, the whole body)."""
        return self.body

    def download(self) -> envelope.FileDownload | None:
        """The file of a download that succeeded, for an HIS that hears files as files."""
        return envelope.downloaded_file(self.body)


class PassedOn(Reply):
    """The bureau's answer as it came, fep's fields added (`raw`). Its envelope (`body`) is parsed only if
    something reads it: the HIS is sent the bytes, and an inpatient upload's answer is 2 MB."""

    def __init__(self, answer: envelope.BureauAnswer, fields: dict[str, Any]) -> None:
        self.answer, self.fields = answer, fields
        self.raw = envelope.splice(answer.body, fields)

    @functools.cached_property
    def body(self) -> dict[str, Any]:  # type: ignore[override]
        return self.answer.raw | self.fields

    @property
    def head(self) -> dict[str, Any]:
        return {"infcode": self.answer.infcode, **self.fields}

    def download(self) -> envelope.FileDownload | None:
        # A download's answer is fep's own file envelope (the bureau sends the file itself, fep.bureau): one
        # that does not begin as that envelope does is no download, and is not parsed to find that out.
        return super().download() if envelope.is_file_answer(self.answer.body) else None


def _pending(row: TradeRow, money: str) -> str:
    by = f" by {row.resolver}" if row.resolver else ""
    settled = {"settles": "; the patient is NOT settled",
               "cancels": "; the settlement it cancels stands until this is answered"}.get(money, "")
    return {
        S.SENT: f"trade {row.msgid} is in progress at the bureau; ask again with the same msgid",
        S.UNKNOWN: (f"no valid answer from the bureau for {row.msgid} ({row.note}); its outcome is unknown "
                    f"and is being resolved{settled}"),
        S.RESOLVING: f"{row.msgid}: {row.note}; it is being undone{by}{settled}",
        S.REVOKING: f"trade {row.msgid} is being reversed{by}, as asked; until the bureau acknowledges it, it stands",
        S.REVERSED: f"trade {row.msgid} was undone at the bureau{by}{settled}",
        S.NOT_NEEDED: f"trade {row.msgid} got no answer and the bureau has no record of it{by}{settled}",
        S.NEEDS_ATTENTION: f"trade {row.msgid} needs a person: {row.note}",
        S.DROPPED: f"trade {row.msgid} was given up by a person: {row.note}",
    }[row.state]


# The bureau's own answer is what the HIS hears in these states.
BUREAU_ANSWERED = frozenset({S.ANSWERED, S.AWAITING_CONFIRM, S.CONFIRMED})
QUEUED_NOTE = "queued in fep: the bureau is unreachable; it is sent with this msgid, in order, when the link returns"


def passed_on(row: TradeRow, answer: envelope.BureauAnswer) -> Reply:
    """What the HIS hears of a fresh answer its trade is ANSWERED with: the bureau's own bytes, fep's fields
    added (those `reply` gives it)."""
    return PassedOn(answer, envelope.answer({}, msgid=row.msgid, state=row.state, infno=row.infno,
                                            resolver=row.resolver))


def reply(row: TradeRow, trade: TradeDef, resubmitted: bool = False, answer: dict[str, Any] | None = None,
          infcode_type: str = "number") -> Reply:
    """`trade`: its definition (a trade that moves money tells the HIS whether the patient is settled, or
    the settlement cancelled; fep's own envelopes carry its output node); `answer`: the row's answer
    already parsed, when the caller has it (a fresh answer: parse once); `infcode_type`: how fep writes
    infcode on envelopes of its own (the bureau's answers keep theirs)."""
    money = {Kind.MONEY: "settles", Kind.UNDO_MONEY: "cancels"}.get(trade.kind, "")
    extra: dict[str, Any] = {"infno": row.infno, "resolver": row.resolver}
    if row.state in BUREAU_ANSWERED or (
            row.state in (S.NEEDS_ATTENTION, S.DROPPED) and row.answer):
        parsed = answer if answer is not None else envelope.loads(row.answer or "{}")
        body = envelope.answer(parsed, msgid=row.msgid, state=row.state,
                               note=row.note if row.state is not S.ANSWERED else "", **extra)
        if row.state is S.AWAITING_CONFIRM and row.deadline:
            body["fep_confirm_by"] = datetime.fromtimestamp(row.deadline).strftime("%Y-%m-%d %H:%M:%S")
        return Reply(body)
    if row.state is S.QUEUED:
        ack = envelope.local_failure("", datetime.now(), trade.output)
        ack.update(infcode=0, err_msg=None, warn_msg=QUEUED_NOTE)
        return Reply(envelope.typed(envelope.answer(ack, msgid=row.msgid, state=row.state, note=QUEUED_NOTE,
                                                    **extra), infcode_type))
    if row.state is S.NOT_SENT:  # fep's own answer, stored when it failed
        body = envelope.answer(envelope.loads(row.answer or "{}"), msgid=row.msgid, state=row.state, note=row.note,
                               **extra)
        return Reply(envelope.typed(body, infcode_type))
    message = _pending(row, money)
    body = envelope.typed(envelope.answer(envelope.local_failure(message, datetime.now(), trade.output), msgid=row.msgid,
                                          state=row.state, note=message, **extra), infcode_type)
    if resubmitted and row.state is S.SENT:  # a resubmission while the first is on the wire: not a second trade
        body["fep_reason"] = "in_progress"
    return Reply(body)


def outcome(body: dict[str, Any]) -> str:
    """The trade counter's `result`: the bureau said yes ("success") or no ("refused", a business refusal),
    the trade waits in fep's queue ("queued"), or the bureau gave no valid answer ("transport_failure": not
    sent, or sent and its outcome unknown, then resolved)."""
    state = body.get("fep_state")
    if state in BUREAU_ANSWERED:
        return "success" if envelope.succeeded(body) else "refused"
    return "queued" if state == S.QUEUED else "transport_failure"


# What a lookup (GET /fep/trades/MSGID, POST /fep/confirm/MSGID on the HIS side) shows of the bureau's output:
# the codes the HIS needs to act on the trade (settle, cancel, upload against it) and its amounts, never who
# the person is. A lookup needs nothing but a msgid, and msgids are guessable; the full answer goes only to a
# resubmission of the same msgid with the same payload, and to the admin socket (`fep show`).
LOOKUP_CODES = frozenset({
    "setl_id", "mdtrt_id", "ipt_otp_no", "chrg_bchno", "feedetl_sn", "file_qury_no", "setl_time", "insutype",
    "clr_type", "clr_optins", "med_type", "psn_setlway", "fund_pay_type", "stmt_rslt"})
LOOKUP_NOTE = "a lookup shows codes and amounts only; the full answer goes to a resubmission of the same msgid and payload"


def lookup_view(full: Reply) -> Reply:
    """`full` with its output cut to LOOKUP_CODES and amounts (fields named *amt, *_pay), node by node; the
    envelope's own fields (infcode, err_msg, ...) and fep's stay. Personal data (names, ID numbers, psn_no,
    birth dates, balances) is in no field that stays."""
    body = dict(full.body)
    output = body.get("output")
    if isinstance(output, dict):
        body["output"] = {name: _codes(node) for name, node in output.items() if isinstance(node, (dict, list))}
    elif output is not None:
        body["output"] = {}
    body["fep_view"] = LOOKUP_NOTE
    return Reply(body)


def _codes(node: Any) -> Any:
    if isinstance(node, list):
        return [_codes(n) for n in node if isinstance(n, dict)]
    return {k: v for k, v in node.items() if not isinstance(v, (dict, list)) and (
        k in LOOKUP_CODES or envelope.is_amount(k))}
