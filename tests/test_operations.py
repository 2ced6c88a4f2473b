"""fep run like the other daemons the IT department trusts: systemd, Prometheus, the admin CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from fep.sim.world import ROOT, ZHANG, Visit, World, parked_settlement, reversed_settlement, wait_for


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "fep.service").read_text()
    fep = Path(sys.executable).parent / "fep"
    (tmp_path / "fep.service").write_text(unit.replace("/opt/fep/bin/fep", str(fep)))
    run = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "fep.service")], capture_output=True, text=True)
    problems = [l for l in (run.stdout + run.stderr).splitlines() if "fep.service" in l]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=fep", "StateDirectory=fep",
                    "RuntimeDirectory=fep", "ConfigurationDirectory=fep", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "CapabilityBoundingSet=", "RestrictAddressFamilies=", "SystemCallFilter="):
        assert setting in unit


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed")
def test_the_example_alert_rules_are_valid() -> None:
    run = subprocess.run(["promtool", "check", "rules", str(ROOT / "conf" / "alerts.yml")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr


class NotifySocket:
    """What systemd listens on: fep's READY=1, WATCHDOG=1, RELOADING=1 arrive here."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            if text in self.messages[-1]:
                return
        raise AssertionError(f"no {text!r} from fep; got {self.messages}")


