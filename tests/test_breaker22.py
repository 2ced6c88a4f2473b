"""Breaker 22: one trade per HIS msgid, after the payload's digest became one of the HIS's own bytes (b2490ad),
tried from outside as an HIS vendor would: the same msgid sent again in another charset or form, with fee
lines fep maps, after a NOT_SENT, while the first waits for its patient's lane, after the archive run, and
under the msgid fep answered with."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from typing import Any, Callable

import pytest
import simplejson

from fep import envelope
from fep.sim.world import ZHANG, Visit, World, his_msgid, reversed_settlement, said, wait_for
from tests.test_archive import archived_after_reconciling
from tests.test_catalog import fep, visit_with_hospital_codes
from tests.test_his_http import _form, _post, _registration, _upload_envelope, _zip

REUSED = "already used for a different trade"


def his_key() -> str:
    return uuid.uuid4().hex.upper()[:30]


def rebuilt(env: dict[str, Any]) -> bytes:
    """The envelope as another HIS build writes it: keys in another order, indented, Chinese escaped."""
    return simplejson.dumps(dict(reversed(list(env.items()))), use_decimal=True, indent=1, ensure_ascii=True).encode()


def in_envelope(infno: str, input_: dict[str, Any], msgid: str) -> dict[str, Any]:
    return {"infno": infno, "msgid": msgid, "opter_type": "1", "opter": "his", "opter_name": "HIS", "input": input_}


def posted(world: World, body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    status, _, answer = _post(world, body, content_type)
    assert status == 200, answer
    return envelope.loads(answer)  # type: ignore[no-any-return]


def setl_of(answer: dict[str, Any]) -> str:
    """The settlement an answer tells of."""
    told = (answer.get("output") or {}).get("setlinfo") or {}
    return f"setl_id {told.get('setl_id')}, acct_pay {told.get('acct_pay')}"


def reversed_under_its_key(world: World, key: str | None = None) -> tuple[Visit, str, dict[str, Any]]:
    """fep keeps trades 30 days. Zhang's settlement, under the HIS's key (a uuid unless given), lost its answer and
    fep reversed it: the HIS was told it is not settled. Returns his visit, the key and what the HIS heard."""
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    if world.journal_url is not None:
        wait_for(lambda: world.leading() == "a", what="node a to lead")
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    key = key or his_key()
    return visit, key, reversed_settlement(world, visit, key)


def not_settled_again(world: World, again: dict[str, Any], first: dict[str, Any]) -> None:
    """A settlement sent again under its msgid was that trade (or refused), and the bureau holds it once, reversed."""
    facts = (f"the HIS heard {said(again)} {setl_of(again)} under fep_msgid {again.get('fep_msgid')}; the bureau "
             f"holds {[(s['msgid'], s['state']) for s in world.ledger()]}")
    assert again["infcode"] != 0 and again.get("fep_msgid") in (None, first["fep_msgid"]), facts
    assert [s["state"] for s in world.ledger()] == ["reversed"], facts


# ---- what broke ---------------------------------------------------------------------------------------------------

def test_a_settlement_changed_and_sent_again_under_its_msgid_while_the_first_waits_for_the_patient_is_refused(
        running: World) -> None:
    """The cashier settles Zhang's visit while his other visit's fees are still uploading (a slow bureau), so the
    settlement waits for his lane. She changes it to cash (acct_used_flag 0) and the HIS sends it again under
    the same msgid. That is a different trade under a used msgid: it must be refused, as it is once the first
    is journalled. Today both pass fep's look-up before either is journalled, and the changed one is told the
    first one's answer as its own: the HIS records a cash settlement the bureau never saw."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    other = Visit(running.his, ZHANG)
    other.open()
    running.fault(mode="slow", infno="2204", seconds=3.0, times=1)
    heard: dict[str, dict[str, Any]] = {}
    key = his_key()
    cash = {"data": visit.settlement_input()["data"] | {"acct_used_flag": "0"}}
    sends: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("upload", other.upload_fees),
        ("first", lambda: running.his.call("2207", visit.settlement_input(), msgid=key)),
        ("changed", lambda: running.his.call("2207", cash, msgid=key))]
    threads = []
    for name, send in sends:
        threads.append(threading.Thread(target=lambda n=name, s=send: heard.update({n: s()})))
        threads[-1].start()
        if name == "upload":
            wait_for(lambda: running.journal("infno='2204' AND state='SENT'"), what="the upload at the bureau")
        time.sleep(0.3)  # the first settlement is in the lane before the changed one
    for t in threads:
        t.join()
    assert heard["upload"]["infcode"] == 0 and heard["first"]["infcode"] == 0, said(heard["first"])
    changed = heard["changed"]
    assert changed["fep_state"] == "REFUSED" and REUSED in changed["err_msg"], \
        f"the cash settlement was told {said(changed)} {setl_of(changed)}"
    assert len(running.journal("infno='2207'")) == 1 and len(running.ledger()) == 1


