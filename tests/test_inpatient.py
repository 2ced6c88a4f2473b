"""An inpatient stay (住院) through fep against the simulated bureau: admission (2401), fees (2301), pre-settlement
(2303), settlement (2304), its cancel (2305), discharge (2402), the settlement query (5203); a lost settlement or
admission is reversed (2601); and a bureau that writes infcode as a string is understood."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from decimal import Decimal

import pytest

from fep import envelope
from fep.sim.world import LI, WANG, ZHANG, Stay, World, ok, said, setl_id


@pytest.mark.parametrize("infcode_type", ["number", "string"])
def test_an_inpatient_stay_end_to_end(world: World, infcode_type: str) -> None:
    """Admit, upload the fees, pre-settle, settle, look the settlement up, discharge, cancel the settlement: each
    answered by the bureau, and the bureau's ledger and fep's journal agree to the fen. The HIS hears the
    bureau's infcode as the bureau wrote it."""
    world.configure(sim={"infcode_type": infcode_type})
    world.start()
    stay = Stay(world.his, ZHANG)
    admitted = stay.admit()
    assert ok(admitted) and stay.mdtrt_id, said(admitted)
    assert admitted["infcode"] == (0 if infcode_type == "number" else "0")
    assert ok(stay.upload_fees())

    pre = stay.presettle()
    assert ok(pre) and pre["output"]["setlinfo"]["setl_id"] is None, said(pre)
    settled = stay.settle()
    assert ok(settled) and settled["fep_state"] == "ANSWERED", said(settled)
    setl = settled["output"]["setlinfo"]
    assert setl["medfee_sumamt"] == stay.medfee == pre["output"]["setlinfo"]["medfee_sumamt"]
    assert setl["medfee_sumamt"] == setl["fund_pay_sumamt"] + setl["psn_part_amt"] + setl["hosp_part_amt"]
    assert setl["psn_part_amt"] == setl["acct_pay"] + setl["psn_cash_pay"] and setl["clr_type"] == "21"
    row = world.trade(settled["fep_msgid"])
    assert row["state"] == "ANSWERED" and row["setl_id"] == setl["setl_id"] and row["psn_no"] == ZHANG["psn_no"]

    found = stay.query(setl["setl_id"])
    assert ok(found), said(found)
    assert found["output"]["setlinfo"]["medins_setl_id"] == settled["fep_msgid"]
    assert found["output"]["setlinfo"]["medfee_sumamt"] == setl["medfee_sumamt"]

    assert ok(stay.discharge())
    cancelled = stay.cancel(setl["setl_id"])
    assert ok(cancelled), said(cancelled)
    neg = cancelled["output"]["setlinfo"]
    assert neg["medfee_sumamt"] == -setl["medfee_sumamt"] and neg["setl_id"] != setl["setl_id"]
    assert world.trade(cancelled["fep_msgid"])["cancels"] == setl["setl_id"]
    assert {(s["infno"], s["kind"], s["state"]) for s in world.ledger()} == {
        ("2304", "settle", "cancelled"), ("2305", "cancel", "live")}
    world.assert_ledgers_agree()
    # Once the settlement is cancelled the discharge can be undone, and the stay settled again.
    assert ok(stay.cancel_discharge())
    again = stay.cancel(setl["setl_id"])
    assert not ok(again) and again["fep_state"] == "ANSWERED"  # the bureau refuses a second cancel of one setl_id


def test_a_lost_inpatient_settlement_is_reversed_and_the_patient_settles_again(running: World) -> None:
    """The bureau settles a 2304 and drops the answer: the HIS hears at once that the patient is not settled,
    fep reverses it (2601) until the bureau acknowledges, and a new 2304 settles the same fees."""
    stay = Stay(running.his, LI)
    stay.up_to_settlement()
    running.fault(mode="drop_after", infno="2304", times=1)
    lost = stay.settle()
    assert lost["fep_state"] in ("UNKNOWN", "RESOLVING") and not ok(lost), said(lost)
    assert "NOT settled" in lost["err_msg"]
    row = running.wait_state(lost["fep_msgid"], "REVERSED")
    reversal = running.trade(row["resolver"])
    assert reversal["infno"] == "2601" and reversal["state"] == "ANSWERED"
    assert envelope.loads(reversal["request"])["input"]["data"] == {
        "psn_no": LI["psn_no"], "omsgid": lost["fep_msgid"], "oinfno": "2304"}
    assert [s["state"] for s in running.ledger()] == ["reversed"]
    gone = stay.query(running.ledger()[0]["setl_id"])
    assert not ok(gone) and "结算信息不存在" in gone["err_msg"]  # 5203: a reversed settlement is not there

    again = stay.settle()
    assert ok(again), said(again)
    running.assert_ledgers_agree()
    assert running.his.lookup(lost["fep_msgid"])["fep_state"] == "REVERSED"


