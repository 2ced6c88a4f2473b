"""Proven with the clients' own request paths (issue 9): four public HIS clients, rebuilt from their published
code in tests/his_clients.py, each run against fep and the simulator through a whole outpatient visit, an
inpatient stay, a retry, its own 2601, a file download and a queued upload. Each test ends by comparing three
views: what the client parsed, the journal, and the bureau's ledger.

The bureau writes infcode as the client's verdict needs it (Powersi: the string "0"; the others: a number or
either), and fep's own envelopes (his.infcode_type) the same way: a hospital's HIS and bureau agree on that,
or the HIS would not work without fep either. What a client's code does not do (Zebone's qgyb module has no
22xx and no 2601, Powersi no 9101/9102, openhis and Zebone sign in themselves) is said where it matters.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from datetime import date
from decimal import Decimal
from typing import Any, Callable, Iterator

import pytest

from fep import envelope
from fep.sim.world import ZHANG, Stay, Visit, World, his_msgid, said, setl_id
from tests.his_clients import (CLIENTS, Exchange, HisClient, OpenHisGbk, Powersi, Sdk, detail_zip, result_rows,
                               signed_bytes)


def start(world: World, name: str) -> HisClient:
    cls = CLIENTS[name]
    world.configure(fep={"his": {"infcode_type": cls.infcode_type, "file_answers": cls.file_answers}},
                    sim={"infcode_type": cls.infcode_type})
    world.start()
    return cls(("127.0.0.1", world.his_port))


@pytest.fixture(params=list(CLIENTS))
def his(request: pytest.FixtureRequest, world: World) -> Iterator[HisClient]:
    client = start(world, request.param)
    yield client
    if hasattr(client, "close"):
        client.close()


def done(his: HisClient, what: str, call: Callable[..., Any], *args: Any, **kw: Any) -> Exchange:
    """One step of the HIS: it must hear a success, as its own code decides, and use the answer as its code
    does without throwing."""
    call(*args, **kw)
    ex = his.last
    assert ex.ok and ex.error is None, f"step {what}: {ex.said()}"
    return ex


def output(his: HisClient, ex: Exchange) -> dict[str, Any]:
    return his.output_of(ex) or {}


def row_of(world: World, msgid: str) -> dict[str, Any]:
    """The journal row of a trade the HIS named by its own msgid (fep's own when the HIS's was not well formed)."""
    rows = world.journal("his_msgid=? OR msgid=?", (msgid, msgid))
    assert len(rows) == 1, f"{msgid}: {len(rows)} journal rows"
    return rows[0]


def money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.01"))


def three_views(world: World, his: HisClient, ex: Exchange, kind: str = "settle") -> dict[str, Any]:
    """What the client parsed of a settlement, what the journal holds, what the bureau holds: one settlement."""
    parsed = output(his, ex)["setlinfo"]
    row = row_of(world, ex.msgid)
    journalled = envelope.loads(row["answer"])["output"]["setlinfo"]
    at_bureau = [s for s in world.ledger() if s["setl_id"] == str(parsed["setl_id"])]
    assert len(at_bureau) == 1 and at_bureau[0]["kind"] == kind, at_bureau
    assert row["setl_id"] == str(parsed["setl_id"]) == str(journalled["setl_id"])
    assert money(parsed["medfee_sumamt"]) == money(journalled["medfee_sumamt"]) == money(at_bureau[0]["medfee"])
    assert at_bureau[0]["msgid"] == row["msgid"]  # the bureau knows the trade by fep's msgid, the journal maps it
    world.assert_ledgers_agree()
    return at_bureau[0]


# ---- an outpatient visit: 1101 -> 2201 -> 2203 -> 2204 -> 2206 -> 2207 -> 2208 --------------------------------------
def open_visit(his: HisClient, visit: Visit) -> None:
    person = done(his, "1101 人员信息获取", visit.identify)
    assert output(his, person)["baseinfo"]["psn_no"] == visit.person["psn_no"]
    reg = done(his, "2201 门诊挂号", visit.register)
    visit.mdtrt_id = str(output(his, reg)["data"]["mdtrt_id"])
    done(his, "2203 门诊就诊信息上传", visit.diagnose)
    fees = done(his, "2204 门诊费用明细信息上传", visit.upload_fees)
    assert len(output(his, fees)["result"]) == len(visit.fees)


def test_an_outpatient_visit_through_the_client_s_own_path(world: World, his: HisClient) -> None:
    visit = Visit(his, ZHANG)
    open_visit(his, visit)
    pre = done(his, "2206 门诊预结算", visit.presettle)
    assert money(output(his, pre)["setlinfo"]["medfee_sumamt"]) == visit.medfee
    settled = done(his, "2207 门诊结算", visit.settle)
    s = three_views(world, his, settled)
    cancelled = done(his, "2208 门诊结算撤销", visit.cancel, str(output(his, settled)["setlinfo"]["setl_id"]))
    c = output(his, cancelled)["setlinfo"]
    assert money(c["medfee_sumamt"]) == -visit.medfee
    assert row_of(world, cancelled.msgid)["cancels"] == s["setl_id"]
    three_views(world, his, cancelled, kind="cancel")


# ---- an inpatient stay: 2401 -> 2301 -> 2303 -> 2304 -> 2402 --------------------------------------------------------
def test_an_inpatient_stay_through_the_client_s_own_path(world: World, his: HisClient) -> None:
    stay = Stay(his, ZHANG)
    admitted = done(his, "2401 入院办理", stay.admit)
    stay.mdtrt_id = str(output(his, admitted)["result"]["mdtrt_id"])
    fees = done(his, "2301 住院费用明细上传", stay.upload_fees)
    assert len(output(his, fees)["result"]) == len(stay.fees)
    pre = done(his, "2303 住院预结算", stay.presettle)
    assert money(output(his, pre)["setlinfo"]["medfee_sumamt"]) == stay.medfee
    settled = done(his, "2304 住院结算", stay.settle)
    done(his, "2402 出院办理", stay.discharge)
    three_views(world, his, settled)
    assert row_of(world, admitted.msgid)["state"] == "ANSWERED"


# ---- a retry of the same msgid after the client stopped waiting ------------------------------------------------------
def test_a_settlement_retried_with_its_msgid_after_a_client_timeout_is_charged_once(world: World,
                                                                                    his: HisClient) -> None:
    """The bureau takes 3 s over the 2207; the client waits 1 s (its timeout set so: 180 s Zebone, 100 s openhis,
    30 s the SDK, none at all in Powersi's unifiedPayPostUtil). Then it asks again with the same msgid, as the
    README tells an HIS to: the SDK by itself (urllib3's Retry resends the same body at once), the others by
    resending the same bytes until fep's answer is no longer "in progress". The patient is charged once and the
    client hears the settlement."""
    visit = Visit(his, ZHANG)
    open_visit(his, visit)
    world.fault(mode="slow", infno="2207", seconds=3)
    his.timeout = 1.0
    key = his.new_msgid()
    visit.settle(msgid=key)
    first = answer = his.last
    # The SDK resends the same body by itself after its timeout; the resend waits for the first submission's
    # answer (fep holds it within his.answer_within) and hears the settlement. The others gave up at 1 s.
    assert first.ok if isinstance(his, Sdk) else not first.ok, f"the first 2207: {first.said()}"
    if not isinstance(his, Sdk):  # the SDK cannot resend a msgid of its own choosing: build_request makes a new one
        deadline = time.monotonic() + 20
        while (answer.transport_error or answer.fep_state == "SENT") and time.monotonic() < deadline:
            time.sleep(0.5)
            answer = his.resend(first)
    row = world.wait_state(row_of(world, key)["msgid"], "ANSWERED")
    assert len(world.journal("infno='2207'")) == 1
    assert [i for _, i in world.sim_answers()].count("2207") == 1
    assert len([s for s in world.ledger() if s["kind"] == "settle"]) == 1, "charged twice"
    assert answer.ok and answer.error is None, f"after {answer.attempts} attempt(s) the client heard: {answer.said()}"
    assert str(output(his, answer)["setlinfo"]["setl_id"]) == row["setl_id"]
    three_views(world, his, answer)


# ---- the HIS's own 2601 of its settlement, naming its own msgid -----------------------------------------------------
def test_the_client_s_own_2601_names_its_own_msgid(world: World, his: HisClient) -> None:
    visit = Visit(his, ZHANG)
    open_visit(his, visit)
    settled = done(his, "2207 门诊结算", visit.settle)
    original = row_of(world, settled.msgid)
    reversal = done(his, "2601 冲正交易", his.call, "2601", visit.reversal_input(settled.msgid))
    sent = envelope.loads(row_of(world, reversal.msgid)["request"])["input"]["data"]
    assert sent["omsgid"] == original["msgid"]  # the bureau hears the msgid it knows
    assert world.trade(original["msgid"])["state"] == "REVERSED"
    assert [s["state"] for s in world.ledger()] == ["reversed"]
    world.assert_ledgers_agree()


# ---- a file download: 9102 of the bureau's 3202 result --------------------------------------------------------------
def bureau_result_file(world: World) -> tuple[str, str, str]:
    """A settlement through fep, then the bureau's detail result for today (9101 of an empty detail file and
    3202, behind fep's back): (file_qury_no, filename, the setl_id in it)."""
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    settled = visit.settle()
    assert settled["infcode"] in (0, "0"), said(settled)
    up = world.bypass("9101", his_msgid(9101), {"fsUploadIn": {
        "in": base64.b64encode(detail_zip([])).decode(), "filename": "detail.zip", "fixmedins_code": "H43010000001"}})
    today = date.today().isoformat()
    stmt = world.bypass("3202", his_msgid(3202), {"data": {
        "setl_optins": "430199", "file_qury_no": up["output"]["file_qury_no"], "stmt_begndate": today,
        "stmt_enddate": today, "medfee_sumamt": "0", "fund_pay_sumamt": "0", "cash_payamt": "0",
        "fixmedins_setl_cnt": "0", "clr_type": "11", "refd_setl_flag": "0"}})
    info = stmt["output"]["fileinfo"]
    return info["file_qury_no"], info["filename"], setl_id(settled)


def sim_file(world: World, file_qury_no: str) -> bytes:
    with sqlite3.connect(world.sim_ledger_path) as c:
        return c.execute("SELECT content FROM files WHERE file_qury_no=?", (file_qury_no,)).fetchone()[0]


def test_a_file_download_arrives_as_the_zip_the_client_reads(world: World, his: HisClient) -> None:
    if isinstance(his, Powersi):
        pytest.skip("hsa-his has no 9101/9102 code: its 云助手 gateway handles files, and nothing of its own to model")
    no, filename, settled = bureau_result_file(world)
    down = done(his, "9102 文件下载", his.call, "9102",
                {"fsDownloadIn": {"file_qury_no": no, "filename": filename, "fixmedins_code": his.institution}})
    assert his.downloaded(down) == sim_file(world, no), f"the ZIP did not arrive as the client keeps it: {down.said()}"
    rows = down.file_rows if down.file_rows is not None else result_rows(his.downloaded(down) or b"", "result.txt")
    assert [r[2] for r in rows] == [settled]  # the bureau's row of the settlement, as the client read it


# ---- a queued upload: the bureau is down, the fees are acknowledged as QUEUED, then delivered -----------------------
def test_an_upload_queued_while_the_bureau_is_down_is_a_success_to_the_client_then_delivered(world: World,
                                                                                              his: HisClient) -> None:
    stay = Stay(his, ZHANG)
    admitted = done(his, "2401 入院办理", stay.admit)
    stay.mdtrt_id = str(output(his, admitted)["result"]["mdtrt_id"])
    with world.outage():
        stay.upload_fees()
        queued = his.last
        assert queued.fep_state == "QUEUED", queued.said()
        assert queued.ok and queued.error is None, f"the client does not take the QUEUED ack: {queued.said()}"
    world.wait_state(row_of(world, queued.msgid)["msgid"], "ANSWERED")
    pre = done(his, "2303 住院预结算", stay.presettle)
    assert money(output(his, pre)["setlinfo"]["medfee_sumamt"]) == stay.medfee  # the queued fees reached the bureau
    settled = done(his, "2304 住院结算", stay.settle)
    three_views(world, his, settled)


# ---- what only some clients do --------------------------------------------------------------------------------------
@pytest.fixture(params=["zebone", "openhis"])
def reconciling(request: pytest.FixtureRequest, world: World) -> Iterator[HisClient]:
    """The clients whose code runs the reconciliation detail flow itself (InsQgRecService; YiBaoController 9101)."""
    client = start(world, request.param)
    yield client
    if hasattr(client, "close"):
        client.close()


def test_the_client_s_own_9101_3202_9102_detail_reconciliation(world: World, reconciling: HisClient) -> None:
    """9101 with the file as the client encodes it (Zebone: json-lib writes Java's byte[] as an array of signed
    bytes; openhis: Convert.ToBase64String), 3202 against it, 9102 of the result, read as the client reads it."""
    his = reconciling
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    settled = visit.settle()
    s = settled["output"]["setlinfo"]
    zipped = detail_zip([[str(s["setl_id"]), visit.mdtrt_id, ZHANG["psn_no"], str(s["medfee_sumamt"]),
                          str(s["fund_pay_sumamt"]), str(s["acct_pay"]), "0"]])
    file_in: Any = signed_bytes(zipped) if his.name == "zebone" else base64.b64encode(zipped).decode()
    up = done(his, "9101 文件上传", his.call, "9101", {"fsUploadIn": {"in": file_in, "filename": "detail.zip",
                                                                 "fixmedins_code": his.institution}})
    today = date.today().isoformat()
    stmt = done(his, "3202 对明细账", his.call, "3202", {"data": {
        "setl_optins": "430199", "file_qury_no": output(his, up)["file_qury_no"], "stmt_begndate": today,
        "stmt_enddate": today, "medfee_sumamt": str(s["medfee_sumamt"]), "fund_pay_sumamt": str(s["fund_pay_sumamt"]),
        "cash_payamt": str(s["psn_cash_pay"]), "fixmedins_setl_cnt": "1", "clr_type": "11", "refd_setl_flag": "0"}})
    info = output(his, stmt)["fileinfo"]
    down = done(his, "9102 文件下载", his.call, "9102", {"fsDownloadIn": {
        "file_qury_no": info["file_qury_no"], "filename": info["filename"], "fixmedins_code": his.institution}})
    assert [(r[2], r[4]) for r in down.file_rows or []] == [(str(s["setl_id"]), "0")], down.said()  # 对账平


@pytest.mark.parametrize("name", ["zebone", "openhis"])
def test_a_client_that_signs_in_by_itself_hears_fep_s_session_and_nothing_is_journalled(world: World,
                                                                                         name: str) -> None:
    """Zebone (InsPubSignInService.saveSignIn before each flow) and openhis (DoSigin before every trade until
    it has a sign_no) sign in themselves. fep holds the bureau session: it answers their 9001 with its own
    sign_no, sends nothing and journals nothing, so both work unchanged."""
    his = start(world, name)
    his.call("9001", {"signIn": {"opter_no": "0001", "mac": "00-16-3E-00-00-01", "ip": "10.1.1.20"}})
    ex = his.last
    assert ex.status == 200 and ex.answer["fep_state"] == "LOCAL" and ex.ok, ex.said()
    assert ex.answer["output"]["signinoutb"]["sign_no"]
    assert [r["infno"] for r in world.journal()] == ["9001"]  # fep's own sign-in only


def test_openhis_hears_100_continue_before_it_sends_the_body(world: World) -> None:
    """.NET Framework's HttpWebRequest sends Expect: 100-continue on every POST and holds the body back for
    up to 350 ms unless 100 Continue comes first: every openhis trade through a server that says nothing
    costs those 350 ms."""
    his = start(world, "openhis")
    done(his, "1101 人员信息获取", Visit(his, ZHANG).identify)
    ex = his.last
    assert ex.interims == [100] and (ex.continue_wait or 0) < 0.2, ex.said()


def test_openhis_s_gbk_transport_is_read_as_gb18030(world: World) -> None:
    """ClassHelper.YBHttpRequest writes the envelope in the Windows code page with no charset: fep must read
    it as GB18030 and journal and forward the same text in UTF-8."""
    start(world, "openhis")
    his = OpenHisGbk(("127.0.0.1", world.his_port))
    done(his, "1101 人员信息获取 (GBK)", Visit(his, ZHANG).identify)
    sent = envelope.loads(row_of(world, his.last.msgid)["request"])
    assert sent["opter_name"] == "收费员" and his.last.body.decode("gbk").count("收费员") == 1
    his.close()


def test_each_client_s_request_is_written_as_its_code_writes_it() -> None:
    """The request heads as rebuilt: path shape and header order of each client (no fep needed)."""
    heads = {}
    for name, cls in CLIENTS.items():
        his = cls(("127.0.0.1", 8097))
        ex = Exchange(name, "2207", "M", b"")
        input_ = {"data": {"psn_no": "1", "medfee_sumamt": Decimal("12.50")}}
        ex.path, ex.out_headers, ex.body = his.build("2207", input_, his.new_msgid())
        heads[name] = (ex.path, [k for k, _ in ex.out_headers], ex.body)
    assert heads["zebone"][:2] == ("/hsa/hgs/2207", [
        "x-tif-paasid", "x-tif-signature", "x-tif-timestamp", "x-tif-nonce", "Content-Length", "Content-Type", "Host",
        "Connection", "User-Agent", "Accept-Encoding"])
    assert heads["zebone"][2].startswith(b'{"cainfo":"","dev_no":"","dev_safe_info":"","fixmedins_code":"H44200100009"')
    assert heads["powersi"][:2] == ("/hsa-hgs/unifiedPay", [
        "accept", "user-agent", "Content-Type", "Host", "Connection", "Content-Length"])
    assert heads["powersi"][2].startswith(b'{"hospCode":"1000001","infno":"2207","input":"{\\"data\\":')
    assert heads["openhis"][:2] == ("/ebus/rio_fsi", ["Content-Type", "User-Agent", "apikey"])  # + Host, length,
    assert b'\r\n  "input": {\r\n    "data": {\r\n      "psn_no": "1",\r\n      "medfee_sumamt": 12.5\r\n' \
           in heads["openhis"][2]  # Expect, Connection
    assert heads["sdk"][:2] == ("/fsi/api/2207", [
        "Host", "User-Agent", "Accept-Encoding", "Accept", "Connection", "Content-Type", "_api_name", "_api_version",
        "_api_timestamp", "_api_access_key", "_api_signature", "Content-Length"])
    assert b'"sign_no":"null","input":{"data":{"psn_no":"1","medfee_sumamt":12.5}}}' in heads["sdk"][2]
