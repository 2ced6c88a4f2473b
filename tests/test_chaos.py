"""scripts/chaos: the judge on hand-made snapshots of the three views (so it is trusted independently of
the engine it judges), and a short chaos run against the real daemon and simulator (README, "Proving it")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fep.sim.chaos import FIGURES, BAnswer, Heard, HisTrade, JRow, Views, judge

PSN = "43010000000000001001"
MSG = iter(range(1, 10**6))


# ---- small builders for the three views ---------------------------------------------------------------
def mid(n: int) -> str:
    return f"H43019000000202611230930{n:06d}"


def heard(state: str = "ANSWERED", infcode: int = 0, status: int = 200, err: str = "", **kw: Any) -> Heard:
    return Heard(status=status, state=state, infcode=infcode, err_msg=err, **kw)


class Snapshot:
    """Three views built up trade by trade; `consistent` helpers write all three the same way."""

    def __init__(self) -> None:
        self.his: dict[str, HisTrade] = {}
        self.journal: dict[str, JRow] = {}
        self.settlements: list[dict[str, Any]] = []
        self.answers: list[BAnswer] = []
        self.setl = 400120000

    def _seq(self) -> int:
        return len(self.his) + 1

    def told(self, msgid: str, infno: str, purpose: str, *answers: Heard, mdtrt: str = "300170001",
             target: str | None = None, psn: str = PSN, seq: int | None = None) -> HisTrade:
        t = HisTrade(msgid=msgid, infno=infno, purpose=purpose, psn_no=psn, mdtrt_id=mdtrt, target=target,
                     seq=seq if seq is not None else self._seq(), heard=list(answers))
        self.his[msgid] = t
        return t

    def row(self, msgid: str, infno: str, state: str, infcode: int | None = 0, psn: str = PSN, **kw: Any) -> JRow:
        j = JRow(id=len(self.journal) + 1, msgid=msgid, infno=infno, psn_no=psn, state=state, infcode=infcode, **kw)
        self.journal[msgid] = j
        return j

    def answer(self, msgid: str, infno: str, infcode: int = 0, err: str = "") -> BAnswer:
        a = BAnswer(len(self.answers) + 1, msgid, infno, infcode, err)
        self.answers.append(a)
        return a

    def bureau_settle(self, msgid: str, medfee: str = "100.00", mdtrt: str = "300170001", state: str = "live",
                      psn: str = PSN) -> dict[str, Any]:
        self.setl += 1
        s = {"setl_id": str(self.setl), "msgid": msgid, "infno": "2207", "psn_no": psn, "mdtrt_id": mdtrt,
             "medfee": medfee, "kind": "settle", "state": state, "refd_setl_id": None}
        self.settlements.append(s)
        self.answer(msgid, "2207")
        return s

    def bureau_cancel(self, msgid: str, of: dict[str, Any], state: str = "live") -> dict[str, Any]:
        self.setl += 1
        c = {"setl_id": str(self.setl), "msgid": msgid, "infno": "2208", "psn_no": of["psn_no"],
             "mdtrt_id": of["mdtrt_id"], "medfee": f"-{of['medfee']}", "kind": "cancel", "state": state,
             "refd_setl_id": of["setl_id"]}
        of["state"] = "cancelled"
        self.settlements.append(c)
        self.answer(msgid, "2208")
        return c

    # ---- consistent stories ----------------------------------------------------------------------------
    def settled(self, mdtrt: str = "300170001", medfee: str = "100.00", psn: str = PSN) -> tuple[str, dict[str, Any]]:
        m = mid(next(MSG))
        s = self.bureau_settle(m, medfee, mdtrt, psn=psn)
        self.told(m, "2207", "settle", heard(setl_id=s["setl_id"], medfee=medfee), mdtrt=mdtrt, psn=psn)
        self.row(m, "2207", "ANSWERED", setl_id=s["setl_id"], medfee=medfee, psn=psn)
        return m, s

    def cancelled(self, s: dict[str, Any]) -> str:
        m = mid(next(MSG))
        c = self.bureau_cancel(m, s)
        self.told(m, "2208", "cancel", heard(setl_id=c["setl_id"], medfee=c["medfee"]), mdtrt=s["mdtrt_id"],
                  target=s["setl_id"], psn=s["psn_no"])
        self.row(m, "2208", "ANSWERED", setl_id=c["setl_id"], medfee=c["medfee"], cancels=s["setl_id"],
                 psn=s["psn_no"])
        return m

    def uploaded(self, queued: bool = False, psn: str = PSN) -> str:
        m = mid(next(MSG))
        first = [heard("QUEUED", 0)] if queued else []
        self.told(m, "2204", "upload", *first, heard("ANSWERED", 0, via="lookup" if queued else "post"), psn=psn)
        self.row(m, "2204", "ANSWERED", psn=psn)
        self.answer(m, "2204")
        return m

    def views(self) -> Views:
        return Views(his=self.his, journal=self.journal, settlements=self.settlements, answers=self.answers)


def found(snapshot: Snapshot) -> dict[str, list[str]]:
    """figure -> msgids reported, for the figures that are not 0."""
    return {k: [x.msgid for x in v] for k, v in judge(snapshot.views()).figures.items() if v}


def consistent_day() -> Snapshot:
    snap = Snapshot()
    snap.uploaded()
    snap.uploaded(queued=True)
    m, s = snap.settled()
    snap.cancelled(s)
    snap.settled(mdtrt="300170002")
    rev = mid(next(MSG))  # a settlement whose answer was lost, reversed: the HIS was told so
    snap.told(rev, "2207", "settle", heard("RESOLVING", -1), heard("REVERSED", -1, via="lookup"), mdtrt="300170003")
    snap.row(rev, "2207", "REVERSED", infcode=None)
    rs = snap.bureau_settle(rev, mdtrt="300170003")
    rs["state"] = "reversed"
    refused = mid(next(MSG))  # the bureau was busy (an injected error: it processed nothing)
    snap.told(refused, "2207", "settle", heard("ANSWERED", -1, err="系统繁忙"), mdtrt="300170004")
    snap.row(refused, "2207", "ANSWERED", infcode=-1)
    old = mid(next(MSG))  # a cancel out of refund order, refused by fep before it was journalled
    snap.told(old, "2208", "old-cancel", heard("REFUSED", -1, status=409, err="refunds go last settlement first"))
    return snap


# ---- the judge -------------------------------------------------------------------------------------------
def test_three_views_that_agree_give_every_figure_zero() -> None:
    verdict = judge(consistent_day().views())
    assert verdict.failed() == [], {k: [(x.msgid, x.why) for x in v] for k, v in verdict.figures.items() if v}
    assert set(verdict.figures) == set(FIGURES)
    assert verdict.info["refund-order refusals heard (provoked, correct)"] == 1


def test_told_settled_but_the_bureau_reversed_it() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009")
    s["state"] = "reversed"
    assert found(snap)["told_settled_bureau_disagrees"] == [m]


def test_told_settled_for_a_different_amount() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009", medfee="80.00")
    s["medfee"] = "79.00"
    assert m in found(snap)["told_settled_bureau_disagrees"]


def test_cancelled_at_the_bureau_while_the_his_heard_the_cancel_fail() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009")
    c = mid(next(MSG))  # the cancel's answer was lost; its resend met 系统繁忙 and that was taken as the answer
    snap.told(c, "2208", "cancel", heard("UNKNOWN", -1), heard("ANSWERED", -1, err="系统繁忙", via="lookup"),
              target=s["setl_id"], mdtrt="300170009")
    snap.row(c, "2208", "ANSWERED", infcode=-1, note="sent again with the same msgid")
    snap.bureau_cancel(c, s)
    f = found(snap)
    assert f["told_settled_bureau_disagrees"] == [m]
    assert f["journal_vs_bureau"] == [c]
    verdict = judge(snap.views())
    assert verdict.figures["told_settled_bureau_disagrees"][0].also == (c,)


def test_told_cancelled_but_the_settlement_is_live_at_the_bureau() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009")
    c = mid(next(MSG))
    snap.told(c, "2208", "cancel", heard(setl_id="400129999"), target=s["setl_id"], mdtrt="300170009")
    snap.row(c, "2208", "ANSWERED", setl_id="400129999", cancels=s["setl_id"])
    f = found(snap)
    assert c in f["told_settled_bureau_disagrees"]
    assert c in f["journal_vs_bureau"]


def test_a_settlement_at_the_bureau_the_his_was_told_is_not_settled() -> None:
    snap = consistent_day()
    m = mid(next(MSG))  # the 2601 never got through and fep parked it: the money stays at the bureau
    snap.told(m, "2207", "settle", heard("RESOLVING", -1), heard("NEEDS_ATTENTION", -1, via="lookup"),
              mdtrt="300170009")
    snap.row(m, "2207", "NEEDS_ATTENTION", infcode=None, note="2601 got no answer after 6 tries")
    snap.bureau_settle(m, mdtrt="300170009")
    f = found(snap)
    assert f["bureau_money_his_not_told"] == [m]
    assert f["needs_attention_no_reason"] == [m]


def test_a_settlement_the_his_never_sent_is_one_sided() -> None:
    snap = consistent_day()
    snap.bureau_settle("H43010000001202611230930150001", mdtrt="300170010")
    f = found(snap)
    assert f["bureau_money_his_not_told"] == ["H43010000001202611230930150001"]
    assert f["journal_vs_bureau"] == ["H43010000001202611230930150001"]


def test_one_visit_settled_twice_at_the_bureau() -> None:
    snap = consistent_day()
    first, _ = snap.settled(mdtrt="300170009")
    second = mid(next(MSG))  # e.g. a resubmission that fep sent again under a new msgid
    snap.bureau_settle(second, mdtrt="300170009")
    snap.told(second, "2207", "settle", heard("ANSWERED", -1, err="系统繁忙"), mdtrt="300170009")
    snap.row(second, "2207", "ANSWERED", infcode=-1)
    f = found(snap)
    assert f["double_charge"] == [second]
    assert second in f["bureau_money_his_not_told"]


def test_a_queued_upload_the_bureau_never_got_is_undelivered() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    snap.told(m, "2204", "upload", heard("QUEUED", 0), heard("ANSWERED", 0, via="lookup"))
    snap.row(m, "2204", "ANSWERED")  # the journal even says it went; the bureau has no trace of it
    f = found(snap)
    assert f["upload_undelivered"] == [m]
    assert f["journal_vs_bureau"] == [m]


def test_an_upload_parked_for_a_transient_refusal_is_undelivered_and_needs_attention_without_reason() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    snap.told(m, "2204", "upload", heard("QUEUED", 0), heard("NEEDS_ATTENTION", -1, err="系统繁忙", via="lookup"))
    snap.row(m, "2204", "NEEDS_ATTENTION", infcode=-1, note="the bureau refused the replayed trade: 系统繁忙")
    f = found(snap)
    assert f["upload_undelivered"] == [m]
    assert f["needs_attention_no_reason"] == [m]


def test_an_upload_parked_for_a_session_refusal_has_no_business_reason() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    err = "签到信息不存在，请重新签到(sign_no 359006)"
    snap.told(m, "2204", "upload", heard("QUEUED", 0), heard("NEEDS_ATTENTION", -1, err=err, via="lookup"))
    snap.row(m, "2204", "NEEDS_ATTENTION", infcode=-1, note=f"the bureau refused the replayed trade: {err}")
    snap.answer(m, "2204", -1, err)
    f = found(snap)
    assert f["upload_undelivered"] == [m] and f["needs_attention_no_reason"] == [m]


def test_a_provoked_business_refusal_is_listed_not_failed_and_what_waits_behind_it_too() -> None:
    snap = consistent_day()
    bad = mid(next(MSG))
    err = "医保目录编码不存在: ZZ99ZZZ999Z999999999999"
    snap.told(bad, "2204", "bad-upload", heard("QUEUED", 0), heard("NEEDS_ATTENTION", -1, err=err, via="lookup"))
    snap.row(bad, "2204", "NEEDS_ATTENTION", infcode=-1, note=f"the bureau refused the replayed trade: {err}")
    snap.answer(bad, "2204", -1, err)
    behind = mid(next(MSG))
    snap.told(behind, "2204", "upload", heard("QUEUED", 0))
    snap.row(behind, "2204", "QUEUED")
    verdict = judge(snap.views())
    assert verdict.failed() == []
    assert [x.msgid for x in verdict.business_parks] == [bad]
    assert [(x.msgid, x.also) for x in verdict.held_behind_business] == [(behind, (bad,))]


def test_only_later_queued_uploads_of_the_same_person_wait_behind_a_business_park() -> None:
    snap = consistent_day()
    before = mid(next(MSG))  # queued before the park: it should have gone
    snap.told(before, "2204", "upload", heard("QUEUED", 0))
    snap.row(before, "2204", "QUEUED")
    bad = mid(next(MSG))
    err = "医保目录编码不存在: ZZ99ZZZ999Z999999999999"
    snap.told(bad, "2204", "bad-upload", heard("QUEUED", 0), heard("NEEDS_ATTENTION", -1, err=err, via="lookup"))
    snap.row(bad, "2204", "NEEDS_ATTENTION", infcode=-1, note=f"the bureau refused the replayed trade: {err}")
    snap.answer(bad, "2204", -1, err)
    other = mid(next(MSG))  # another person's lane is not held by it
    snap.told(other, "2204", "upload", heard("QUEUED", 0), psn="43010000000000001009")
    snap.row(other, "2204", "QUEUED", psn="43010000000000001009")
    refused = mid(next(MSG))  # the same person, later, but refused rather than waiting: not by design
    snap.told(refused, "2204", "upload", heard("QUEUED", 0), heard("ANSWERED", -1, err="系统繁忙", via="lookup"))
    snap.row(refused, "2204", "ANSWERED", infcode=-1)
    f = found(snap)
    assert f["upload_undelivered"] == [before, other, refused]
    assert f["unresolved"] == [before, other]


def test_told_cancelled_while_the_bureau_still_holds_the_settlement_in_force() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009")
    c = snap.cancelled(s)
    s["state"] = "live"  # the bureau's cancel row is there, yet the settlement is in force
    f = found(snap)
    assert f["told_settled_bureau_disagrees"] == [c]


def test_a_business_reason_does_not_excuse_a_park_of_what_the_bureau_did() -> None:
    snap = consistent_day()
    m = mid(next(MSG))  # the first send arrived; its resend met the injected business refusal
    snap.told(m, "2203", "diagnose", heard("UNKNOWN", -1),
              heard("NEEDS_ATTENTION", -1, err="模拟业务拒绝: 参保人本次就医受限", via="lookup"))
    snap.row(m, "2203", "NEEDS_ATTENTION", infcode=-1,
             note="the bureau refused the replayed trade: 模拟业务拒绝: 参保人本次就医受限")
    snap.answer(m, "2203", 0)
    verdict = judge(snap.views())
    assert [x.msgid for x in verdict.figures["needs_attention_no_reason"]] == [m]
    assert verdict.business_parks == []


def test_uploads_processed_out_of_the_order_the_his_sent_them() -> None:
    snap = consistent_day()
    a, b = mid(next(MSG)), mid(next(MSG))
    psn = "43010000000000001002"
    snap.told(a, "2204", "upload", heard("QUEUED", 0), heard("ANSWERED", 0, via="lookup"), psn=psn)
    snap.told(b, "2204", "upload", heard("ANSWERED", 0), psn=psn)
    snap.row(a, "2204", "ANSWERED", psn=psn)
    snap.row(b, "2204", "ANSWERED", psn=psn)
    snap.answer(b, "2204")  # b reached the bureau first
    snap.answer(a, "2204")
    verdict = judge(snap.views())  # b is reported: sent after a, processed before it
    assert [(x.msgid, x.also) for x in verdict.figures["upload_out_of_order"]] == [(b, (a,))]


def test_order_is_per_person() -> None:
    snap = consistent_day()
    a, b = mid(next(MSG)), mid(next(MSG))
    snap.told(a, "2204", "upload", heard("ANSWERED", 0), psn="43010000000000001002")
    snap.told(b, "2204", "upload", heard("ANSWERED", 0), psn="43010000000000001003")
    snap.row(a, "2204", "ANSWERED", psn="43010000000000001002")
    snap.row(b, "2204", "ANSWERED", psn="43010000000000001003")
    snap.answer(b, "2204")
    snap.answer(a, "2204")
    assert "upload_out_of_order" not in found(snap)


def test_unresolved_in_either_view() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    snap.told(m, "2207", "settle", heard("RESOLVING", -1), mdtrt="300170009")
    snap.row(m, "2207", "RESOLVING", infcode=None, resolver="H43010000001202611230930150009")
    snap.row("H43010000001202611230930150009", "2601", "SENT", infcode=None, related=m)
    silent = mid(next(MSG))  # the HIS never heard a word about it, not even to its lookup
    snap.told(silent, "1101", "identify")
    f = found(snap)
    assert f["unresolved"] == [m, silent, "H43010000001202611230930150009"]


def test_the_journal_holds_done_what_the_bureau_refused() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    snap.told(m, "2201", "register", heard("ANSWERED", 0, mdtrt_id="300170077"))
    snap.row(m, "2201", "ANSWERED")
    snap.answer(m, "2201", -1, "人员编号不存在")
    f = found(snap)
    assert f["journal_vs_bureau"] == [m]


def test_lost_the_his_heard_fep_hold_a_trade_the_journal_does_not_have() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    snap.told(m, "2204", "upload", heard("QUEUED", 0), heard("ABSENT", -1, status=404, via="lookup"))
    f = found(snap)
    assert f["his_vs_journal"] == [m]
    assert f["upload_undelivered"] == [m]


def test_the_his_heard_settled_and_the_journal_holds_it_reversed() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009")
    snap.journal[m].state = "REVERSED"
    s["state"] = "reversed"
    f = found(snap)
    assert f["his_vs_journal"] == [m]
    assert f["told_settled_bureau_disagrees"] == [m]


def test_the_his_was_refused_a_trade_that_was_journalled() -> None:
    snap = consistent_day()
    m = mid(next(MSG))
    snap.told(m, "2207", "settle", heard("REFUSED", -1, status=409, err="earlier trades"), mdtrt="300170009")
    snap.row(m, "2207", "NOT_SENT", infcode=-1)
    assert found(snap)["his_vs_journal"] == [m]


def test_a_cancel_out_of_refund_order_accepted_by_the_bureau() -> None:
    snap = consistent_day()
    psn = "43010000000000001004"
    _, older = snap.settled(mdtrt="300170020", psn=psn)
    _, later = snap.settled(mdtrt="300170021", psn=psn)
    c = snap.cancelled(older)  # seen from the bureau's ledger alone
    assert found(snap) == {"refund_order_broken": [c]}


def test_an_out_of_order_cancel_the_his_was_told_succeeded() -> None:
    snap = consistent_day()
    m = mid(next(MSG))  # the HIS's view alone: it cancelled an older settlement on purpose, and heard success
    snap.told(m, "2208", "old-cancel", heard(setl_id="400129999"), target="400129998")
    verdict = judge(Views(his={m: snap.his[m]}, journal={}, settlements=[], answers=[]))
    assert [x.msgid for x in verdict.figures["refund_order_broken"]] == [m]


def test_cancelling_the_last_settlement_first_keeps_refund_order() -> None:
    snap = consistent_day()
    psn = "43010000000000001004"
    _, older = snap.settled(mdtrt="300170020", psn=psn)
    _, later = snap.settled(mdtrt="300170021", psn=psn)
    snap.cancelled(later)
    snap.cancelled(older)
    assert found(snap) == {}


def test_a_findings_views_are_rendered_side_by_side() -> None:
    snap = consistent_day()
    m, s = snap.settled(mdtrt="300170009")
    s["state"] = "reversed"
    three = snap.views().three(m)
    assert "ANSWERED infcode 0" in three["his"] and "settle" in three["his"]
    assert three["journal"].startswith("ANSWERED infcode 0")
    assert "reversed" in three["bureau"]


# ---- a short run against the real processes ------------------------------------------------------------
def test_a_short_chaos_run_finds_every_must_be_zero_figure_zero(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "fep.sim.chaos", "--trades", "300", "--kills", "2", "--sim-kills", "1",
                          "--seed", "11", "--dir", str(tmp_path / "run"), "--json"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["run"]["fep kills"] == 2 and doc["run"]["sim kills"] == 1, doc["run"]
    assert doc["run"]["HIS msgids"] >= 300 and doc["run"]["session expiries"] >= 1
    assert doc["run"]["fault combinations armed"].split("/")[0] == doc["run"]["fault combinations armed"].split("/")[1]
    nonzero = {k: n for k, n in doc["figures"].items() if n}
    assert not nonzero, json.dumps({"figures": nonzero, "details": doc["details"]}, ensure_ascii=False, indent=1)
    assert run.returncode == 0