@pytest.mark.parametrize("form", ["uuid", "well formed"])
def test_a_settlement_sent_again_under_its_msgid_after_the_archive_run_is_not_settled_again(world: World,
                                                                                             form: str) -> None:
    """Zhang's settlement lost its answer and fep reversed it: the HIS was told it was not settled. Forty days
    on the day is reconciled and the nightly archive moves it out of the journal. The HIS's retry job, replaying
    what never went through, sends the same msgid: it must hear what became of that trade. Today fep no longer
    knows the msgid. A uuid is a new key: Zhang is settled again, two settlements at the bureau under one HIS
    msgid, the second live. A well-formed msgid goes to the bureau again as it is: the bureau replays its first
    answer, and the HIS and the journal take as settled a settlement the bureau reversed."""
    visit, key, first = reversed_under_its_key(world, None if form == "uuid" else his_msgid(22))
    archived_after_reconciling(world)
    assert not world.journal("infno='2207'")  # moved to the month's file

    not_settled_again(world, visit.settle(msgid=key), first)
    assert all(r["state"] == "REVERSED" for r in world.journal("infno='2207'"))


def test_an_his_that_sends_again_under_the_msgid_fep_answered_with_hears_that_trade_and_its_2601_undoes_it(
        running: World) -> None:
    """An HIS that sends no msgid of its own keeps the fep_msgid of the answer as the trade's msgid (the README:
    a lookup and its own 2601 take it). Its write of the settlement fails, so it sends the settlement again
    under that msgid, to hear the stored answer. That must not be a second trade, and its 2601 naming that
    msgid must undo Zhang's settlement. Today the resend is a second 2207 to the bureau (refused: nothing left
    to settle), the msgid now names it, a lookup says the settlement failed, and the 2601 goes to the bureau
    naming the refused one: Zhang's settlement stays live."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    first = running.his.call("2207", visit.settlement_input())
    assert first["infcode"] == 0, said(first)
    key = first["fep_msgid"]
    again = running.his.call("2207", visit.settlement_input(), msgid=key)
    assert len(running.journal("infno='2207'")) == 1 and again.get("fep_msgid", key) == key, \
        f"sent to the bureau again: {said(again)}"
    assert running.his.lookup(key)["infcode"] == 0
    reversal = running.his.call("2601", visit.reversal_input(key))
    assert reversal["infcode"] == 0, said(reversal)
    assert [s["state"] for s in running.ledger()] == ["reversed"]


# ---- what held (not covered elsewhere) ----------------------------------------------------------------------------

def test_a_registration_sent_again_in_another_charset_or_form_is_the_same_trade(running: World) -> None:
    """The first send and the retry come from different HIS code paths: GBK then UTF-8 (a "2:" digest met by a
    "3:" one), UTF-8 then GBK, UTF-8 then Powersi's input as a JSON string, a string then a rebuilt UTF-8 with a
    BOM. Each is one registration, and the same registration with another doctor is refused in any of them."""
    def body(env: dict[str, Any], how: str) -> tuple[bytes, str]:
        if how == "gbk":
            return envelope.dumps(env).decode("utf-8").encode("gbk"), "application/json; charset=GBK"
        if how == "string":
            return envelope.dumps(env | {"input": envelope.dumps(env["input"]).decode("utf-8")}), "application/json"
        if how == "bom":
            return envelope.BOM + rebuilt(env), "application/json; charset=utf-8"
        return envelope.dumps(env), "application/json"

    for first_how, again_how in (("gbk", "utf-8"), ("utf-8", "gbk"), ("utf-8", "string"), ("string", "bom")):
        key = his_key()
        env = _registration(key, "收费员张三", "欧阳医生")
        first = posted(running, *body(env, first_how))
        assert first["infcode"] == 0, said(first)
        again = posted(running, *body(env, again_how))
        assert (again["infcode"], again["fep_msgid"]) == (0, first["fep_msgid"]), (first_how, again_how, said(again))
        other = env | {"input": {"data": env["input"]["data"] | {"dr_name": "李医生"}}}
        refused = posted(running, *body(other, again_how))
        assert refused["fep_state"] == "REFUSED" and REUSED in refused["err_msg"], (first_how, again_how)
        assert len(running.journal("his_msgid=?", (key,))) == 1


def test_a_file_uploaded_as_a_form_and_sent_again_as_base64_json_is_one_upload_and_the_other_way(
        running: World) -> None:
    content = _zip()

    def upload(key: str, how: str, data: bytes = content) -> dict[str, Any]:
        if how == "form":
            return posted(running, *_form([
                ("jsonStr", None, "text/plain; charset=UTF-8", envelope.dumps(_upload_envelope(key, "detail.zip"))),
                ("file", "detail.zip", "application/octet-stream", data)]))
        env = _upload_envelope(key, "detail.zip")
        env["input"]["fsUploadIn"]["in"] = base64.b64encode(data).decode("ascii")
        return posted(running, envelope.dumps(env))

    for first_how, again_how in (("form", "json"), ("json", "form")):
        key = his_key()
        first = upload(key, first_how)
        assert first["infcode"] == 0, said(first)
        again = upload(key, again_how)
        assert (again["infcode"], again["fep_msgid"]) == (0, first["fep_msgid"]), (first_how, said(again))
        refused = upload(key, again_how, content + b"\0")
        assert refused["fep_state"] == "REFUSED" and REUSED in refused["err_msg"], (first_how, again_how)
        assert len(running.journal("his_msgid=?", (key,))) == 1


def test_fee_lines_fep_mapped_sent_again_as_the_his_wrote_them_are_the_same_upload(running: World, tmp_path) -> None:
    """The journal holds the national codes fep filled in; the payload is what the HIS sent. Sent again as it was
    written, or rebuilt, it is the same upload; a changed quantity is another."""
    fep(running, "catalog", "sync")
    (tmp_path / "map.csv").write_text("hosp_code,national_code\nH-AMOX,XA01AAA001A001010100001\nH-CBC,250101001\n")
    fep(running, "catalog", "map", "import", str(tmp_path / "map.csv"))
    _, input_ = visit_with_hospital_codes(running.his, ["H-AMOX", "H-CBC"])
    key = his_key()
    first = running.his.call("2204", input_, msgid=key)
    assert first["infcode"] == 0, said(first)
    sent = envelope.loads(running.trade(first["fep_msgid"])["request"])["input"]["feedetail"]
    assert sent[0]["med_list_codg"] == "XA01AAA001A001010100001"  # the journal's request is not the HIS's input
    assert running.his.call("2204", input_, msgid=key)["fep_msgid"] == first["fep_msgid"]
    _, again = running.post_raw(rebuilt(in_envelope("2204", input_, key)))
    assert (again["infcode"], again["fep_msgid"]) == (0, first["fep_msgid"]), said(again)
    changed = {"feedetail": [input_["feedetail"][0] | {"cnt": 2, "det_item_fee_sumamt": "20.00"},
                             input_["feedetail"][1]]}
    refused = running.his.call("2204", changed, msgid=key)
    assert refused["fep_state"] == "REFUSED" and REUSED in refused["err_msg"]
    assert len(running.journal("infno='2204' AND his_msgid=?", (key,))) == 1


def test_a_settlement_not_sent_then_sent_again_rebuilt_and_its_own_2601_resent_charge_and_undo_once(
        running: World) -> None:
    """The bureau is down: the settlement is NOT_SENT. The HIS's retry is rebuilt by another code path; fep sends
    the journalled one (its request rewritten for today's session) and a later rebuilt retry hears its answer.
    The HIS's own 2601 under a key of its own, resent rebuilt, is one reversal; that key with another input is
    refused."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    key = his_key()
    with running.outage():
        assert visit.settle(msgid=key)["fep_state"] == "NOT_SENT"
    _, sent = running.post_raw(rebuilt(in_envelope("2207", visit.settlement_input(), key)))
    assert sent["infcode"] == 0, said(sent)
    _, again = running.post_raw(rebuilt(in_envelope("2207", visit.settlement_input(), key)))
    assert (again["fep_msgid"], again["output"]) == (sent["fep_msgid"], sent["output"])
    undo = his_key()
    reversal = running.his.call("2601", visit.reversal_input(key), msgid=undo)
    assert reversal["infcode"] == 0, said(reversal)
    _, resent = running.post_raw(rebuilt(in_envelope("2601", visit.reversal_input(key), undo)))
    assert (resent["infcode"], resent["fep_msgid"]) == (0, reversal["fep_msgid"]), said(resent)
    other = running.his.call("2601", {"data": visit.reversal_input(key)["data"] | {"memo": "again"}}, msgid=undo)
    assert other["fep_state"] == "REFUSED" and REUSED in other["err_msg"]
    assert len(running.journal("infno='2601'")) == 1 and [s["state"] for s in running.ledger()] == ["reversed"]
