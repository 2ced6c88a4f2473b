"""An outside review of issues 13 and 14, from the finance office's and the operator's side: where month-end
clearing tells the office something false, or leaves a trade at the bureau that fep no longer knows about.
Each test fails because of a defect in fep, not in the test."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import date, timedelta
from typing import Any

from fep.sim.world import QIAN, ZHANG, World, ok, said, settled_visit, wait_for

TODAY = date.today()
MONTH = TODAY.strftime("%Y-%m")  # not over yet
DAYS = [TODAY.replace(day=d).isoformat() for d in range(1, TODAY.day + 1)]
# A month is applied for once it is over: the clearing stories settle today and move the settlements to the
# last day of last month (World.backdate_settlements), then clear last month.
LAST_DAY = TODAY.replace(day=1) - timedelta(days=1)
PAST = LAST_DAY.strftime("%Y-%m")
PAST_DAYS = [LAST_DAY.replace(day=d).isoformat() for d in range(1, LAST_DAY.day + 1)]


def clearing(world: World, *args: str, month: str = PAST) -> tuple[int, dict[str, Any]]:
    run = world.cli("clearing", *args, "--month", month, "--json")
    assert run.stdout, run.stderr
    return run.returncode, json.loads(run.stdout)


def reconciled(world: World, days: list[str] = PAST_DAYS) -> None:
    """Every day of the month reconciled and balanced, as the office does before applying."""
    for day in days:
        run = world.cli("reconcile", "--date", day)
        assert run.returncode == 0, run.stdout + run.stderr


def settled_last_month(world: World, person: dict[str, str]) -> dict[str, Any]:
    """A visit settled, on the last day of last month: the 2207's answer."""
    _, answer = settled_visit(world, person)
    world.backdate_settlements(LAST_DAY)
    return answer