def test_fep_tells_systemd_it_is_ready_feeds_the_watchdog_and_reloads(world: World, monkeypatch) -> None:
    notify = NotifySocket(world.dir / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(world.dir / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    world.start_sim()
    world.start_fep(wait=False)
    notify.wait_for("READY=1")
    # Ready means recovered and listening: the HIS can be served at once.
    assert Visit(world.his, ZHANG).identify()["infcode"] == 0
    notify.wait_for("WATCHDOG=1")
    notify.wait_for("WATCHDOG=1")

    # systemctl reload: new certificates take effect without a restart (here: a foreign one, refused),
    # and a settlement at the bureau at that moment finishes on its connection.
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    world.fault(mode="late", infno="2207", seconds=1.5, times=1)
    in_flight: list[dict] = []
    settling = threading.Thread(target=lambda: in_flight.append(visit.settle()))
    settling.start()
    wait_for(lambda: world.journal("infno='2207'"), what="the 2207 to be at the bureau")
    world.configure(fep={"bureau": {"tls": {"cert": str(world.pki / "foreign-hospital.pem"),
                                            "key": str(world.pki / "foreign-hospital.key")}}})
    world.fep.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    notify.wait_for("READY=1")
    settling.join()
    assert in_flight[0]["infcode"] == 0 and in_flight[0]["fep_state"] == "ANSWERED"
    assert Visit(world.his, ZHANG).identify()["fep_state"] == "NOT_SENT"
    world.configure()
    world.fep.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1")
    assert Visit(world.his, ZHANG).identify()["infcode"] == 0

    # An invalid config is refused with a clear log line; the running one stays.
    world.fep_config.write_text("institution: [not, a, mapping")
    world.fep.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused, the running configuration stays" in world.log("run"), what="the refusal")
    assert Visit(world.his, ZHANG).identify()["infcode"] == 0
    assert "not valid YAML" in world.log("run")


def test_prometheus_metrics(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    assert visit.settle()["infcode"] == 0
    time.sleep(5.5)  # the journal gauges refresh every 5 s
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    for needle in ('fep_trades_total{infno="2207",result="success"} 1.0', 'fep_trade_seconds_bucket{infno="2207",le="0.0005"}',
                   'fep_bureau_seconds_bucket', 'fep_bureau_link_up{endpoint="sim"} 1.0', "fep_bureau_signed_in 1.0",
                   'fep_trades_in_state{state="ANSWERED"}', "fep_replay_queue_depth 0.0",
                   'fep_certificate_expiry_seconds{cert="hospital"}', "fep_journal_commit_seconds_bucket",
                   "fep_journal_batch_size_bucket", "fep_unknown_oldest_seconds 0.0"):
        assert needle in text, needle
    assert ZHANG["psn_no"] not in text and ZHANG["certno"] not in text


def test_the_admin_cli_shows_status_trades_and_the_whole_life_of_a_trade(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    answer = reversed_settlement(running, visit)

    status = json.loads(running.cli("status", "--json").stdout)
    assert status["signed_in"] and status["endpoints"][0]["up"] and status["needs_attention"] == []
    assert status["journal_keys"].startswith("read:")  # new keys are spared their lookup
    human = running.cli("status").stdout
    assert "signed in: yes" in human and "certificates: hospital expires in" in human
    assert "journal keys: read" in human

    rows = json.loads(running.cli("trades", "--state", "REVERSED", "--json").stdout)
    assert [r["msgid"] for r in rows] == [answer["fep_msgid"]]
    listing = running.cli("trades", "--person", ZHANG["psn_no"], "--infno", "2207").stdout
    assert answer["fep_msgid"] in listing and listing.splitlines()[0].split()[:4] == ["created", "msgid", "infno", "state"]

    show = running.cli("show", answer["fep_msgid"]).stdout
    for event in ("accept", "lost", "resolve", "undone"):
        assert event in show
    assert answer["fep_resolver"] in show and "2601" in show
    assert running.cli("show", "H00000000000000000000000000000").returncode != 0


def test_a_parked_reversal_is_sent_again_by_fep_replay(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    answer = parked_settlement(running, visit)
    assert [a["msgid"] for a in json.loads(running.cli("status", "--json").stdout)["needs_attention"]] == [
        answer["fep_msgid"]]
    replayed = running.cli("replay", answer["fep_msgid"])
    assert replayed.returncode == 0, replayed.stderr
    wait_for(lambda: running.trade(answer["fep_msgid"])["state"] == "REVERSED", what="the reversal")
    running.assert_ledgers_agree()


def test_fep_reverse_undoes_a_settlement_made_behind_fep_s_back(running: World) -> None:
    """An operator settled at the bureau directly (单边账: the bureau has it, the journal does not)."""
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    rogue = "H43010000001" + time.strftime("%Y%m%d%H%M%S") + "9999"
    assert running.bypass("2207", rogue, visit.settlement_input())["infcode"] == 0
    assert [s["msgid"] for s in running.ledger()] == [rogue]
    refused = running.cli("reverse", rogue)
    assert refused.returncode != 0 and "give its trade number and psn_no" in refused.stderr
    done = running.cli("reverse", rogue, "--infno", "2207", "--person", ZHANG["psn_no"], "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["infcode"] == 0
    assert [s["state"] for s in running.ledger()] == ["reversed"]


def test_a_second_sigterm_as_a_shell_sends_after_the_service_manager_stops_fep_and_the_simulator_quietly(
        world: World) -> None:
    world.start()
    for proc in (world.fep, world.sim):
        proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # (two at once would be one: the kernel keeps one pending signal of a kind)
    for proc in (world.fep, world.sim):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in (world.fep, world.sim):  # (a signal after the main loop ended finds the default action back)
        assert proc.wait(10) in (0, -signal.SIGTERM)
    for name in ("run", "sim"):
        assert "Traceback" not in world.log(name), world.log(name)[-2000:]


def test_fep_refuses_to_run_as_root_unless_the_config_allows_it(world: World) -> None:
    if os.geteuid() != 0:
        pytest.skip("not root")
    world.configure(fep={"security": {"allow_root": False}})
    assert world.start_fep(wait=False).wait(20) == 2
    assert "fep does not run as root" in world.log("run")


def test_his_connections_from_outside_the_allowed_networks_are_closed(world: World) -> None:
    world.configure(fep={"his": {"allowed_networks": ["192.0.2.0/24"]}})
    world.start()
    with pytest.raises(OSError):
        world.his_tcp.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}})
    assert Visit(world.his, ZHANG).identify()["infcode"] == 0  # the local Unix socket is not a network
    assert "refused HIS connection from 127.0.0.1" in world.log("run")


def test_logs_carry_the_msgid_and_no_personal_numbers(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    answer = reversed_settlement(running, visit)
    log = running.log("run")
    assert answer["fep_msgid"] in log
    assert all(line[:3] in {f"<{n}>" for n in range(8)} for line in log.splitlines() if line)
    assert ZHANG["psn_no"] not in log and ZHANG["certno"] not in log


def test_the_trade_counts_shown_are_the_journal_s_own(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    reversed_settlement(running, visit)
    assert Visit(running.his, ZHANG).identify()["infcode"] == 0
    shown = json.loads(running.cli("status", "--json").stdout)["trades_by_state"]
    counted: dict[str, int] = {}
    for row in running.journal():
        counted[row["state"]] = counted.get(row["state"], 0) + 1
    assert shown == counted and shown["REVERSED"] == 1
