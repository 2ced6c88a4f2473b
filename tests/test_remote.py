"""异地 patients: insured in another city or province, treated and settled here under their home region's rules.

The HIS leaves insuplc_admdvs (参保地) empty, as HIS programs often do: fep fills it from the person's last 1101
answer, or refuses the trade until the HIS has called 1101. The bureau routes the trade by it, settles under the
home region's policy, and clears it under the 异地 clearing types; a reversal of an unknown outcome carries it too.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from fep import config
from fep.sim.world import QIAN, ZHANG, ZHAO, Stay, Visit, World, ok, reversed_settlement, said, wait_for

# All 甲类 items, 450.00 in all: enough to pass a deductible and show the home region's ratio
BIG_FEES = [("XA01AAA001A001010100001", "10", "12.50"), ("250101001", "10", "30.00"), ("001102000010000", "1", "25.00")]


@pytest.fixture
def remote(world: World) -> World:
    """fep as a hospital runs it: a trade that needs the person's insured region is refused until 1101 is made."""
    world.configure(fep={"remote": {"without_1101": "refuse"}})
    return world.start()


def reversal_of(world: World, msgid: str) -> dict:
    """The 2601 fep made to undo `msgid`, as the bureau received it."""
    return world.bureau_request(world.trade(msgid)["resolver"])


def test_a_patient_from_another_province_is_identified_filed_and_settled_under_the_home_policy(remote: World) -> None:
    visit = Visit(remote.his, ZHAO, BIG_FEES)
    refused = visit.register()
    assert refused["fep_state"] == "REFUSED" and refused["fep_reason"] == "invalid"
    assert "call 1101" in refused["err_msg"] and "insuplc_admdvs" in refused["err_msg"]
    assert remote.journal("infno='2201'") == []  # nothing was journalled, nothing sent

    visit.open()  # 1101 first: fep keeps the person's insured region from its answer
    registered = remote.trade(remote.journal("infno='2201'")[0]["msgid"])
    assert remote.bureau_request(registered["msgid"])["insuplc_admdvs"] == "440300"
    assert ok(visit.upload_fees()), "the fee upload carries it too"

    unfiled = visit.settle()
    assert not ok(unfiled) and "未备案" in said(unfiled)  # 跨省: settles only under a filing (备案)
    assert ok(visit.file("2501"))
    answer = visit.settle()
    assert ok(answer), said(answer)
    setl = answer["output"]["setlinfo"]
    # Shenzhen's policy: 200.00 deductible, then 80% of the rest; cleared as 域外异地门诊 by the province's agency
    assert setl["fund_pay_sumamt"] == Decimal("200.00") and setl["act_pay_dedc"] == Decimal("200.00")
    assert (setl["clr_type"], setl["clr_optins"]) == ("99963", "439900")
    assert remote.bureau_request(answer["fep_msgid"])["insuplc_admdvs"] == "440300"

    local = Visit(remote.his, ZHANG, BIG_FEES)  # a local patient, same fees: the hospital's own region's rules
    local.up_to_settlement()
    here = local.settle()["output"]["setlinfo"]
    assert here["fund_pay_sumamt"] == Decimal("297.50") and (here["clr_type"], here["clr_optins"]) == ("11", "430199")


def test_what_the_his_says_of_the_insured_region_is_kept_and_the_bureau_refuses_a_trade_without_it(
        remote: World) -> None:
    visit = Visit(remote.his, QIAN)
    direct = remote.bypass("2201", "H43010000001202612010000000001", {"data": {
        "psn_no": QIAN["psn_no"], "insutype": "390", "ipt_otp_no": "X1", "begntime": "2026-12-01 09:00:00"}})
    assert direct["infcode"] == -1 and "insuplc_admdvs" in direct["err_msg"]  # as a real bureau: it cannot route it

    code, answer = visit.post("2201", {"data": {"psn_no": QIAN["psn_no"], "insutype": "390", "ipt_otp_no": "X2"}})
    assert answer["fep_state"] == "REFUSED" and "call 1101" in answer["err_msg"]
    sent = remote.his.call("2201", {"data": {"psn_no": QIAN["psn_no"], "insutype": "390", "ipt_otp_no": "X3"}},
                           insuplc_admdvs="430400")
    assert ok(sent), said(sent)  # the HIS named it: fep needs no 1101 and changes nothing
    assert remote.bureau_request(sent["fep_msgid"])["insuplc_admdvs"] == "430400"


