"""Month end (清算), as the insurance office and finance do it: a month of settlements, local and 异地, is
reconciled day by day, applied for per group (3203) only once every day balanced, the 异地 clearing detail
pulled (3260, every page) and compared with the journal, the bureau's audit read (approved, 拒付), and the
bank's disbursement (拨付) recorded by whoever entered it. A month is cleared once it is over: the month's
settlements are made today and moved to the last day of last month (World.backdate_settlements)."""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal

import pytest

from fep.sim.world import LI, QIAN, ZHANG, ZHAO, Stay, Visit, World, ok, said, settled_visit

LAST_DAY = date.today().replace(day=1) - timedelta(days=1)
MONTH = LAST_DAY.strftime("%Y-%m")  # last month: over
DAYS = [LAST_DAY.replace(day=d).isoformat() for d in range(1, LAST_DAY.day + 1)]


@pytest.fixture
def month(world: World) -> dict[str, dict]:
    """The month's settlements: local outpatients (310, 390), and 异地 ones: outpatient visits of a person from
    another province (filed) and from another city, and an inpatient stay. The clearing centre pages its 异地
    detail two rows at a time. Returns each settlement's setlinfo by name."""
    world.configure(sim={"remote": {"page_size": 2}})
    world.start()
    out = {"zhang": settled_visit(world, ZHANG)[1], "zhang2": settled_visit(world, ZHANG)[1],
           "li": settled_visit(world, LI)[1], "qian": settled_visit(world, QIAN)[1]}
    for name in ("zhao", "zhao2"):
        visit = Visit(world.his, ZHAO)
        visit.up_to_settlement()
        assert ok(visit.file()), "a filing (备案) first"
        out[name] = visit.settle()
    stay = Stay(world.his, ZHAO)
    stay.up_to_settlement()
    out["zhao_stay"] = stay.settle()
    for name, answer in out.items():
        assert ok(answer), f"{name}: {said(answer)}"
    world.backdate_settlements(LAST_DAY)
    return {name: answer["output"]["setlinfo"] for name, answer in out.items()}


def clearing(world: World, *args: str) -> tuple[int, dict]:
    run = world.cli("clearing", *args, "--month", MONTH, "--json")
    assert run.stdout, run.stderr
    return run.returncode, json.loads(run.stdout)


def groups(doc: dict) -> dict[str, dict]:
    return {f"{g['insutype']}/{g['setl_optins']}/{g['clr_type']}": g for g in doc["groups"]}


def test_a_month_is_applied_for_pulled_audited_and_paid(month: dict[str, dict], world: World) -> None:
    # Nothing is applied for while a day of the month is not reconciled: the days are named.
    code, doc = clearing(world, "apply")
    assert code == 1 and doc["applied"] == 0
    assert all(f"{DAYS[-1]} (not reconciled)" in g["days"] for g in doc["groups"])
    assert world.sim_answers() and "3203" not in {infno for _, infno in world.sim_answers()}

    for day in DAYS:
        assert world.cli("reconcile", "--date", day).returncode == 0, day
    code, doc = clearing(world, "apply")
    assert code == 0, doc
    applied = groups(doc)
    assert set(applied) == {"310/430199/11", "390/430199/11", "310/439900/99963", "390/439900/99963",
                            "310/439900/99968"}
    local = applied["310/430199/11"]
    assert local["result"] == "applied" and local["clr_appy_evt_id"] and local["settlements"] == 2
    assert Decimal(str(local["fund"])) == month["zhang"]["fund_pay_sumamt"] + month["zhang2"]["fund_pay_sumamt"]
    assert groups(clearing(world, "apply")[1])["310/430199/11"]["result"] == "already applied"

    # A group's application is cancelled (3204) and made again.
    first = local["clr_appy_evt_id"]
    assert world.cli("clearing", "cancel", "--month", MONTH, "--group", "390/430199/11").returncode == 0
    again = groups(clearing(world, "apply")[1])
    assert again["390/430199/11"]["result"] == "applied" and again["310/430199/11"]["clr_appy_evt_id"] == first

    # The 异地 detail, every page of it, with one difference planted at the clearing centre: named, not confirmed.
    planted = month["zhao2"]
    world.adjust(planted["setl_id"], str(planted["medfee_sumamt"] - Decimal("5.00")))
    code, pulled = clearing(world, "remote")
    assert code == 1 and not pulled["confirmed"] and pulled["rows"] == 4 == pulled["journal"]
    [d] = pulled["differences"]
    assert d["kind"] == "amounts differ" and d["setl_id"] == planted["setl_id"] and "clearing centre" in d["action"]
    assert [i for _, i in world.sim_answers()].count("3260") == 3  # rows 1-2, 3-4, and the empty page after
    assert "3261" not in {infno for _, infno in world.sim_answers()}
    world.adjust(planted["setl_id"], str(planted["medfee_sumamt"]))  # the centre corrects it
    code, pulled = clearing(world, "remote")
    assert code == 0 and pulled["confirmed"] and pulled["differences"] == []

    # The audit refuses part of a settlement (拒付); the bank pays the rest, and who entered it is kept.
    world.refuse(month["zhang2"]["setl_id"], "20.00", "超限价")
    status = groups(clearing(world, "status")[1])["310/430199/11"]
    assert Decimal(str(status["refused"])) == Decimal("20.00") and status["refusals"][0]["reason"] == "超限价"
    assert Decimal(str(status["approved"])) == Decimal(str(local["fund"])) - Decimal("20.00")
    due = Decimal(str(status["outstanding"]))
    paid = world.cli("clearing", "paid", "--month", MONTH, "--group", "310/430199/11", "--amount", str(due),
                     "--note", "工商银行到账通知 0001")
    assert paid.returncode == 0, paid.stderr
    code, doc = clearing(world, "status")
    status = groups(doc)["310/430199/11"]
    assert Decimal(str(status["paid"])) == due and Decimal(str(status["outstanding"])) == 0
    [entered] = [h for h in doc["history"] if h["event"] == "paid"]
    assert entered["by"].startswith("uid ") and entered["note"] == "工商银行到账通知 0001"
    twice = world.cli("clearing", "paid", "--month", MONTH, "--group", "310/430199/11", "--amount", str(due),
                      "--note", "工商银行到账通知 0001")  # the same notice entered again
    assert twice.returncode != 0 and "entered already" in twice.stderr
    assert Decimal(str(groups(clearing(world, "status")[1])["310/430199/11"]["paid"])) == due
    assert world.cli("clearing", "cancel", "--month", MONTH, "--group", "390/430199/11").returncode == 0
    cancelled = world.cli("clearing", "paid", "--month", MONTH, "--group", "390/430199/11", "--amount", "1.00",
                          "--note", "工商银行到账通知 0002")  # a notice for an application no longer in force
    assert cancelled.returncode != 0 and "is cancelled" in cancelled.stderr

    table = world.cli("clearing", "status", "--month", MONTH).stdout
    assert "异地门诊" in table and "超限价" in table and table.splitlines()[-1].startswith("合计")
    csv = world.cli("clearing", "status", "--month", MONTH, "--format", "csv").stdout.splitlines()
    assert csv[0].startswith("险种类别,结算经办机构,清算类别,结算笔数,申请金额") and csv[-1].startswith("合计,")


