"""Reconciliation with the bureau: the insurance office's table, and every difference named and undone."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import date
from decimal import Decimal

from fep.sim.world import LI, QIAN, ZHANG, ZHAO, Visit, World, parked_settlement

TODAY = date.today().isoformat()


def reconcile(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fep.cli", "reconcile", "--date", TODAY, *args, "--admin",
                           str(world.dir / "run" / "admin.sock")], capture_output=True, text=True, timeout=120)


def settled(world: World, person: dict[str, str]) -> tuple[Visit, dict]:
    v = Visit(world.his, person)
    v.up_to_settlement()
    answer = v.settle()
    assert answer["infcode"] == 0, answer
    return v, answer["output"]["setlinfo"]


def settled_behind_fep(world: World, person: dict[str, str], seq: int) -> str:
    """A visit uploaded through fep, then settled at the bureau directly (an operator in its system)."""
    behind = Visit(world.his, person)
    behind.up_to_settlement()
    rogue = f"H43010000001{time.strftime('%Y%m%d%H%M%S')}{seq:04d}"
    assert world.bypass("2207", rogue, behind.settlement_input())["infcode"] == 0
    return rogue


def differences(doc: dict) -> list[dict]:
    return [d for g in doc["groups"] for d in g["differences"]]


def test_a_balanced_day_shows_the_insurance_office_s_table(running: World) -> None:
    first, s1 = settled(running, ZHANG)
    _, s2 = settled(running, ZHANG)
    _, s3 = settled(running, LI)
    assert Visit(running.his, ZHANG).cancel(s2["setl_id"])["infcode"] != 0  # wrong visit: refused by the bureau
    v2_cancel = running.his.call("2208", {"data": {"setl_id": s2["setl_id"], "mdtrt_id": s2["mdtrt_id"],
                                                   "psn_no": ZHANG["psn_no"]}})
    assert v2_cancel["infcode"] == 0

    run = reconcile(running)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].split() == ["险种类别", "结算经办机构", "清算类别", "医疗费总额", "基金支付总额", "个人账户支付金额",
                                "结算笔数", "结果", "错误说明"]
    zhang = next(l for l in lines if l.startswith("310"))
    # The cancel counts: its own negative settlement, so 3 settlements and the first one's amount remain.
    assert zhang.split()[-2:] == ["3", "平"] and str(s1["medfee_sumamt"]) in zhang
    total = next(l for l in lines if l.startswith("合计"))
    assert total.split()[1] == str(s1["medfee_sumamt"] + s3["medfee_sumamt"]) and total.split()[-1] == "4"

    csv = reconcile(running, "--show", "--format", "csv").stdout.splitlines()
    assert csv[0].startswith("险种类别,结算经办机构,清算类别") and csv[-1].startswith("合计,")
    stored = json.loads(reconcile(running, "--show", "--json").stdout)
    assert stored["balanced"] == 2 and stored["unbalanced"] == 0 and stored["unresolved"] == []
    status = json.loads(subprocess.run([sys.executable, "-m", "fep.cli", "status", "--json", "--admin",
                                        str(running.dir / "run" / "admin.sock")], capture_output=True,
                                       text=True).stdout)
    assert status["last_reconciliation"]["balanced"] == 2


def test_a_settlement_the_his_never_heard_of_is_found_and_reversed_until_the_day_balances(running: World) -> None:
    settled(running, ZHANG)
    rogue = settled_behind_fep(running, ZHANG, 9998)

    run = reconcile(running, "--json")
    assert run.returncode == 1
    doc = json.loads(run.stdout)
    group = doc["groups"][0]
    assert group["result"] == "不平" and "fixmedins_setl_cnt: 中心2 机构1" in group["error"]
    [d] = differences(doc)
    assert d["kind"] == "settled at the bureau, unknown to the journal (单边账)" and d["msgid"] == rogue
    assert d["action"].endswith(f"fep reverse {rogue} --infno 2207 --person {ZHANG['psn_no']}")

    undo = subprocess.run([sys.executable, "-m", "fep.cli", *d["action"].split("fep ", 1)[1].split(), "--admin",
                           str(running.dir / "run" / "admin.sock")], capture_output=True, text=True)
    assert undo.returncode == 0, undo.stderr
    assert reconcile(running).returncode == 0


def test_a_cancel_made_at_the_bureau_only_is_found_and_undone(running: World) -> None:
    visit, s = settled(running, ZHANG)
    rogue = f"H43010000001{time.strftime('%Y%m%d%H%M%S')}9997"
    assert running.bypass("2208", rogue, {"data": {"setl_id": s["setl_id"], "mdtrt_id": s["mdtrt_id"],
                                                   "psn_no": ZHANG["psn_no"]}})["infcode"] == 0
    doc = json.loads(reconcile(running, "--json").stdout)
    [d] = differences(doc)
    assert d["kind"] == "cancelled at the bureau only" and d["msgid"] == rogue
    assert f"fep reverse {rogue} --infno 2208 --person {ZHANG['psn_no']}" in d["action"]
    undo = subprocess.run([sys.executable, "-m", "fep.cli", "reverse", rogue, "--infno", "2208", "--person",
                           ZHANG["psn_no"], "--admin", str(running.dir / "run" / "admin.sock")],
                          capture_output=True, text=True)
    assert undo.returncode == 0, undo.stderr
    assert reconcile(running).returncode == 0


def test_a_changed_amount_and_a_settlement_the_bureau_lost_are_named(running: World) -> None:
    _, s1 = settled(running, ZHANG)
    _, s2 = settled(running, ZHANG)
    running.adjust(s1["setl_id"], str(s1["medfee_sumamt"] - Decimal("10.00")))
    running.forget(s2["setl_id"])
    doc = json.loads(reconcile(running, "--json").stdout)
    kinds = {d["setl_id"]: d for d in differences(doc)}
    assert kinds[s1["setl_id"]]["kind"] == "amounts differ"
    assert kinds[s1["setl_id"]]["bureau_medfee"] == str(s1["medfee_sumamt"] - Decimal("10.00"))
    assert "the bureau's figures stand" in kinds[s1["setl_id"]]["action"]
    assert kinds[s2["setl_id"]]["kind"] == "in the journal, not at the bureau"
    assert "5203" in kinds[s2["setl_id"]]["action"]


def test_unresolved_unknown_outcomes_are_reported_before_the_totals(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    answer = parked_settlement(running, visit)
    run = reconcile(running)
    assert run.returncode == 1
    out = run.stdout
    assert out.index("UNRESOLVED: 1 trade(s)") < out.index("险种类别")
    assert answer["fep_msgid"] in out.split("险种类别")[0]


def test_a_bureau_only_settlement_in_a_group_the_journal_has_nothing_in_is_found(running: World) -> None:
    """LI (390) settles only behind fep's back: the 390 group is reconciled because conf lists it."""
    settled(running, ZHANG)
    rogue = settled_behind_fep(running, LI, 9996)
    doc = json.loads(reconcile(running, "--json").stdout)
    group = next(g for g in doc["groups"] if g["insutype"] == "390")
    assert group["fixmedins_setl_cnt"] == 0 and group["result"] == "不平"
    [d] = group["differences"]
    assert d["kind"] == "settled at the bureau, unknown to the journal (单边账)" and d["msgid"] == rogue