def test_an_unknown_outcome_of_a_remote_outpatient_settlement_is_reversed_in_the_home_region(remote: World) -> None:
    visit = Visit(remote.his, QIAN, BIG_FEES)
    visit.up_to_settlement()  # 省内异地: no filing needed
    lost = reversed_settlement(remote, visit)
    assert lost["fep_state"] == "RESOLVING" and "NOT settled" in said(lost)
    assert remote.trade(lost["fep_msgid"])["state"] == "REVERSED"
    assert reversal_of(remote, lost["fep_msgid"])["insuplc_admdvs"] == "430400"
    again = visit.settle()  # the patient settles again, with a new msgid
    assert ok(again) and again["output"]["setlinfo"]["clr_type"] == "99963", said(again)
    remote.assert_ledgers_agree()


def test_an_unknown_outcome_of_a_remote_inpatient_settlement_is_reversed_in_the_home_region(remote: World) -> None:
    Visit(remote.his, ZHAO).identify()
    assert ok(Visit(remote.his, ZHAO).file("2505"))  # 定点备案
    stay = Stay(remote.his, ZHAO)
    stay.up_to_settlement()
    remote.fault(mode="drop_after", infno="2304", times=1)
    lost = stay.settle()
    assert lost["fep_state"] == "RESOLVING", said(lost)
    wait_for(lambda: remote.trade(lost["fep_msgid"])["state"] == "REVERSED", what="the reversal of the 2304")
    assert reversal_of(remote, lost["fep_msgid"])["insuplc_admdvs"] == "440300"
    again = stay.settle()
    assert ok(again), said(again)
    assert again["output"]["setlinfo"]["clr_type"] == "99968"  # 域外异地住院
    assert ok(stay.discharge())
    remote.assert_ledgers_agree()


@pytest.mark.parametrize("change, error", [
    ({"remote": {"without_1101": "sometimes"}}, "remote.without_1101 must be refuse or forward"),
    ({"clearing": {"status_trade": "3299"}}, "clearing.status_trade 3299 is not in the trade catalog"),
    ({"remote": {"endpoint": "ydzx"}}, r"remote.endpoint 'ydzx' is not a name of bureau.endpoints \(sim\)"),
    ({"remote": {"path": "fsi/yd"}}, "remote.path must be a path beginning with /"),
])
def test_a_wrong_remote_or_clearing_setting_is_refused_naming_the_key(world: World, change: dict, error: str) -> None:
    world.configure(fep=change)
    with pytest.raises(config.ConfigError, match=error):
        config.load(world.fep_config)


def test_a_remote_settlement_made_behind_fep_s_back_is_reversed_in_the_home_region(remote: World) -> None:
    """Reconciliation finds a 异地 settlement the journal does not hold (单边账); `fep reverse` makes its 2601,
    which carries the person's insured region from their 1101 as any trade of theirs does."""
    visit = Visit(remote.his, QIAN)
    visit.up_to_settlement()
    rogue = f"H43010000001{time.strftime('%Y%m%d%H%M%S')}9990"  # fep's own numbering, as an operator's would be
    assert ok(remote.bypass("2207", rogue, visit.settlement_input(), insuplc_admdvs="430400"))
    undo = remote.cli("reverse", rogue, "--infno", "2207", "--person", QIAN["psn_no"])
    assert undo.returncode == 0, undo.stdout + undo.stderr
    [reversal] = remote.journal("infno='2601'")
    assert remote.bureau_request(reversal["msgid"])["insuplc_admdvs"] == "430400"
    assert rogue not in remote.live()


YD_PATH = "/fsi/api/ydService/callService"  # a region's own path for 异地 trades


def test_a_region_that_routes_remote_trades_elsewhere_gets_them_there_and_only_them(world: World) -> None:
    """remote.endpoint and remote.path: a patient insured in another city goes to the region's 异地 endpoint and
    path, a local patient to the endpoint's own; the journal says where each went."""
    url = f"https://127.0.0.1:{world.sim_port}/fsi/api/rsfComIfsService/callService"
    world.configure(fep={"bureau": {"endpoints": [{"name": "sim", "url": url, "server_name": "bureau.fep.test"},
                                                  {"name": "yd", "url": url, "server_name": "bureau.fep.test"}]},
                         "remote": {"without_1101": "refuse", "endpoint": "yd", "path": YD_PATH}})
    world.start()
    heard = {}
    for person in (ZHANG, QIAN):
        visit = Visit(world.his, person)
        heard[person["psn_no"]] = [visit.identify(), visit.register()]
        assert all(ok(a) for a in heard[person["psn_no"]]), heard
    for person, answers in heard.items():
        for answer in answers:
            row = world.trade(answer["fep_msgid"])
            away = person == QIAN["psn_no"] and row["infno"] != "1101"  # a 1101 names no insured region yet
            assert world.bureau_path(row["msgid"]) == (YD_PATH if away else "/fsi/api/rsfComIfsService/callService")
            assert row["endpoint"] == ("yd" if away else "sim"), row