def test_a_lost_admission_is_reversed_and_the_patient_admitted_again(running: World) -> None:
    """2401 is 2601-reversible: an admission whose answer was lost is erased at the bureau, so the patient is not
    left "in hospital" under an mdtrt_id the HIS never heard; admitting again works."""
    stay = Stay(running.his, WANG)
    running.fault(mode="drop_after", infno="2401", times=1)
    lost = stay.admit()
    assert not ok(lost) and not stay.mdtrt_id, said(lost)
    running.wait_state(lost["fep_msgid"], "REVERSED")
    admitted = stay.admit()
    assert ok(admitted) and stay.mdtrt_id, said(admitted)
    stay.upload_fees()
    assert ok(stay.settle())
    running.assert_ledgers_agree()


def test_fees_uploaded_while_the_bureau_is_down_go_before_the_settlement(running: World) -> None:
    """2301 is deferrable: while the bureau is unreachable the HIS hears QUEUED; when it is back the fees are
    delivered, in order, and the settlement includes them."""
    stay = Stay(running.his, ZHANG)
    assert ok(stay.admit())
    with running.outage():
        queued = stay.upload_fees()
        assert queued["fep_state"] == "QUEUED" and ok(queued), said(queued)
        refused = stay.settle()
        assert refused["fep_state"] == "NOT_SENT", said(refused)  # money never waits in a queue
    running.wait_state(queued["fep_msgid"], "ANSWERED")
    settled = stay.settle()
    assert ok(settled) and settled["output"]["setlinfo"]["medfee_sumamt"] == stay.medfee, said(settled)
    running.assert_ledgers_agree()


def test_a_string_infcode_bureau_is_understood_by_fep_itself(world: World) -> None:
    """With a bureau that writes infcode "0": fep signs in, resolves a lost settlement (its 2601 is acknowledged
    with "0"), and its own reconciliation (3201) reads the bureau's answers."""
    world.configure(sim={"infcode_type": "string"})
    world.start()
    stay = Stay(world.his, ZHANG)
    stay.up_to_settlement()
    status = json.loads(world.cli("status", "--json").stdout)
    assert status["signed_in"] and status["sign_no"], status  # its sign-in's "0" is a success
    world.fault(mode="drop_after", infno="2304", times=1)
    lost = stay.settle()
    world.wait_state(lost["fep_msgid"], "REVERSED")
    settled = stay.settle()
    assert settled["infcode"] == "0" and settled["fep_state"] == "ANSWERED", said(settled)
    world.assert_ledgers_agree()
    run = subprocess.run([sys.executable, "-m", "fep.cli", "reconcile", "--date", date.today().isoformat(), "--json",
                          "--admin", str(world.dir / "run" / "admin.sock")],
                         capture_output=True, text=True, timeout=120)
    doc = json.loads(run.stdout)
    assert run.returncode == 0 and doc["unbalanced"] == 0, run.stdout + run.stderr
    inpatient = next(g for g in doc["groups"] if g["clr_type"] == "21")
    assert Decimal(str(inpatient["medfee_sumamt"])) == stay.medfee, inpatient


def test_a_settlement_is_found_by_5203_and_a_cancel_is_its_own_negative_settlement(running: World) -> None:
    stay = Stay(running.his, LI)
    stay.up_to_settlement()
    settled = stay.settle()
    cancel = stay.cancel(setl_id(settled))
    found = stay.query(setl_id(cancel))
    assert ok(found), said(found)
    info = found["output"]["setlinfo"]
    assert info["refd_setl_flag"] == "1" and info["medfee_sumamt"] == -stay.medfee
    assert info["medins_setl_id"] == cancel["fep_msgid"]
    wrong = running.his.call("5203", {"data": {"psn_no": ZHANG["psn_no"], "setl_id": setl_id(settled),
                                               "mdtrt_id": stay.mdtrt_id}})
    assert not ok(wrong) and wrong["fep_state"] == "ANSWERED"  # another person's settlement is not shown
    running.assert_ledgers_agree()
