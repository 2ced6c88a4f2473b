"""Breaker 17: "one trade per HIS msgid" after fep stopped looking up a key its Bloom filter calls new (331e6e0),
tried from outside as an HIS and as the bureau's ledger would check it. What broke: keys that enter the journal's
archive other than through its writer's accept (an earlier release's month file taken into PostgreSQL's
archive tables after the leader read its filter) are called new. Each story compares what the HIS heard, the
journal and the bureau's ledger. What held (resends while the keys are read and after, at a takeover, under
fep's own msgids, odd keys, a journal whose keys cannot be read) is in the commit that added this file."""

from __future__ import annotations

from typing import Any

from fep.sim.world import Visit, World, said, wait_for
from tests.test_archive import AGE, age
from tests.test_breaker22 import not_settled_again, reversed_under_its_key
from tests.test_breaker23 import left_in_a_monthly_file


def family(world: World, msgid: str) -> list[str]:
    """The trade and its resolving trades (a 2601 that reversed it), as they move to the archive together."""
    return [r["msgid"] for r in world.journal("msgid = ? OR related = ?", (msgid, msgid))]


def taken_in_after_the_lead(world: World, msgids: list[str]) -> None:
    """The trades, moved by an earlier release into a month's file beside node a's journal.path that was on the
    backup disk at the upgrade: fep started, the file restored there once node a leads, and taken into
    archived_trades by `fep archive` (its run takes in a file restored beside journal.path since the start)."""
    beside = world.local_file("a").with_name(left_in_a_monthly_file(world, msgids))
    aside = world.dir / beside.name
    beside.rename(aside)
    world.start()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    aside.rename(beside)
    run = world.cli("archive", "--json")
    assert run.returncode == 0 and beside.name in run.stdout, run.stdout + run.stderr


def settled_once_after_sending_again(world: World, visit: Visit, key: str, first: dict[str, Any]) -> None:
    """`fep show` finds the archived settlement; the HIS's retry job sends it again under its key: the journal
    takes no new trade under it, and the bureau holds no second settlement."""
    shown = world.cli("show", first["fep_msgid"])
    assert "archived: read from" in shown.stdout, shown.stdout + shown.stderr
    again = visit.settle(msgid=key)
    under_key = [(r["msgid"], r["state"]) for r in world.journal("his_msgid = ?", (key,))]
    assert not under_key, f"HIS heard {said(again)}; journal holds {under_key} under {key}; bureau " \
                          f"{[(s['msgid'], s['state']) for s in world.ledger()]}"
    not_settled_again(world, again, first)


# ---- what broke ---------------------------------------------------------------------------------------------------

def test_on_postgresql_a_settlement_in_a_monthly_file_restored_after_the_start_is_not_settled_again(
        world: World, pg_url: str) -> None:
    """A pair on PostgreSQL ran a release before the archive tables: its nightly run moved Zhang's reversed
    settlement (the HIS's uuid key; fep reversed it when its answer was lost) into the month's file beside node
    a's journal.path. At the upgrade the file was on the backup disk, not beside journal.path; the operator
    restores it there once node a leads, and tonight's archive run takes it into archived_trades (the run's
    "a file restored beside journal.path since the start"). Then the HIS's retry job sends the settlement again
    under its key. fep show finds it; the HIS must hear that trade, or a refusal. Today the keys the run takes
    in never reach the leader's filter, read at its takeover: it calls the key new, looks nothing up, and the
    journal's own check searches the journal's table only. Zhang is settled again: a second settlement live at
    the bureau under one HIS msgid."""
    world.share_journal(pg_url)
    visit, key, first = reversed_under_its_key(world)
    world.stop()
    age(world, AGE)
    taken_in_after_the_lead(world, family(world, first["fep_msgid"]))
    settled_once_after_sending_again(world, visit, key, first)


def test_on_postgresql_a_settlement_in_a_monthly_file_the_standby_takes_in_at_its_start_is_not_settled_again(
        world: World, pg_url: str) -> None:
    """A pair on PostgreSQL ran a release before the archive tables; in the month node b led, its nightly run
    moved Zhang's reversed settlement (the HIS's uuid key) into the month's file beside node b's journal.path.
    The pair is upgraded one node at a time: node a first, which leads, then node b, which takes its file into
    archived_trades as it starts ("before any trade") and stands by. The HIS's retry job then sends the
    settlement again under its key, to the leader. Today node a's filter was read when it took over, before
    node b's start added the file's keys: node a calls the key new, looks nothing up, and Zhang is settled
    again, a second settlement live at the bureau under one HIS msgid."""
    world.share_journal(pg_url)
    visit, key, first = reversed_under_its_key(world)
    world.stop()
    age(world, AGE)
    on_a_file = left_in_a_monthly_file(world, family(world, first["fep_msgid"]))
    on_a = world.local_file("a").with_name(on_a_file)
    on_b = world.local_file("b").with_name(on_a.name)
    on_b.parent.mkdir(parents=True, exist_ok=True)
    on_a.rename(on_b)  # node b led that month: the file is beside its journal.path
    world.start()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    world.start_peer()
    world.wait_for_standby("b")
    assert on_b.with_name(f"{on_b.name}.in-postgresql").exists()  # taken in by node b's start
    settled_once_after_sending_again(world, visit, key, first)
