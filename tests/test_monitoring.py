"""fep watched as the IT department watches its other daemons: a version, a Nagios/Zabbix check, Prometheus
alerts and a Grafana dashboard that all read what fep really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from fep import health
from fep.sim.world import ROOT, ZHANG, Visit, World, parked_settlement, wait_for

DASHBOARD = ROOT / "conf" / "grafana" / "fep.json"


def scrape(world: World) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10).read().decode()


def check(world: World) -> subprocess.CompletedProcess[str]:
    return world.cli("status", "--check")


def test_fep_tells_its_version_and_exports_it() -> None:
    run = subprocess.run([sys.executable, "-m", "fep.cli", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"fep {version('fep')}"


def test_the_trade_counter_tells_success_from_a_refusal_and_from_a_transport_failure(running: World) -> None:
    assert Visit(running.his, ZHANG).identify()["infcode"] == 0
    running.fault(mode="error", infno="1101", message="人员信息不存在", times=1)
    assert Visit(running.his, ZHANG).identify()["fep_state"] == "ANSWERED"
    with running.outage():
        assert Visit(running.his, ZHANG).identify()["fep_state"] == "NOT_SENT"
    text = scrape(running)
    for result in ("success", "refused", "transport_failure"):
        assert f'fep_trades_total{{infno="1101",result="{result}"}} 1.0' in text, result
    assert f'fep_build_info{{python="{sys.version.split()[0]}",version="{version("fep")}"}} 1.0' in text


def test_status_check_says_ok_warning_or_critical_in_one_line(running: World) -> None:
    ok = check(running)
    assert ok.returncode == 0 and ok.stdout.startswith("FEP OK - bureau link up, signed in"), ok.stdout
    assert len(ok.stdout.splitlines()) == 1

    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    parked_settlement(running, visit)
    warning = check(running)
    assert warning.returncode == 1 and warning.stdout.startswith("FEP WARNING - 1 trade(s) need attention"), \
        warning.stdout

    with running.outage():
        Visit(running.his, ZHANG).identify()
        critical = check(running)
    assert critical.returncode == 2 and critical.stdout.startswith("FEP CRITICAL - bureau link down"), critical.stdout
    assert "1 trade(s) need attention" in critical.stdout

    running.stop()
    down = check(running)
    assert down.returncode == 2 and down.stdout.startswith("FEP CRITICAL - cannot reach fep"), down.stdout


def _status(**changes: Any) -> dict[str, Any]:
    """An admin status with nothing wrong, then the changes."""
    doc = {"endpoints": [{"name": "primary", "up": True}], "signed_in": True, "journal_cannot_write": False,
           "queued": 0, "oldest_queued_seconds": None, "oldest_unresolved_seconds": None, "needs_attention": [],
           "certificates": {"hospital": 200 * 86400}, "reconcile_daily_at": "02:30", "up_seconds": 3 * 86400,
           "last_reconciliation": {"stmt_date": "2026-11-30", "run_at": "2026-12-01 02:30:05", "balanced": 2,
                                   "unbalanced": 0, "unresolved": 0}}
    doc.update(changes)
    return doc


MORNING = datetime(2026, 12, 1, 9, 0)


@pytest.mark.parametrize("status, level, line", [
    (_status(), "OK", "bureau link up, signed in, 0 queued, 0 need attention, 2026-11-30 reconciled"),
    (_status(journal_cannot_write=True), "CRITICAL", "the journal cannot write"),
    (_status(endpoints=[{"name": "primary", "up": False}, {"name": "backup", "up": True}]), "WARNING",
     "bureau endpoint primary down"),
    (_status(signed_in=False), "WARNING", "not signed in (9001)"),
    (_status(oldest_unresolved_seconds=300), "WARNING", "a trade's outcome unknown for 300 s"),
    (_status(oldest_unresolved_seconds=900), "CRITICAL", "a trade's outcome unknown for 900 s"),
    (_status(queued=12, oldest_queued_seconds=3600), "WARNING", "12 queued for the bureau, oldest 3600 s"),
    (_status(certificates={"hospital": 20 * 86400}), "WARNING", "certificate hospital expires in 20 days"),
    (_status(certificates={"hospital": -5}), "CRITICAL", "certificate hospital expired"),
    (_status(last_reconciliation={"stmt_date": "2026-11-30", "run_at": "2026-12-01 02:30:05", "balanced": 1,
                                  "unbalanced": 1, "unresolved": 2}), "WARNING",
     "reconciliation of 2026-11-30: 1 group(s) not balanced, 2 trade(s) unresolved"),
    (_status(last_reconciliation={"stmt_date": "2026-11-28", "run_at": "2026-11-29 02:30:05", "balanced": 2,
                                  "unbalanced": 0, "unresolved": 0}), "WARNING",
     "no reconciliation since 2026-11-29 02:30:05"),
    (_status(last_reconciliation=None), "WARNING", "no reconciliation has run"),
    (_status(last_reconciliation=None, up_seconds=3600), "OK", "bureau link up"),  # a new install: a day to run
    (_status(last_reconciliation=None, reconcile_daily_at=None), "OK", "bureau link up"),  # not scheduled here
    # A pair's standby neither signs in nor talks to the bureau: it is judged on knowing a leader.
    (_status(role="standby", leader="fep-a 10.0.0.11:8080", signed_in=False,
             endpoints=[{"name": "primary", "up": None}]), "OK", "standby, the leader is fep-a 10.0.0.11:8080"),
    (_status(role="standby", leader=None, signed_in=False), "WARNING", "standing by, no node leads yet"),
    (_status(role="standby", leader=None, signed_in=False, standby_note="the journal is of schema 8, newer"),
     "WARNING", "standing by, no leader known; this node does not lead: the journal is of schema 8, newer"),
])
def test_what_the_check_calls_a_warning_and_what_critical(status: dict[str, Any], level: str, line: str) -> None:
    verdict = health.check(status, MORNING)
    assert verdict.level.name == level
    assert verdict.line(health.summary(status)).startswith(f"FEP {level} - {line}")


def test_a_restarted_fep_still_exports_when_it_last_reconciled(running: World) -> None:
    assert 'fep_reconciliation_groups{result="unbalanced"} 0.0' in scrape(running)
    assert "fep_reconciliation_last_run_timestamp_seconds 0.0" in scrape(running)
    day = (datetime.now() - timedelta(days=1)).date().isoformat()
    reconciled = running.cli("reconcile", "--date", day)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    running.stop()
    running.start_fep()
    wait_for(lambda: "fep_reconciliation_last_run_timestamp_seconds 0.0" not in scrape(running),
             what="the last run read back from the journal")
    text = scrape(running)
    last = float(re.search(r"^fep_reconciliation_last_run_timestamp_seconds (\S+)$", text, re.M)[1])
    assert datetime.now() - datetime.fromtimestamp(last) < timedelta(minutes=5)
    assert "fep_reconciliation_scheduled 1.0" in text


def alert_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "conf" / "alerts.yml").read_text(encoding="utf-8"))
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed")
def test_an_alert_fires_when_the_daily_reconciliation_did_not_run(tmp_path: Path) -> None:
    """promtool's rule unit test, 60 hours in: the last run was 28 hours ago on a fep up all along, and on one
    restarted an hour ago; it was 2 hours ago; and a new install, up an hour, has not had its first night."""
    hour = 3600
    boxes = {"late": (28 * hour, 0), "restarted": (28 * hour, 59 * hour), "fine": (58 * hour, 0),
             "new": (None, 59 * hour)}
    series = []
    for box, (last_run, started) in boxes.items():
        labels = f'{{instance="{box}",job="fep"}}'
        series += [{"series": f"fep_reconciliation_scheduled{labels}", "values": "1x60"},
                   {"series": f"fep_reconciliation_last_run_timestamp_seconds{labels}", "values": f"{last_run or 0}x60"},
                   {"series": f"process_start_time_seconds{labels}", "values": f"{started}x60"}]
    rule = alert_rules()["FepReconciliationNotRun"]
    fired = [{"exp_labels": {**rule["labels"], "instance": box, "job": "fep"}, "exp_annotations": rule["annotations"]}
             for box in ("late", "restarted")]
    tests = {"rule_files": [str(ROOT / "conf" / "alerts.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1h", "input_series": series,
        "alert_rule_test": [{"eval_time": "60h", "alertname": "FepReconciliationNotRun", "exp_alerts": fired}]}]}
    (tmp_path / "alerts_test.yml").write_text(json.dumps(tests, ensure_ascii=False))
    run = subprocess.run(["promtool", "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def dashboard_series() -> set[str]:
    """Every metric name the dashboard's queries read (PromQL functions and label names are not metrics)."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)          # label matchers
        expr = re.sub(r"\[[^\]]*\]", "", expr)         # range selectors
        expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
        names |= {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if n.startswith(("fep_", "process_"))}
    return names


def test_every_series_on_the_dashboard_is_exported_by_fep(running: World) -> None:
    Visit(running.his, ZHANG).identify()
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", scrape(running), re.M))
    names = {n for n, _ in exported}
    # A counter `x` is scraped as x_total, a histogram `h` as h_bucket, h_sum, h_count.
    names |= {f"{n}_{s}" for n, kind in exported for s in {"counter": ["total"], "histogram": ["bucket", "sum",
                                                                                                  "count"]}.get(kind, [])}
    missing = dashboard_series() - names
    assert not missing, f"the dashboard reads series fep does not export: {sorted(missing)}"


def test_the_dashboard_shows_what_the_alerts_watch() -> None:
    watched = {n for r in alert_rules().values() for n in re.findall(r"\bfep_[a-z_]+", r["expr"])}
    assert watched and not watched - dashboard_series(), sorted(watched - dashboard_series())
