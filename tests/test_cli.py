"""The `fep` command as an operator meets it in the first week: it says plainly why it cannot reach fep and
what to try, names a missing or wrong config, lines up Chinese columns, writes CSV, and long work (a
reconciliation of many groups, a catalog sync) shows its progress and is never cut off by the CLI."""

from __future__ import annotations

import csv
import grp
import io
import json
import os
import re
import socket
import subprocess
import sys
from datetime import date
from pathlib import Path

from twisted.internet import defer, task

from fep import client
from fep.admin_cli import TRADE_COLUMNS, table, width
from fep.jobs import Job, progress
from fep.sim.world import ZHANG, Visit, World, reversed_settlement
from tests.test_units import write

TODAY = date.today().isoformat()


def fep(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The `fep` command with only the operator's arguments (World.cli names the world's admin socket)."""
    return subprocess.run([sys.executable, "-m", "fep.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_a_command_that_cannot_reach_fep_names_the_socket_and_what_to_try(world: World) -> None:
    stopped = world.cli("status")
    assert stopped.returncode == 3
    assert f"cannot reach fep at {world.dir / 'run' / 'admin.sock'}: there is no socket there" in stopped.stderr
    assert "try `systemctl status fep`" in stopped.stderr and "Traceback" not in stopped.stderr

    (world.dir / "run").mkdir()
    left_behind = socket.socket(socket.AF_UNIX)  # a socket file a killed fep left: nobody listens on it
    left_behind.bind(str(world.dir / "run" / "admin.sock"))
    left_behind.close()
    assert "nothing listens there; fep is not running" in world.cli("trades").stderr

    his = fep("lookup", "H430100000012026120100000001", "--url", f"http://127.0.0.1:{world.his_port}", cwd=world.dir)
    assert f"cannot reach fep at 127.0.0.1:{world.his_port}: nothing listens there" in his.stderr


def test_permission_denied_names_the_group_to_join(tmp_path: Path) -> None:
    """The socket's own group (the admin socket's is fep, the HIS socket's fep-his), or its directory's when
    the directory is what refuses (/run/fep is 0750)."""
    sock = tmp_path / "admin.sock"
    sock.touch()
    group = grp.getgrgid(os.stat(sock).st_gid).gr_name
    message = str(client.unreachable(str(sock), PermissionError(13, "Permission denied"), unix=True))
    assert message == (f"permission denied on {sock}: only root and the group {group} may use it; join it "
                       f"(sudo usermod -aG {group} $USER, then log in again)")
    (tmp_path / "fep").mkdir()
    assert f"the group {group}" in str(client.unreachable(str(tmp_path / "fep" / "admin.sock"),
                                                          PermissionError(13, "Permission denied"), unix=True))


def test_a_missing_or_wrong_config_is_named(tmp_path: Path) -> None:
    missing = fep("status", "--config", str(tmp_path / "fep.yaml"), cwd=tmp_path)
    assert missing.returncode != 0 and f"--config {tmp_path / 'fep.yaml'}: there is no such file" in missing.stderr
    assert f"cannot read config {tmp_path / 'fep.yaml'}" in fep("run", "--config", str(tmp_path / "fep.yaml"),
                                                                cwd=tmp_path).stderr
    typo = fep("status", "--config", str(write(tmp_path, {"admin.metrics_prot": 9464})), cwd=tmp_path)
    assert "admin.metrics_prot is not a known key; did you mean admin.metrics_port?" in typo.stderr
    assert "Traceback" not in typo.stderr
    checked = fep("run", "--check", "--config", str(tmp_path / "fep.yaml"), cwd=tmp_path)
    assert checked.returncode == 2 and "admin.metrics_prot is not a known key" in checked.stderr


def test_a_config_is_checked_before_a_reload_as_nginx_t_does(world: World) -> None:
    checked = fep("run", "--check", "--config", str(world.fep_config), cwd=world.dir)
    assert checked.returncode == 0 and f"the config {world.fep_config} is valid" in checked.stdout
    assert not (world.dir / "run").exists()  # nothing was started


def test_chinese_columns_line_up_by_display_width() -> None:
    rows = [{"险种类别": "310 职工基本医疗保险", "结算笔数": 3, "结果": "平"},
            {"险种类别": "390 城乡居民基本医疗保险", "结算笔数": 12, "结果": "不平"}]
    lines = table(rows, ["险种类别", "结算笔数", "结果"]).splitlines()
    starts = [[width(line[:line.rindex(cell)]) for cell in cells] for line, cells in zip(lines, (
        [" 结算笔数", " 结果"], [" 3", " 平"], [" 12", " 不平"]))]
    assert starts[0] == starts[1] == starts[2]
    assert width("医保") == 4 and width("e\u0301") == 1  # a combining accent takes no column


def test_fep_show_never_prints_infcode_none(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    lost = reversed_settlement(running, visit)  # its answer never came: the bureau's was dropped
    shown = running.cli("show", lost["fep_msgid"]).stdout
    assert "answer: none" in shown and "None" not in shown


def test_fep_trades_as_csv_and_limit_0_refused(running: World) -> None:
    for _ in range(2):
        assert Visit(running.his, ZHANG).identify()["infcode"] == 0
    rows = list(csv.reader(io.StringIO(running.cli("trades", "--format", "csv").stdout)))
    assert rows[0] == TRADE_COLUMNS
    assert [r[1] for r in rows[1:]] == [t["msgid"] for t in json.loads(running.cli("trades", "--json").stdout)]
    assert len(rows) >= 3

    refused = running.cli("trades", "--limit", "0")
    assert refused.returncode == 2 and "--limit: must be 1 or more, got 0" in refused.stderr
    assert "limit must be from 1 to 100000, got 100001" in running.cli("trades", "--limit", "100001").stderr
    assert len(json.loads(running.cli("trades", "--limit", "1", "--format", "json").stdout)) == 1


def test_a_reconciliation_that_outlasts_the_cli_s_timeout_goes_on_and_is_followed(running: World) -> None:
    running.fault(mode="slow", infno="3201", seconds=3, times=2)  # a busy bureau: each group takes a while
    first = running.cli("reconcile", "--date", TODAY, "--timeout", "1")
    assert first.returncode == 4, first.stdout + first.stderr
    assert f"reconciling {TODAY}: group 1 of 2" in first.stderr  # the progress line
    assert "the work goes on in fep as job 1 (POST /reconcile" in first.stderr
    assert "follow it with `fep job 1`" in first.stderr

    followed = running.cli("job", "1")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "job 1: POST /reconcile finished" in followed.stdout and "结算笔数" in followed.stdout
    assert json.loads(running.cli("job", "--json").stdout)[0]["state"] == "finished"
    assert json.loads(running.cli("reconcile", "--date", TODAY, "--show", "--json").stdout)["balanced"] == 2
    assert "no job 7" in running.cli("job", "7").stderr


def test_a_long_catalog_sync_shows_its_progress_and_finishes(running: World) -> None:
    running.fault(mode="slow", infno="1301", seconds=7, times=1)
    sync = running.cli("catalog", "sync")
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert re.search(r"catalog sync 1 of \d+: 1301", sync.stderr), sync.stderr
    assert "1301: version v0000 -> 3, 5 row(s)" in sync.stdout  # the first download asks from v0000, as the spec says


def test_two_operators_following_one_job_both_hear_its_end_and_a_timeout_only_ends_the_wait() -> None:
    clock, bureau = task.Clock(), defer.Deferred()

    async def reconciliation() -> tuple[int, dict]:
        progress("group 1 of 1")
        await bureau
        return 200, {"balanced": 1}

    job = Job("POST /reconcile")
    job.run(reconciliation)
    progress("said outside any job")  # the daily schedule's run: nobody to tell
    assert job.progress == "group 1 of 1"
    heard: list[bool] = []
    for wait in (5, 60, 60):
        defer.ensureDeferred(job.wait(clock, wait)).addCallback(heard.append)
    clock.advance(5)
    assert heard == [False] and job.finished is None  # the first one's wait ended, not the work
    bureau.callback(None)
    assert heard == [False, True, True] and (job.status, job.result) == (200, {"balanced": 1})
