"""fep answers in time and in the national interface's own shape, as strict HIS parsers expect."""

from __future__ import annotations

from fep import envelope
from fep.sim.world import ZHANG, Visit, World, said


def test_fep_answers_within_answer_within_and_a_slow_settlement_is_undone(world: World) -> None:
    """The bureau takes longer than the HIS waits: the HIS hears 'NOT settled' in time, never a timeout of its
    own, and the settlement the bureau made meanwhile is reversed."""
    world.configure(fep={"his": {"answer_within": 2}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="slow", infno="2207", seconds=4, times=1)
    answer = visit.settle()
    assert answer["fep_state"] == "RESOLVING" and "no answer within 2 s" in answer["err_msg"], said(answer)
    assert "NOT settled" in answer["err_msg"]
    world.wait_state(answer["fep_msgid"], "REVERSED", timeout=30)
    world.assert_ledgers_agree()


def test_fep_writes_infcode_as_the_bureau_does_on_its_own_envelopes(world: World) -> None:
    world.configure(fep={"his": {"infcode_type": "string"}})
    world.start()
    visit = Visit(world.his, ZHANG)
    visit.open()
    refused = world.his.call("8888", {"data": {}})
    assert refused["infcode"] == "-1" and refused["fep_state"] == "REFUSED"
    with world.outage():
        queued = visit.upload_fees()
        not_sent = visit.identify()
    assert (queued["infcode"], queued["fep_state"]) == ("0", "QUEUED"), said(queued)
    assert (not_sent["infcode"], not_sent["fep_state"]) == ("-1", "NOT_SENT"), said(not_sent)


def test_operator_fields_the_his_leaves_out_come_from_the_config(running: World) -> None:
    answer = running.his.request("POST", "/", envelope.dumps(
        {"infno": "1101", "input": Visit(running.his, ZHANG).identity_input()}))[1]
    sent = envelope.loads(running.trade(answer["fep_msgid"])["request"])
    assert (sent["opter_type"], sent["opter"], sent["opter_name"]) == ("1", "0001", "医保办")
    sign_in = envelope.loads(running.journal("infno='9001'")[0]["request"])
    assert sign_in["opter"] == "0001"  # fep's own trades too: never a made-up name
