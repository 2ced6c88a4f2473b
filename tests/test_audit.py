"""Who did what: every operator action through the admin socket is kept with the caller's uid and its arguments,
and the log tells the events an operator looks for, one line each, with the msgid."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from datetime import date, timedelta

from fep.sim.world import ZHANG, Visit, World, reversed_settlement, wait_for


def audit(world: World, *args: str) -> list[dict]:
    done = world.cli("audit", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_operator_actions_are_journalled_and_logged_with_the_caller_s_uid_and_arguments(running: World) -> None:
    world = running
    Visit(world.his, ZHANG).identify()
    assert world.cli("status").returncode == 0  # a look changes nothing: not kept
    assert world.cli("reload").returncode == 0
    refused = world.cli("drop", "H43010000001202611230930000001", "--reason", "duplicate of the HIS's retry")
    assert refused.returncode != 0
    assert world.cli("backup", str(world.dir / "copy.db")).returncode == 0

    entries = audit(world)
    assert [e["action"] for e in entries] == ["reload", "drop", "backup"]
    assert {e["uid"] for e in entries} == {os.getuid()}
    drop = entries[1]
    assert drop["args"] == {"msgid": "H43010000001202611230930000001", "reason": "duplicate of the HIS's retry"}
    assert drop["result"].startswith("refused (404)")
    assert entries[2]["args"] == {"path": str(world.dir / "copy.db")} and entries[2]["result"] == "ok"
    log = world.log("run")
    assert re.search(rf"audit: uid {os.getuid()} \(\S+\) drop .*H43010000001202611230930000001.*: refused \(404\)", log)

    # Kept across a restart, and asked by date.
    world.stop()
    world.start()
    assert len(audit(world, "--since", date.today().isoformat())) == 3
    assert audit(world, "--until", (date.today() - timedelta(days=1)).isoformat()) == []
    table = world.cli("audit")
    assert table.returncode == 0 and "reload" in table.stdout and str(os.getuid()) in table.stdout


def test_the_link_going_down_and_up_and_a_resolution_ending_are_one_line_each_and_a_scrape_is_none(
        running: World) -> None:
    world = running
    visit = Visit(world.his, ZHANG)
    with world.outage():
        visit.identify()  # not sent: the bureau cannot be reached
        wait_for(lambda: "bureau link sim down" in world.log("run"), what="the link down line")
    wait_for(lambda: visit.identify()["infcode"] == 0, what="the bureau to answer again")
    assert "bureau link sim up" in world.log("run").split("bureau link sim down")[-1]

    visit.up_to_settlement()
    answer = reversed_settlement(world, visit)
    msgid = answer["fep_msgid"]
    wait_for(lambda: f"{msgid}: resolution ended REVERSED" in world.log("run"), what="the resolution's line")
    assert len([line for line in world.log("run").splitlines() if f"2207 {msgid}: resolution ended" in line]) == 1

    before = world.log("run")
    for _ in range(3):
        urllib.request.urlopen(f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10).read()
    assert "metrics" not in world.log("run")[len(before):]