def test_a_settlement_left_unresolved_just_before_midnight_keeps_the_next_day_from_balancing(running: World) -> None:
    """A 2207 sent at 23:59:58 may be settled by the bureau after midnight: the next day's reconciliation lists
    it among the unknown outcomes, because that day cannot balance until it is resolved."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    msgid = parked_settlement(running, visit)["fep_msgid"]
    running.kill_fep()
    midnight = time.mktime(date.today().timetuple())
    with sqlite3.connect(running.dir / "lib" / "journal.db") as c:
        c.execute("UPDATE trades SET created=? WHERE msgid=?", (midnight - 2, msgid))
    running.start_fep()
    run = reconcile(running, "--format", "json")
    assert [u["msgid"] for u in json.loads(run.stdout)["unresolved"]] == [msgid], run.stdout + run.stderr


def test_remote_settlements_balance_in_their_own_clearing_types_named_as_the_office_names_them(running: World) -> None:
    """异地 settlements fall in the clearing types and agency the bureau reports for them; a group that does not
    balance says how many settlements and how much money each side has more."""
    zhao = Visit(running.his, ZHAO)
    zhao.open()
    assert zhao.file()["infcode"] == 0
    assert zhao.upload_fees()["infcode"] == 0
    remote = zhao.settle()["output"]["setlinfo"]
    _, qian = settled(running, QIAN)
    _, local = settled(running, ZHANG)
    run = reconcile(running)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {tuple(l.split()[:5]): l for l in run.stdout.splitlines()[2:] if l[:1].isdigit()}
    assert ("310", "职工基本医疗保险", "439900", "99963", "异地门诊") in rows
    assert ("390", "城乡居民基本医疗保险", "439900", "99963", "异地门诊") in rows
    assert ("310", "职工基本医疗保险", "430199", "11", "门诊") in rows
    total = next(l for l in run.stdout.splitlines() if l.startswith("合计"))
    assert total.split()[1] == str(remote["medfee_sumamt"] + qian["medfee_sumamt"] + local["medfee_sumamt"])

    running.adjust(remote["setl_id"], str(remote["medfee_sumamt"] - Decimal("10.00")))  # an audit deduction
    settled_behind_fep(running, ZHANG, 9995)
    doc = json.loads(reconcile(running, "--json").stdout)
    groups = {g["clr_type"] + "/" + g["insutype"]: g for g in doc["groups"]}
    assert groups["99963/310"]["more"] == {"bureau": {"settlements": 0, "medfee": Decimal("0.00")},
                                           "journal": {"settlements": 0, "medfee": Decimal("10.00")}}
    assert groups["11/310"]["more"]["bureau"]["settlements"] == 1
    table = reconcile(running, "--show").stdout
    assert "医院多0笔 10.00元" in table and "中心多1笔" in table
