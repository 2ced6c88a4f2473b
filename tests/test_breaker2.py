"""An outside reviewer's attempts to break issues 11 and 12 (and 10's commands), as an HIS vendor or an attacker on
an allowed HIS host would: the trade catalog, the msgid as idempotency key, refusals in the interface's shape,
answer_within, bounds, true answers, privacy and the operator's commands."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fep import envelope
from fep.sim.world import LI, ZHANG, Visit, World, said, settled_visit


def post(world: World, env: dict[str, Any]) -> dict[str, Any]:
    status, answer = world.post_raw(envelope.dumps(env))
    assert status == 200, (status, answer)
    return answer


# ---- the msgid is the HIS's idempotency key, whatever its form ---------------------------------------------------
def test_a_numeric_msgid_is_an_idempotency_key_too(running: World) -> None:
    """An HIS that numbers its packets writes the msgid as a JSON number ("msgid": 2611230930150001). It times out
    and sends the same settlement again, same msgid, same bytes. It must hear the stored answer, never a second
    trade: yet fep ignores a msgid that is not a string, so each submission is a new trade."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    env = {"infno": "2207", "msgid": 2611230930150001, "input": visit.settlement_input(), "opter_type": "1",
           "opter": "his", "opter_name": "HIS"}
    first = post(running, env)
    assert first["infcode"] == 0, said(first)
    again = post(running, env)
    settles = running.journal("infno='2207'")
    assert again["fep_msgid"] == first["fep_msgid"] and len(settles) == 1, \
        f"the same msgid {env['msgid']} gave {len(settles)} settlements: {[r['msgid'] for r in settles]}; " \
        f"bureau live: {running.live()}; the resubmission heard {said(again)}"


def test_a_msgid_with_a_space_or_chinese_can_be_looked_up(running: World) -> None:
    """"whatever its form": an HIS numbers its packets 门诊-0001 or "OP 0001". A lookup of it goes in the URL,
    percent-encoded as every HTTP client writes it (GET /fep/trades/%E9%97%A8...). fep must find the trade."""
    for msgid in ("门诊-20261123-0001-" + uuid.uuid4().hex[:6], "OP 0001 " + uuid.uuid4().hex[:6]):
        a = running.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}},
                             msgid=msgid)
        assert a["infcode"] == 0, said(a)
        from urllib.parse import quote
        status, found = running.his_tcp.request("GET", "/fep/trades/" + quote(msgid))
        assert found.get("fep_msgid") == a["fep_msgid"], f"lookup of {msgid!r}: {status} {said(found)}"


def test_a_duplicate_key_inside_powersis_string_input_is_refused(running: World) -> None:
    """Powersi sends `input` as a JSON string. A key twice in one object is refused in the body; inside the
    string it must be refused too, or the journal shows one value while the HIS meant another."""
    inner = '{"data":{"mdtrt_cert_type":"02","mdtrt_cert_no":"%s","mdtrt_cert_no":"430102199002020022"}}' % ZHANG["certno"]
    a = post(running, {"infno": "1101", "msgid": "PW" + uuid.uuid4().hex, "input": inner})
    sent = running.bureau_request(a["fep_msgid"]) if a.get("fep_msgid") else {}
    assert a["fep_state"] == "REFUSED" and a.get("fep_reason") == "invalid", \
        f"{said(a)}; the bureau was asked about {sent.get('input')}"


def test_nesting_inside_powersis_string_input_is_bounded_too(running: World) -> None:
    """Nesting past 32 levels is refused; the same nesting inside a string `input` must be too."""
    deep = "[" * 200 + "]" * 200
    inner = '{"data":{"mdtrt_cert_type":"02","mdtrt_cert_no":"%s","x":%s}}' % (ZHANG["certno"], deep)
    a = post(running, {"infno": "1101", "msgid": "PW" + uuid.uuid4().hex, "input": inner})
    assert a["fep_state"] == "REFUSED" and a.get("fep_reason") == "invalid", said(a)


def test_the_his_s_2601_of_a_guessed_msgid_does_not_tell_whose_trade_it_is(running: World) -> None:
    """msgids can be guessed, so a lookup never shows the person. An attacker on an allowed host guesses the
    msgid of someone's settlement and sends a 2601 naming it with any psn_no. The refusal must not name the
    settlement's psn_no."""
    visit, settled = settled_visit(running, ZHANG)
    stranger = Visit(running.his, LI)
    status, a = stranger.post("2601", stranger.reversal_input(settled["fep_msgid"]))
    assert ZHANG["psn_no"] not in json.dumps(a, ensure_ascii=False, default=str), said(a)


