"""Issue 12, privacy: a lookup on the HIS side shows state and codes only (the full answer goes to a
resubmission of the same msgid and payload, and to the admin socket); the two sockets have separate groups;
the log mask catches every ID-number shape, psn_no and names, on every log path."""

from __future__ import annotations

import json
from typing import Any

from fep import envelope
from fep.sim.world import Visit, World, ZHANG, his_msgid

PERSONAL = ("psn_name", "certno", "brdy", "balc", "psn_no", "gend", "age")


def _keys(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in _keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in _keys(v)}
    return set()


def test_a_lookup_shows_state_and_codes_never_the_person(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    msgid = his_msgid(1)
    status, full = visit.post("1101", visit.identity_input(), msgid=msgid)
    assert status == 200 and full["infcode"] == 0 and full["output"]["baseinfo"]["psn_name"]
    looked = running.his.lookup(msgid)
    assert looked["infcode"] == 0 and looked["fep_state"] == "ANSWERED" and looked["fep_msgid"]
    assert not _keys(looked["output"]) & set(PERSONAL), looked
    text = json.dumps(looked, ensure_ascii=False)
    for value in (ZHANG["certno"], ZHANG["psn_no"], full["output"]["baseinfo"]["psn_name"]):
        assert value not in text, (value, looked)
    # The same msgid and payload again: the HIS that sent it hears the whole answer.
    again = visit.post("1101", visit.identity_input(), msgid=msgid)[1]
    assert again["output"] == full["output"]
    # The admin socket keeps the full view.
    shown = json.loads(running.cli("show", looked["fep_msgid"], "--json").stdout)
    assert shown["answer"]["output"]["baseinfo"]["certno"] == ZHANG["certno"]


def test_a_settlements_lookup_keeps_what_the_his_acts_on(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    msgid = his_msgid(2)
    settled = visit.settle(msgid=msgid)
    assert settled["infcode"] == 0 and settled["output"]["setlinfo"]["psn_name"]
    looked = running.his.lookup(msgid)
    setl = looked["output"]["setlinfo"]
    assert setl["setl_id"] == settled["output"]["setlinfo"]["setl_id"]
    assert setl["mdtrt_id"] == settled["output"]["setlinfo"]["mdtrt_id"]
    assert envelope.loads(envelope.dumps(setl["medfee_sumamt"])) == settled["output"]["setlinfo"]["medfee_sumamt"]
    assert not _keys(looked) & set(PERSONAL), looked
