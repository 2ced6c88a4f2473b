"""The insurance office's console: a person signs in and reads the day, the month, what needs a person and a trade's
life in a real browser (Debian's headless Chromium), against a running fep and the bureau simulator."""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import subprocess
import sys
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.web.resource import Resource

from fep import config, health, logs
from fep.console.pages import attention, month_attention
from fep.console.server import OfficeSite
from fep.reconcile import HEADERS
from fep.sim.world import LI, ZHANG, Visit, World, free_port, parked_settlement
from tests.browser import MISSING, Browser
from tests.test_reconcile import TODAY, reconcile, settled

PASSWORD = "office-password-1"
OFFICE, OPERATOR = "wang", "li.ops"


def user(world: World, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    """`fep user ...` as the administrator runs it, the password given on stdin."""
    return subprocess.run([sys.executable, "-m", "fep.cli", "user", *args, "--config", str(world.fep_config)],
                          input=password + "\n", capture_output=True, text=True, timeout=60, cwd=world.dir)


def with_console(world: World, **settings: object) -> World:
    world.configure(fep={"console": {"port": free_port(), "users": str(world.dir / "conf" / "console-users"),
                                     **settings}})
    world.start()
    for name, role in ((OFFICE, "office"), (OPERATOR, "operator")):
        made = user(world, "add", name, "--role", role)
        assert made.returncode == 0, made.stderr
    return world


@pytest.fixture
def console(world: World) -> World:
    if MISSING:
        pytest.skip(MISSING)
    return with_console(world)


@pytest.fixture
def browser(console: World, tmp_path: Path) -> Iterator[Browser]:
    port = config.load(console.fep_config).console.port
    b = Browser(f"http://127.0.0.1:{port}", tmp_path / "screenshots")
    try:
        yield b
    finally:
        b.close()


def audit(world: World) -> list[dict]:
    return json.loads(world.cli("audit", "--json").stdout)


def test_every_page_needs_a_sign_in_and_a_wrong_password_is_refused(console: World, browser: Browser) -> None:
    browser.open(f"/day?date={TODAY}")
    assert browser.path.startswith("/signin?next=") and browser.text("h1") == "Sign in"
    browser.shot("signin")
    browser.sign_in(OFFICE, "not-the-password")
    assert browser.text("#message") == "Wrong name or password." and browser.path.startswith("/signin")
    browser.sign_in(OFFICE, PASSWORD)
    assert browser.path == f"/day?date={TODAY}" and browser.text("#who") == f"{OFFICE} (office)"
    # The session cookie is not for scripts, nor sent from another site's page.
    cookie = next(c for c in browser.driver.get_cookies() if c["name"] == "fep_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # A form posted from elsewhere, without the sign-in page's token, signs no one in.
    status, _, body = browser.fetch("/signin", {"name": OFFICE, "password": PASSWORD})
    assert status == 403 and "open /signin again" in body.decode()
    assert browser.fetch("/")[0] == 200 and browser.fetch("/nothing")[0] == 404

    seen = [e for e in audit(console) if e["action"].startswith("console")]
    assert [(e["user"], e["action"], e["result"]) for e in seen[:2]] == [
        (f"console:{OFFICE}", "console sign-in", "refused: wrong name or password"),
        (f"console:{OFFICE}", "console sign-in", "ok")]
    assert {"page": "day", "date": TODAY, "console_user": OFFICE} in [e["args"] for e in seen]
    browser.sign_out()
    browser.open("/")
    assert browser.path.startswith("/signin")
    # Someone guessing: after five wrong passwords the name is refused, even with the right one.
    for _ in range(5):
        browser.sign_in(OPERATOR, "a-guess-at-it")
    browser.sign_in(OPERATOR, PASSWORD)
    assert browser.text("#message").startswith(f"Too many wrong passwords for {OPERATOR}")


def test_the_office_reads_the_day_as_figure_1_and_downloads_what_fep_reconcile_prints(console: World,
                                                                                       browser: Browser) -> None:
    _, s1 = settled(console, ZHANG)
    settled(console, ZHANG)
    settled(console, LI)
    console.adjust(s1["setl_id"], str(s1["medfee_sumamt"] - Decimal("10.00")))  # the bureau's audit took 10 yuan
    printed = reconcile(console, "--format", "csv")
    assert printed.returncode == 1, printed.stderr  # 不平

    browser.open(f"/day?date={TODAY}")
    browser.sign_in(OFFICE, PASSWORD)
    figure = browser.table("#figure1")
    assert figure == list(csv.reader(io.StringIO(printed.stdout)))
    assert figure[0] == HEADERS and figure[-1][0] == "合计"
    assert [r[7] for r in figure[1:-1]] == ["不平", "平"] and browser.text("#verdict") == "不平"
    assert figure[-1][6] == "3"  # settlements, all groups
    [difference] = browser.all(".differences tbody tr")
    assert "amounts differ" in difference and s1["setl_id"] in difference
    # ID numbers are masked for the office, in the page and in what the browser holds
    assert ZHANG["psn_no"] not in browser.source and logs.mask(ZHANG["psn_no"]) in browser.all(".person")
    browser.shot("day")

    status, headers, body = browser.fetch(f"/day.csv?date={TODAY}")
    assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
    assert body.decode("utf-8-sig") == printed.stdout  # with the mark Excel needs to read UTF-8


def test_today_names_what_needs_a_person_and_the_operator_sees_the_fep_command(console: World,
                                                                               browser: Browser) -> None:
    settled(console, LI)
    visit = Visit(console.his, ZHANG)
    visit.up_to_settlement()
    parked = parked_settlement(console, visit)["fep_msgid"]

    browser.open("/")
    browser.sign_in(OPERATOR, PASSWORD)
    assert browser.path == "/"
    [item] = [i for i in browser.all("#attention tr.item") if parked in i]
    assert f"fep replay {parked}" in item and "2207" in item
    [head, *rows] = browser.table("#kinds table")
    assert head[:3] == ["trade", "succeeded", "refused by the bureau"]
    kinds = {r[0]: dict(zip(head, r)) for r in rows}
    assert kinds["2207 门诊结算"]["succeeded"] == "1" and kinds["2207 门诊结算"]["NEEDS_ATTENTION"] == "1"
    assert kinds["2601 冲正交易"]["refused by the bureau"] != ""  # the reversals it kept refusing (系统繁忙)
    assert browser.count("#kinds svg.chart rect.s0") >= 24  # trades per hour: today's bars
    assert "up" in browser.text(".endpoint")
    browser.shot("today-operator")

    browser.sign_out()
    browser.sign_in(OFFICE, PASSWORD)
    [item] = [i for i in browser.all("#attention tr.item") if parked in i]
    assert "fep replay" not in item and "an operator does it" in item
    assert browser.count("code.cmd") == 0
    browser.shot("today-office")
    # A user removed from the users file is signed out at their next page.
    assert user(console, "remove", OFFICE).returncode == 0
    browser.open("/")
    assert browser.path.startswith("/signin")


def test_a_trade_s_life_is_shown_as_fep_show_prints_it_masked_for_the_office(console: World,
                                                                             browser: Browser) -> None:
    visit = Visit(console.his, ZHANG)
    visit.up_to_settlement()
    msgid = visit.settle()["fep_msgid"]
    shown = console.cli("show", msgid).stdout.rstrip("\n")

    browser.open("/trade")
    browser.sign_in(OFFICE, PASSWORD)
    browser.driver.find_element("id", "msgid").send_keys(msgid)
    browser.submit(browser.driver.find_element("css selector", "form.find button"))
    assert browser.path == f"/trade/{msgid}"
    assert browser.text("#life") == logs.mask(shown) and browser.text("#state") == "ANSWERED"
    assert ZHANG["psn_no"] not in browser.source and ZHANG["certno"] not in browser.source
    browser.shot("trade-office")

    identified = Visit(console.his, ZHANG).identify()["fep_msgid"]  # 1101: the bureau answers with the name
    browser.open(f"/trade/{identified}")
    assert "张三" not in browser.source and "张*" in browser.text("#answer")

    browser.sign_out()
    browser.sign_in(OPERATOR, PASSWORD)
    browser.open(f"/trade/{msgid}")
    assert browser.text("#life") == shown and browser.text("#person") == ZHANG["psn_no"]
    browser.open(f"/trade/{identified}")
    assert "张三" in browser.text("#answer")
    browser.open("/trade/H430100000012026010100000000")
    assert "no trade with msgid" in browser.text("#message")


def test_the_month_shows_each_day_and_the_clearing_status_fep_clearing_status_prints(console: World,
                                                                                    browser: Browser) -> None:
    settled(console, ZHANG)
    settled(console, LI)
    assert reconcile(console).returncode == 0
    month = TODAY[:7]
    printed = console.cli("clearing", "status", "--month", month, "--format", "csv")
    assert printed.returncode == 0, printed.stderr

    browser.open("/month")
    browser.sign_in(OFFICE, PASSWORD)
    assert browser.text("h1") == f"The month 月清算 · {month}"
    assert f"{TODAY[8:]} 平" in browser.all("ol.days li")
    assert browser.table("#status") == list(csv.reader(io.StringIO(printed.stdout)))
    assert browser.count("#settled svg.chart rect.s0") >= 28  # settled amount per day of the month
    browser.shot("month")
    status, _, body = browser.fetch(f"/month.csv?month={month}")
    assert status == 200 and body.decode("utf-8-sig") == printed.stdout

    # The days before today were never reconciled in this new world: the month cannot be applied for yet.
    browser.sign_out()
    browser.sign_in(OPERATOR, PASSWORD)
    browser.open("/month")
    earlier = [f"{month}-{d:02d}" for d in range(1, int(TODAY[8:]))]
    if earlier:
        assert f"fep reconcile --date {earlier[0]}" in browser.text("#attention")
    else:
        assert browser.count("#attention") == 0


def test_a_session_unused_longer_than_console_session_minutes_ends(world: World, tmp_path: Path) -> None:
    if MISSING:
        pytest.skip(MISSING)
    with_console(world, session_minutes=0.02)  # 1.2 s
    b = Browser(f"http://127.0.0.1:{config.load(world.fep_config).console.port}", tmp_path / "screenshots")
    try:
        b.sign_in(OFFICE, PASSWORD)
        assert b.path == "/"
        time.sleep(2)
        b.open("/month")
        assert b.path.startswith("/signin?next=")
    finally:
        b.close()


def test_fep_user_keeps_only_hashes_and_refuses_what_it_cannot_keep(world: World) -> None:
    users = world.dir / "conf" / "console-users"
    world.configure(fep={"console": {"port": free_port(), "users": str(users)}})
    assert user(world, "add", "zhao", "--role", "office").returncode == 0
    assert PASSWORD not in users.read_text() and users.stat().st_mode & 0o777 == 0o640
    assert users.stat().st_gid == users.parent.stat().st_gid  # /etc/fep's group, fep's: fep can read it
    assert "is a user already" in user(world, "add", "zhao", "--role", "office").stderr
    assert "at least 10 characters" in user(world, "passwd", "zhao", password="short").stderr
    assert "invalid choice" in user(world, "add", "qian", "--role", "admin").stderr
    assert user(world, "passwd", "zhao", "--role", "operator", password="another-password").returncode == 0
    assert user(world, "list").stdout.split() == ["name", "role", "zhao", "operator"]
    assert user(world, "remove", "zhao").returncode == 0
    assert user(world, "list").stdout.split() == ["name", "role"]


def test_a_month_is_applied_for_only_once_every_day_balanced_and_the_month_is_over() -> None:
    days = [{"day": "2026-11-01", "result": "平"}, {"day": "2026-11-02", "result": "不平"},
            {"day": "2026-11-03", "result": None}]
    status = {"groups": [{"state": "未申请", "settlements": 3}]}
    [item] = month_attention("2026-11", days, status, over=True)
    assert item["what"].endswith(": 02, 03") and item["commands"] == ["fep reconcile --date 2026-11-02",
                                                                    "fep reconcile --date 2026-11-03"]
    balanced = [{**d, "result": "平"} for d in days]
    [item] = month_attention("2026-11", balanced, status, over=True)
    assert item["commands"] == ["fep clearing apply --month 2026-11"]
    assert month_attention("2026-11", balanced, status, over=False) == []


@pytest.mark.parametrize("changes, what", [
    ({}, []),
    # one endpoint of two down: that is what to see to, not the sign-in (fep check says the same)
    ({"endpoints": [{"name": "primary", "url": "https://a", "up": False}, {"name": "backup", "url": "https://b",
                                                                           "up": True}], "signed_in": False},
     ["the bureau endpoint primary is down (https://a)"]),
    ({"signed_in": False}, ["fep is not signed in to the bureau (9001)"]),
    ({"oldest_unresolved_seconds": 300}, ["a trade's outcome unknown for 300 s"]),
    ({"queued": 12, "oldest_queued_seconds": 3600}, ["12 queued for the bureau, oldest 3600 s"]),
    ({"certificates": {"hospital": 20 * 86400}}, ["the certificate hospital expires in 20 days"]),
    ({"needs_attention": [{"msgid": "M1", "infno": "2207", "since": "09:00:01", "note": "refused"}]},
     ["2207 门诊结算 M1 parked since 09:00:01: refused"]),
    # every day of the window that did not balance, not only the last run's
    ({"days_not_balanced": [{"stmt_date": "2026-11-30", "unbalanced": 1, "unresolved": 0},
                            {"stmt_date": "2026-11-27", "unbalanced": 0, "unresolved": 2}]},
     ["the reconciliation of 2026-11-30: 1 group(s) not balanced, 0 trade(s) not resolved",
      "the reconciliation of 2026-11-27: 0 group(s) not balanced, 2 trade(s) not resolved"]),
    ({"last_reconciliation": None}, ["no reconciliation has run"]),
])
def test_what_needs_a_person_is_what_fep_status_check_warns_of(changes: dict, what: list[str]) -> None:
    status = {"endpoints": [{"name": "primary", "url": "https://a", "up": True}], "signed_in": True,
              "journal_cannot_write": False, "queued": 0, "oldest_queued_seconds": None,
              "oldest_unresolved_seconds": None, "needs_attention": [], "certificates": {"hospital": 200 * 86400},
              "reconcile_daily_at": "02:30", "up_seconds": 3 * 86400, "days_not_balanced": [],
              "last_reconciliation": {"stmt_date": "2026-11-30", "run_at": "2026-12-01 02:30:05", "balanced": 2,
                                      "unbalanced": 0, "unresolved": 0}, **changes}
    morning = datetime(2026, 12, 1, 9, 0)
    items = attention(status, morning, lambda infno: {"2207": "门诊结算"}.get(infno, ""))
    assert [i["what"] for i in items] == what
    assert bool(items) == (health.check(status, morning).level is not health.Level.OK)
    assert all(i["commands"] for i in items)  # and for each, the command that does it


def test_only_loopback_and_the_office_networks_may_connect() -> None:
    site = OfficeSite(Resource(), (ipaddress.ip_network("10.20.30.0/24"),))
    assert site.buildProtocol(IPv4Address("TCP", "10.20.30.7", 50000)) is not None
    assert site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000)) is not None
    assert site.buildProtocol(IPv4Address("TCP", "10.20.31.7", 50000)) is None  # the HIS's network, say


def test_the_console_is_never_served_on_the_his_port(world: World) -> None:
    world.configure(fep={"console": {"port": world.his_port}})
    with pytest.raises(config.ConfigError, match="console.port .* is his.tcp_port's"):
        config.load(world.fep_config)
    world.configure(fep={"console": {"session_minutes": 10}})
    with pytest.raises(config.ConfigError, match="console.session_minutes is set but console.port is not"):
        config.load(world.fep_config)