def test_the_fep_msgid_an_his_was_given_names_its_trade_even_after_another_his_used_it_as_its_own(
        running: World) -> None:
    """Two modules of one hospital's HIS: the outpatient one numbers packets with uuids, so fep gives its
    settlement fep's own number F1 and says so (fep_msgid). The inpatient one numbers packets the national way
    and, by chance or by a vendor's fault, sends its settlement of the same person with msgid F1 (fep numbers it
    F2). The outpatient HIS now reverses its settlement with its own 2601 naming F1, as the README allows
    ("your own 2601 (omsgid) take either"). Refund order says it must be refused (a later settlement is in
    force); instead fep reverses the other module's settlement, and the HIS is told its own one was undone."""
    first = Visit(running.his, ZHANG)
    first.up_to_settlement()
    a = first.settle(msgid="uuid-" + str(uuid.uuid4()))
    assert a["infcode"] == 0, said(a)
    f1 = a["fep_msgid"]
    second = Visit(running.his, ZHANG)
    second.up_to_settlement()
    refused = second.settle(msgid=f1)  # F1 already names A's settlement: it cannot become B's key too
    assert refused["fep_state"] == "REFUSED" and refused["fep_reason"] == "msgid_reused", said(refused)
    b = second.settle(msgid=f"H43010000077{time.strftime('%Y%m%d%H%M%S')}0001")
    assert b["infcode"] == 0, said(b)
    status, undo = first.post("2601", first.reversal_input(f1))
    time.sleep(2)
    live = running.live()
    assert b["fep_msgid"] in live and f1 in live, f"a 2601 naming {f1} undid a settlement; the HIS heard " \
                                                  f"{said(undo)}; bureau live: {live}"
    assert undo["fep_state"] == "REFUSED" and "refunds go last settlement first" in undo["err_msg"], said(undo)


# ---- logs are masked, the bureau's text included ------------------------------------------------------------------
def test_a_name_before_身份证号_in_the_bureaus_text_is_masked() -> None:
    """The bureau writes its refusals as 参保人张三身份证号430102...未参保 / 人员王小明身份证430102...: a name
    written just before an ID number (with the words 身份证号 between) must keep only its first character."""
    from fep.logs import mask

    for text, name in (("参保人张三身份证号430102198001010011未参保", "张三"),
                       ("人员王小明身份证430102198001010011无有效待遇", "王小明"),
                       ("参保人张三（身份证号430102198001010011）不存在", "张三")):
        assert name not in mask(text), mask(text)


def test_a_name_field_holding_a_spaced_or_camel_cased_name_is_masked() -> None:
    """Java clients and bureaus write psnName, and names are often written with a space (张 三, Zhang San)."""
    from fep.logs import mask

    for text, rest in (('{"psn_name": "张 三"}', "三"), ("psnName=张三", "张三"), ("psn_name=Zhang San", "San")):
        assert rest not in mask(text), mask(text)


# ---- every request gets a true answer or none ------------------------------------------------------------------
def test_a_head_request_is_answered_without_a_body_so_the_next_answer_on_the_connection_is_read_right(
        running: World) -> None:
    """A monitoring probe or a .NET health check sends HEAD on a kept connection, then a lookup. An answer to
    HEAD has no body (RFC 9110 §9.3.2), so the client reads the next bytes as the lookup's status line. fep
    sends the 405's JSON body after HEAD: the client reads '{"infcode":-1,...' as the next answer's status line."""
    import socket

    with socket.create_connection(("127.0.0.1", running.his_port), timeout=5) as s:
        s.sendall(b"HEAD /fep/trades/X HTTP/1.1\r\nHost: fep\r\n\r\nGET /fep/trades/NOPE HTTP/1.1\r\nHost: fep\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, after = data.partition(b"\r\n\r\n")
    status_line = head.splitlines()[0]
    assert after.startswith(b"HTTP/1.1 "), \
        f"after the answer to HEAD ({status_line!r}) came {after[:60]!r}, not the next status line"
