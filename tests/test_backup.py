"""The journal is backed up while fep runs, and a backup restores: the story of a hospital whose journal disk died.

README, "Backups and restore": stop fep, copy the backup into place, start fep."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from contextlib import closing
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from fep import archive, config
from fep.sim.world import LI, ZHANG, Visit, World, reversed_settlement, settled_visit, wait_for
from tests.test_units import write


def restore(world: World, backup: Path) -> None:
    """What the README tells the operator: stop fep, copy the backup into place (the old WAL goes), start."""
    world.stop()
    for leftover in ("-wal", "-shm"):
        Path(f"{world.journal_path}{leftover}").unlink(missing_ok=True)
    shutil.copy(backup, world.journal_path)
    world.start()


def test_a_backup_taken_while_trades_flow_restores_with_every_trade(running: World) -> None:
    world = running
    settled_visit(world, ZHANG)
    visit = Visit(world.his, LI)
    visit.up_to_settlement()
    reversed_settlement(world, visit)
    stop, flowing = threading.Event(), []

    def flow() -> None:  # the HIS goes on while the copy is made
        while not stop.is_set():
            flowing.append(Visit(world.his, LI).identify()["fep_msgid"])

    his = threading.Thread(target=flow)
    his.start()
    wait_for(lambda: len(flowing) >= 3, what="trades to flow")
    before = {r["msgid"]: r for r in world.journal()}
    (world.dir / "backups").mkdir()
    done = world.cli("backup", str(world.dir / "backups"))
    stop.set()
    his.join()
    assert done.returncode == 0, done.stderr
    assert "PRAGMA integrity_check ok" in done.stdout, done.stdout
    [backup] = list((world.dir / "backups").iterdir())  # one file, named for when it was made
    assert backup.name.startswith(f"journal-{date.today():%Y%m%d}-") and backup.stat().st_mode & 0o777 == 0o600
    assert "journal backed up to" in world.log("run")

    again = world.cli("backup", str(backup))  # a backup is never written over
    assert again.returncode != 0 and f"{backup} exists" in again.stderr

    restore(world, backup)
    after = {r["msgid"]: r for r in world.journal()}
    assert set(before) <= set(after), f"lost in the restore: {sorted(set(before) - set(after))}"
    for msgid, row in before.items():
        if row["state"] in ("ANSWERED", "REVERSED", "NOT_NEEDED"):
            assert (after[msgid]["state"], after[msgid]["answer"]) == (row["state"], row["answer"])
    for msgid in list(before)[:5]:
        assert world.cli("show", msgid).returncode == 0
    # fep goes on from the copy: a new trade gets a number never used before.
    answer = Visit(world.his, ZHANG).identify()
    assert answer["infcode"] == 0 and answer["fep_msgid"] not in after


def test_a_daily_backup_missed_while_fep_was_down_runs_when_it_is_back_and_only_the_newest_are_kept(
        world: World) -> None:
    backups = world.dir / "backups"
    a_minute_ago = (datetime.now() - timedelta(minutes=1)).strftime("%H:%M")
    world.configure(fep={"backup": {"dir": str(backups), "keep": 2, "daily_at": a_minute_ago}})
    world.start()

    def noted() -> bool:  # the schedule keeps the day it starts counting from
        with closing(sqlite3.connect(world.journal_path)) as c:
            return c.execute("SELECT 1 FROM runs WHERE kind='daily' AND key='backup'").fetchone() is not None
    wait_for(noted, what="the schedule to note its first day")
    assert not backups.exists()  # installed after today's time: nothing was missed yet
    world.stop()
    # fep was down three days: the journal says the daily backup last ran then.
    three_days_ago = (date.today() - timedelta(days=3)).isoformat()
    with closing(sqlite3.connect(world.journal_path)) as c, c:
        c.execute("UPDATE runs SET doc=? WHERE kind='daily' AND key='backup'", (json.dumps({"day": three_days_ago}),))
    backups.mkdir()
    for old in ("journal-20260101-013000.db", "journal-20260102-013000.db"):
        shutil.copy(world.journal_path, backups / old)
    with closing(sqlite3.connect(world.journal_path.with_name("journal-2025-03.db"))) as c, c:  # a month archived
        for statement in archive._SCHEMA:
            c.execute(statement)

    world.start()
    wait_for(lambda: "daily backup done" in world.log("run"), what="the missed backup to run")
    assert "old backups removed" in world.log("run")
    kept = sorted(p.name for p in backups.iterdir())
    assert kept[0] == "journal-2025-03.db"  # the archive files are copied too, under their own names
    assert kept[1] == "journal-20260102-013000.db" and kept[2].startswith(f"journal-{date.today():%Y%m%d}-"), kept
    assert f"daily backup (at {a_minute_ago}) did not run for" in world.log("run")
    with closing(sqlite3.connect(backups / kept[2])) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("change, message", [
    ({"backup.keep": 0}, "backup.keep must be a whole number of at least 1, got 0"),
    ({"backup.daily_at": "1:30"}, "backup.daily_at must be a time of day HH:MM"),
    ({"backup": {"daily_at": "01:30"}}, "backup.daily_at is set but backup.dir is not"),
    ({"journal.keep_days": "a year"}, "journal.keep_days must be a whole number, got 'a year'"),
    ({"journal.keep_days": 0}, "journal.keep_days must be a whole number of at least 1, got 0"),
    ({"journal": {"path": "j.db", "archive_daily_at": "04:00"}}, "journal.archive_daily_at is set but journal.keep_days"),
])
def test_a_bad_backup_or_keeping_setting_is_refused_naming_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(write(tmp_path, change))