def group(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return {f"{g['insutype']}/{g['setl_optins']}/{g['clr_type']}": g for g in doc["groups"]}[key]


def bureau_applications(world: World) -> list[dict[str, Any]]:
    """The clearing applications the bureau holds in force, read from its own ledger."""
    with closing(sqlite3.connect(f"file:{world.sim_ledger_path}?mode=ro", uri=True)) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM clearings WHERE state='applied'")]


def test_an_application_whose_answer_was_lost_is_still_known_to_fep_and_can_be_cancelled(running: World) -> None:
    """The office applies for the month; the bureau takes the 3203 but its answer is lost on the line. fep
    resends it (on_unknown: resend) and the bureau's answer, with its clr_appy_evt_id, arrives in the journal.
    The office must then see the group as applied (or be able to cancel it): instead fep's clearing table
    never learns of the application, a new `apply` is refused by the bureau (已申请清算，请先撤销) and
    `cancel` says there is nothing to cancel: the group is stuck with an application only the bureau knows."""
    settled_last_month(running, ZHANG)
    reconciled(running)
    running.fault(mode="drop_after", infno="3203", times=1)
    clearing(running, "apply")  # its answer lost: whatever fep says now, the bureau applied
    [lost] = running.journal("infno='3203'")
    running.wait_state(lost["msgid"], "ANSWERED", "CONFIRMED", timeout=30)
    [held] = bureau_applications(running)

    code, doc = clearing(running, "apply")
    g = group(doc, "310/430199/11")
    assert g["result"] in ("applied", "already applied") and g.get("clr_appy_evt_id") == held["clr_appy_evt_id"], \
        f"the bureau holds {held['clr_appy_evt_id']}; fep says {g}"


def test_running_the_remote_pull_again_after_it_was_confirmed_does_not_say_it_is_not_confirmed(
        running: World) -> None:
    """`fep clearing remote` finds no difference and confirms the month (3261). The office (or cron) runs it
    again the next morning: the month is confirmed at the clearing centre, so fep must say so and exit 0.
    Instead it sends 3261 again, the centre refuses (已确认), and fep prints NOT confirmed and exits 1: the
    office is told the month is unconfirmed when it is, and cron raises an alarm every day after."""
    settled_last_month(running, QIAN)  # 省内异地: in the 异地 clearing detail
    first, doc = clearing(running, "remote")
    assert first == 0 and doc["confirmed"], doc
    again, doc = clearing(running, "remote")
    assert again == 0 and doc["confirmed"], f"exit {again}: {doc.get('why')}"


def test_a_month_that_is_not_over_is_not_applied_for(running: World) -> None:
    """Month-end clearing applies for a whole month (3203 carries the month's begndate and enddate) only
    when every day of it has balanced. Today is not the month's last day, or it is but the day is not over:
    the days still to come cannot have balanced. fep applies anyway, with the settlements so far; a
    settlement later this month is then never applied for, and `apply` only says "already applied"."""
    settled_visit(running, ZHANG)
    reconciled(running, DAYS)
    code, doc = clearing(running, "apply", month=MONTH)
    g = group(doc, "310/430199/11")
    assert g["result"] != "applied" and "3203" not in {i for _, i in running.sim_answers()}, \
        f"applied for all of {MONTH} on {TODAY}: {g}"


def test_a_secret_pasted_into_the_yaml_is_refused_without_being_printed(world: World) -> None:
    """An integration engineer pastes the gateway's secret key into fep.yaml instead of the path of its file.
    The secret is Base64, as gateways issue them, so it has a '/' in it. fep must refuse it naming the key
    and never write the secret out (README: "never in the YAML ..., never logged"). Instead fep takes it for
    a path and refuses to start with "secret secret_key /…/<the secret> does not exist": the secret is on the
    console and in the system journal."""
    world.use_profile("hunan")
    pasted = "q8Zt/Jx3+Lm9Wv2Pa7Nc=="
    world.configure(fep={"bureau": {"profile": {"secrets": {"secret_key": pasted}}}})
    proc = world.start_fep(wait=False)
    proc.wait(30)
    log = world.log("run")
    assert "secret_key" in log, log
    assert pasted not in log, f"the secret is in fep's log: {log[-400:]}"



def test_a_cancel_whose_answer_was_lost_leaves_the_group_free_to_apply_again(running: World) -> None:
    """The office cancels an application (3204) to correct it; the bureau cancels it but the answer is lost.
    fep resends it and the answer arrives in the journal. The group must then be free to apply again: instead
    fep still holds it as applied ("already applied"), while a second cancel is refused by the bureau (已撤销):
    the office can neither apply nor cancel, and the month is never cleared."""
    settled_last_month(running, ZHANG)
    reconciled(running)
    assert group(clearing(running, "apply")[1], "310/430199/11")["result"] == "applied"
    running.fault(mode="drop_after", infno="3204", times=1)
    running.cli("clearing", "cancel", "--month", PAST, "--group", "310/430199/11")
    [lost] = running.journal("infno='3204'")
    running.wait_state(lost["msgid"], "ANSWERED", "CONFIRMED", timeout=30)
    assert bureau_applications(running) == []  # the bureau cancelled it

    g = group(clearing(running, "apply")[1], "310/430199/11")
    assert g["result"] == "applied" and len(bureau_applications(running)) == 1, f"fep says {g}"


def test_a_cancelled_application_owes_nothing_in_the_status_table(running: World) -> None:
    """The audit refused part of an application (拒付); the office cancels it to apply again. Until it does,
    the status table must not show money owed either way for a cancelled application: fep shows 申请金额 0,
    the old 拒付 still counted, and 未拨付 negative (the bureau "owes" minus the refusal)."""
    answer = settled_last_month(running, ZHANG)
    reconciled(running)
    assert group(clearing(running, "apply")[1], "310/430199/11")["result"] == "applied"
    running.refuse(str(answer["output"]["setlinfo"]["setl_id"]), "5.00", "超限价")
    clearing(running, "status")  # the audit is read: 5.00 refused
    assert running.cli("clearing", "cancel", "--month", PAST, "--group", "310/430199/11").returncode == 0
    g = group(clearing(running, "status")[1], "310/430199/11")
    assert float(g["outstanding"]) >= 0, f"a cancelled application shows 未拨付 {g['outstanding']}: {g}"



class GatewayProxy:
    """The region's gateway as a plain-HTTP proxy in front of the simulated bureau (the 医保专网): it passes
    every request on, after `request` (headers, body -> body) has had its say, and gives fep the answer after
    `answer` (headers, status, body -> status, body) has."""

    def __init__(self, world: World, request: Any = None, answer: Any = None) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from fep.sim.world import free_port

        sim_port = world.sim_port

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if request:
                    body = request(self.headers, body)
                upstream = http.client.HTTPConnection("127.0.0.1", sim_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")}
                upstream.request("POST", self.path, body, headers)
                resp = upstream.getresponse()
                status, text = resp.status, resp.read()
                kind = resp.getheader("Content-Type") or "application/json"
                upstream.close()
                if answer:
                    status, text = answer(self.headers, status, text)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        world.configure(fep={"bureau": {"endpoints": [
            {"name": "gateway", "url": f"http://127.0.0.1:{self.port}/fsi/api/rsfComIfsService/callService"}]}})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_gateway_timeout_on_a_settlement_is_an_unknown_outcome_not_a_refusal(world: World) -> None:
    """Hunan, over the private line: the gateway passes the 2207 to the bureau, which settles it, but the
    gateway stops waiting and answers with its own JSON error (HTTP 504, code/message). That is not a
    refusal before the bureau (签名不一致, 非法用户, a bad timestamp): the trade reached it. fep must treat the
    outcome as unknown and resolve it (reverse the 2207), so that the bureau holds no settlement the journal
    and the HIS do not. Instead fep reads any {"code","message"} body as "the gateway refused it before the
    bureau": not sent, safe to resend. The HIS settles the patient again, and the fund and the patient's
    account are charged twice."""
    from fep.sim.world import Visit

    world.use_profile("hunan", link_security="plain_http")
    world.start_sim()

    def gives_up(headers: Any, status: int, text: bytes) -> tuple[int, bytes]:
        if headers.get("_api_name") == "2207":  # the bureau has settled it by now
            return 504, json.dumps({"code": 504, "message": "调用后端服务超时"}).encode()
        return status, text

    proxy = GatewayProxy(world, answer=gives_up)
    try:
        world.start_fep()
        visit = Visit(world.his, ZHANG)
        visit.up_to_settlement()
        heard = visit.settle()
        msgid = heard["fep_msgid"]
        # the bureau settled it: live, or reversed already if fep resolved it before the HIS heard
        assert msgid in {s["msgid"] for s in world.ledger()}, "the bureau settled it"
        wait_for(lambda: msgid not in world.live() or world.trade(msgid)["state"] in ("ANSWERED", "CONFIRMED"),
                 timeout=30, what=f"fep to resolve the 2207 the bureau settled (the HIS heard: {said(heard)}; "
                                  f"journal: {world.trade(msgid)['state']} {world.trade(msgid)['note']})")
    finally:
        world.stop()
        proxy.close()


def test_every_trade_of_a_remote_patient_carries_the_insured_region_from_1101(running: World) -> None:
    """An HIS leaves insuplc_admdvs empty on every trade; fep fills it from the person's 1101 answer, because
    the bureau routes a 异地 patient's trade by it and refuses one without it. That holds for the visit's
    trades (2201-2208), but not for the person's other trades an HIS makes around the visit: 2001 (待遇检查,
    before settling), 5201/5205/5206 (queries of the person's visits and totals), 5301/5302 (the person's
    filings, 备案), 4101 (the settlement list, 结算清单). They go to the bureau with it empty."""
    from fep.sim.world import Visit

    visit = Visit(running.his, QIAN)
    assert ok(visit.identify())
    person = {"psn_no": QIAN["psn_no"], "insutype": QIAN["insutype"]}
    empty = []
    for infno, input_ in (("2001", {"data": {**person, "med_type": "11", "fixmedins_code": "H43010000001",
                                             "begntime": "2026-11-23 09:00:00"}}),
                          ("5201", {"data": {**person, "begntime": "2026-11-01 00:00:00"}}),
                          ("5205", {"data": {**person, "begntime": "2026-11-01 00:00:00"}}),
                          ("5206", {"data": {**person, "cum_ym": "202611"}}),
                          ("5301", {"data": person}), ("5302", {"data": person}),
                          ("4101", {"setlinfo": {**person, "setl_id": "1", "mdtrt_id": "1"}})):
        heard = running.his.call(infno, input_)
        sent = running.bureau_request(heard["fep_msgid"])
        if not sent.get("insuplc_admdvs"):
            empty.append(infno)
    assert empty == [], f"sent to the bureau without the patient's insured region (430400): {empty}"



def test_a_diagnosis_is_judged_on_the_visit_s_date_when_the_line_has_no_diagnosis_time(running: World) -> None:
    """The HIS uploads a visit of 2024-01-01 late (2203, mdtrtinfo.begntime 2024-01-01), its diagnosis line
    without diag_time, as many HIS programs send it (diag_time is not required). J11.100 was retired by the
    catalog only on 2024-01-02: on the visit's date it was valid, so the upload must go (issue 14: a code
    "retired on the visit's date" refuses). fep judges it on today's date instead and refuses it."""
    from fep import envelope
    from fep.sim.world import Visit

    sync = running.cli("catalog", "sync")
    assert sync.returncode == 0, sync.stdout + sync.stderr
    visit = Visit(running.his, ZHANG)
    visit.open()
    _, body = running.his_tcp.request("POST", "/", envelope.dumps({"infno": "2203", "input": {
        "mdtrtinfo": {"mdtrt_id": visit.mdtrt_id, "psn_no": ZHANG["psn_no"], "med_type": "11",
                      "begntime": "2024-01-01 09:00:00"},
        "diseinfo": [{"diag_type": "1", "diag_srt_no": "1", "diag_code": "J11.100", "diag_name": "流行性感冒",
                      "diag_dept": "内科", "dise_dor_no": "D001", "dise_dor_name": "医生", "vali_flag": "1"}]}}))
    assert ok(body), said(body)



def test_a_paged_catalog_is_read_to_the_last_page_the_bureau_names_when_it_pages_smaller(world: World) -> None:
    """fep asks the paged queries (1312, 1316-1319) for 100 records a page. A bureau that pages by 50 at most
    answers 50 records with pageSize 50, pages 6 and lastPage false. fep must follow the pages the bureau
    names to the last (issue 13: "followed to the last page"); it stops after the first, because that page
    is shorter than the size it asked for, and reports the sync done: the catalog is silently short."""
    world.use_profile("baseline", link_security="plain_http")
    world.configure(sim={"catalog_bulk": {"1312": 250}})
    world.start_sim()

    def pages_by_50(headers: Any, body: bytes) -> bytes:
        if headers.get("X-Fep-Infno") != "1312":
            return body
        doc = json.loads(body)
        doc["input"]["data"]["page_size"] = 50
        return json.dumps(doc, ensure_ascii=False).encode()

    proxy = GatewayProxy(world, request=pages_by_50)
    try:
        world.start_fep()
        run = world.cli("catalog", "sync", "--json")
        doc = json.loads(run.stdout)
        assert doc["downloads"]["1312"]["rows"] == 258, doc["downloads"]["1312"]
    finally:
        world.stop()
        proxy.close()


def test_a_paged_catalog_interrupted_half_way_is_complete_after_the_next_sync(world: World) -> None:
    """The bureau fails page 2 of 1312 (系统繁忙) during a sync: the sync names 1312 FAILED. The next sync,
    with the bureau well again, must leave the catalog complete. Instead fep starts it from the newest update
    among the records page 1 brought (2024-01-03): the records of pages 2 and 3 updated before that are never
    asked for again, the sync says it is done, and the catalog stays short (100 of 258) for good."""
    world.use_profile("baseline", link_security="plain_http")
    world.configure(sim={"catalog_bulk": {"1312": 250}})
    world.start_sim()
    failing = [True]

    def busy_on_page_2(headers: Any, status: int, text: bytes) -> tuple[int, bytes]:
        if failing[0] and headers.get("X-Fep-Infno") == "1312" and json.loads(text).get("output", {}).get(
                "pageNum") == 2:
            failing[0] = False
            return 200, json.dumps({"infcode": -1, "err_msg": "系统繁忙", "output": None}).encode()
        return status, text

    proxy = GatewayProxy(world, answer=busy_on_page_2)
    try:
        world.start_fep()
        first = world.cli("catalog", "sync", "--json")
        assert first.returncode == 1 and not failing[0], first.stdout
        again = world.cli("catalog", "sync", "--json")
        with closing(sqlite3.connect(f"file:{world.journal_path}?mode=ro", uri=True)) as c:
            rows = c.execute("SELECT count(*) FROM catalog_1312").fetchone()[0]
        assert rows == 258, f"{rows} rows after: {json.loads(again.stdout)['downloads']['1312']}"
    finally:
        world.stop()
        proxy.close()





def test_an_insured_region_the_his_pads_with_blanks_is_filled_as_an_empty_one(running: World) -> None:
    """An HIS that keeps insuplc_admdvs in a CHAR(6) column sends six blanks when it has none, as
    PowerBuilder and Delphi HIS programs do. That is an empty insured region: fep must fill it from the
    patient's 1101 as it fills an empty one. It sends the blanks on, and the bureau refuses to register the
    异地 patient (参保地医保区划[      ]与人员参保地不符)."""
    from fep.sim.world import Visit

    visit = Visit(running.his, QIAN)
    assert ok(visit.identify())
    answer = running.his.call("2201", {"data": {"psn_no": QIAN["psn_no"], "insutype": "390", "ipt_otp_no": "X9",
                                                "begntime": "2026-12-01 09:00:00"}}, insuplc_admdvs="      ")
    assert ok(answer), said(answer)
