"""The HIS's msgid is the HIS's idempotency key, whatever its form: 29 characters, yyMMddHHmmss-code-seq, a uuid.
The bureau always sees a well-formed msgid; the journal keeps both."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import simplejson

from fep import envelope
from fep.msgid import well_formed
from fep.sim.world import ZHANG, Visit, World, said

FORMS = {
    "29 characters": lambda: f"H4301000009{time.strftime('%Y%m%d%H%M%S')}0001",
    "yyMMddHHmmss-code-seq": lambda: f"{time.strftime('%y%m%d%H%M%S')}-H43010000099-4357",
    "uuid": lambda: uuid.uuid4().hex.upper()[:30],
}


@pytest.mark.parametrize("form", FORMS)
def test_an_his_msgid_of_any_form_names_one_trade_forever(running: World, form: str) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    key = FORMS[form]()
    first = visit.settle(msgid=key)
    assert first["infcode"] == 0, said(first)
    again = visit.settle(msgid=key)  # the HIS retries with its own key: the stored answer, not a second charge
    assert (again["fep_msgid"], again["output"]) == (first["fep_msgid"], first["output"])
    assert len(running.live()) == 1 and len(running.journal("infno='2207'")) == 1
    # The bureau saw a well-formed msgid, and the journal maps the HIS's key to it.
    row = running.trade(first["fep_msgid"])
    assert well_formed(row["msgid"]) and row["his_msgid"] == key
    assert running.sim_answer(row["msgid"]) is not None
    assert running.his.lookup(key)["fep_msgid"] == first["fep_msgid"]  # looked up by the HIS's own key
    different = running.his.call("2207", visit.settlement_input() | {"data": {**visit.settlement_input()["data"],
                                                                             "medfee_sumamt": "1.00"}}, msgid=key)
    assert different["fep_state"] == "REFUSED" and "already used for a different trade" in different["err_msg"]


def test_an_upload_resent_under_its_msgid_and_written_otherwise_is_the_same_upload(running: World) -> None:
    """fep knows an upload by the HIS's own bytes (a 3.5 MB one is not encoded again to know it). An HIS that
    rebuilds its resend, keys in another order, spaced and with escaped Chinese, still sends the same upload:
    it hears the first answer. One fee line changed is another trade, and refused."""
    visit = Visit(running.his, ZHANG)
    visit.open()
    key = uuid.uuid4().hex.upper()[:30]
    first = running.his.call("2204", visit.fee_input(), msgid=key)
    assert first["infcode"] == 0, said(first)
    assert running.trade(first["fep_msgid"])["payload_hash"].startswith(envelope.RAW_PREFIX)  # the bytes' digest

    def resend(fees: dict[str, Any]) -> dict[str, Any]:
        rebuilt = {"input": {"feedetail": [dict(reversed(line.items())) for line in fees["feedetail"]]},
                   "opter_name": "HIS", "msgid": key, "infno": "2204"}
        status, answer = running.post_raw(simplejson.dumps(rebuilt, use_decimal=True, indent=2).encode())
        assert status == 200, answer
        return answer

    again = resend(visit.fee_input())
    assert (again["infcode"], again["fep_msgid"]) == (0, first["fep_msgid"]), said(again)
    assert len(running.journal("infno='2204'")) == 1
    changed = visit.fee_input()
    changed["feedetail"][0]["cnt"] += 1
    refused = resend(changed)
    assert refused["fep_state"] == "REFUSED" and "already used for a different trade" in refused["err_msg"]


def test_a_settlement_resent_after_an_upgrade_requires_a_new_field_is_still_that_settlement(world: World) -> None:
    """Zhang is settled; then the hospital installs a configuration whose 2207 requires a field this HIS does not
    send. The HIS sending that settlement again under its msgid hears it, as journalled; only a new 2207 is
    refused for the missing field."""
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    key = uuid.uuid4().hex.upper()[:30]
    first = visit.settle(msgid=key)
    assert first["infcode"] == 0, said(first)
    world.stop()
    required = ["data.psn_no", "data.mdtrt_id", "data.chrg_bchno", "data.hifob_pay_flag"]
    world.configure(trades={"2207": {"required": required}})
    world.start()
    again = visit.settle(msgid=key)
    assert (again["infcode"], again["fep_msgid"]) == (0, first["fep_msgid"]), said(again)
    new = visit.settle()
    assert new["fep_state"] == "REFUSED" and "data.hifob_pay_flag" in new["err_msg"], said(new)


def test_a_well_formed_unused_his_msgid_is_the_one_the_bureau_sees(running: World) -> None:
    key = f"H43010000099{time.strftime('%Y%m%d%H%M%S')}0042"
    answer = running.his.call("1101", Visit(running.his, ZHANG).identity_input(), msgid=key)
    assert answer["fep_msgid"] == key and running.sim_answer(key) is not None


def test_the_his_s_2601_names_its_own_msgid_and_the_bureau_hears_the_one_it_knows(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    key = uuid.uuid4().hex.upper()[:30]
    settled = visit.settle(msgid=key)
    assert settled["infcode"] == 0, said(settled)
    reversal = running.his.call("2601", visit.reversal_input(key))  # the HIS names the trade by its own key
    assert reversal["infcode"] == 0, said(reversal)
    sent = envelope.loads(running.trade(reversal["fep_msgid"])["request"])["input"]["data"]
    assert sent["omsgid"] == settled["fep_msgid"]
    assert running.trade(settled["fep_msgid"])["state"] == "REVERSED"
    assert [s["state"] for s in running.ledger()] == ["reversed"]


def test_an_his_msgid_that_fep_used_for_its_own_trade_is_a_new_trade_not_a_refusal(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    own = running.journal("infno='9001'")[0]["msgid"]  # fep's own sign-in took this number
    answer = running.his.call("1101", visit.identity_input(), msgid=own)
    assert answer["infcode"] == 0, said(answer)
    assert answer["fep_msgid"] != own and running.trade(answer["fep_msgid"])["his_msgid"] == own
    assert running.his.call("1101", visit.identity_input(), msgid=own)["fep_msgid"] == answer["fep_msgid"]


def test_an_his_that_times_out_and_resends_its_msgid_hears_the_first_answer(running: World) -> None:
    """As the SDK's transport retry does: the first 2207 is still at the bureau when the same body comes again.
    The resubmission waits for the first one's answer and hears it, instead of an immediate "in progress"
    that every HIS client reads as a failure; the patient is charged once."""
    import threading

    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    key = uuid.uuid4().hex.upper()[:30]
    running.fault(mode="slow", infno="2207", seconds=1.5, times=1)
    first: dict = {}
    sending = threading.Thread(target=lambda: first.update(visit.settle(msgid=key)))
    sending.start()
    time.sleep(0.5)  # the first is at the bureau now
    again = visit.settle(msgid=key)
    sending.join()
    assert again["infcode"] == 0 and again["fep_msgid"] == first["fep_msgid"], said(again)
    assert again["output"]["setlinfo"]["setl_id"] == first["output"]["setlinfo"]["setl_id"]
    assert len(running.live()) == 1