def test_a_day_that_did_not_balance_keeps_its_groups_from_being_applied_for(month: dict[str, dict],
                                                                             world: World) -> None:
    for day in DAYS:
        assert world.cli("reconcile", "--date", day).returncode == 0, day
    world.forget(month["qian"]["setl_id"])  # the bureau lost one: that day no longer balances for its group
    assert world.cli("reconcile", "--date", DAYS[-1]).returncode == 1
    code, doc = clearing(world, "apply")
    assert code == 1
    held = groups(doc)["390/439900/99963"]
    assert held["result"] == "not applied" and held["days"] == [f"{DAYS[-1]} (不平)"]
    assert groups(doc)["310/430199/11"]["result"] == "applied"  # the others go


def test_a_settlement_after_the_day_was_reconciled_keeps_its_group_from_being_applied_for(
        month: dict[str, dict], world: World) -> None:
    for day in DAYS:
        assert world.cli("reconcile", "--date", day).returncode == 0, day
    settled_visit(world, ZHANG)  # the journal now holds more than what balanced
    world.backdate_settlements(LAST_DAY)
    held = groups(clearing(world, "apply")[1])["310/430199/11"]
    assert held["result"] == "not applied" and held["days"] == [f"{DAYS[-1]} (settlements since it was reconciled)"]
    assert world.cli("reconcile", "--date", DAYS[-1]).returncode == 0
    assert groups(clearing(world, "apply")[1])["310/430199/11"]["result"] == "applied"


def test_a_payment_is_refused_without_an_application_or_a_notice(running: World) -> None:
    settled_visit(running, ZHANG)
    no_app = running.cli("clearing", "paid", "--month", MONTH, "--group", "310/430199/11", "--amount", "10.00",
                         "--note", "n")
    assert no_app.returncode != 0 and "apply first" in no_app.stderr
    bad = running.cli("clearing", "paid", "--month", MONTH, "--group", "310/430199/11", "--amount", "1e3",
                      "--note", "n")
    assert bad.returncode != 0 and "amount" in bad.stderr
    assert running.cli("clearing", "status", "--month", "2026-13").returncode != 0


def test_a_month_that_is_not_over_is_neither_applied_for_nor_confirmed(running: World) -> None:
    """The days still to come cannot have balanced: fep names the month's last day and sends neither 3203
    nor 3261, however the days so far reconcile and the 异地 detail compares."""
    settled_visit(running, QIAN)
    this_month = date.today().strftime("%Y-%m")
    for d in range(1, date.today().day + 1):
        assert running.cli("reconcile", "--date", date.today().replace(day=d).isoformat()).returncode == 0
    last = (date.today().replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
    for what in ("apply", "remote"):
        run = running.cli("clearing", what, "--month", this_month, "--json")
        doc = json.loads(run.stdout)
        why = doc["groups"][0]["why"] if what == "apply" else doc["why"]
        assert run.returncode == 1 and f"ends on {last}" in why, doc
    assert not {"3203", "3261"} & {infno for _, infno in running.sim_answers()}
