"""The core trade path: HIS -> fep journal -> mutual TLS -> bureau simulator, answered insurance-first."""

from __future__ import annotations

import os
import socket
from decimal import Decimal

from fep import envelope
from fep.msgid import well_formed
from fep.sim.world import LI, ZHANG, Visit, World, his_msgid, wait_for


def test_an_outpatient_visit_is_settled_and_cancelled_through_fep(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()

    pre = visit.presettle()
    assert pre["infcode"] == 0 and pre["output"]["setlinfo"]["setl_id"] is None

    settled = visit.settle()
    assert settled["infcode"] == 0, settled
    assert settled["fep_state"] == "ANSWERED"
    s = settled["output"]["setlinfo"]
    # Exact decimals end to end, and the identities every real settlement obeys.
    assert isinstance(s["medfee_sumamt"], Decimal) and s["medfee_sumamt"] == visit.medfee
    assert s["medfee_sumamt"] == s["fund_pay_sumamt"] + s["psn_part_amt"] + s["hosp_part_amt"]
    assert s["psn_part_amt"] == s["acct_pay"] + s["psn_cash_pay"]
    assert s["medins_setl_id"] == settled["fep_msgid"]

    # Insurance-first: the request was journalled before it was sent, the answer before the HIS heard it.
    row = running.trade(settled["fep_msgid"])
    assert running.events(settled["fep_msgid"]) == ["accept", "answer"]
    assert row["state"] == "ANSWERED" and row["setl_id"] == s["setl_id"]
    assert envelope.loads(row["answer"])["output"]["setlinfo"]["setl_id"] == s["setl_id"]

    cancelled = visit.cancel(s["setl_id"])
    assert cancelled["infcode"] == 0, cancelled
    c = cancelled["output"]["setlinfo"]
    assert c["setl_id"] != s["setl_id"]  # a cancel is a new, negative settlement
    assert c["medfee_sumamt"] == -s["medfee_sumamt"] and c["acct_pay"] == -s["acct_pay"]
    assert running.trade(cancelled["fep_msgid"])["cancels"] == s["setl_id"]
    running.assert_ledgers_agree()


def test_the_same_msgid_sent_again_gets_the_stored_answer_and_charges_nobody_twice(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    msgid = his_msgid(1)
    first = visit.settle(msgid=msgid)
    assert first["infcode"] == 0 and first["fep_msgid"] == msgid  # a well-formed HIS msgid is used as is
    again = visit.settle(msgid=msgid)
    assert again["output"] == first["output"] and again["fep_msgid"] == msgid
    assert [m for m, i in running.sim_answers() if i == "2207"] == [msgid]
    assert len([s for s in running.ledger() if s["kind"] == "settle"]) == 1
    running.assert_ledgers_agree()


def test_the_same_msgid_with_a_different_payload_is_a_clear_error(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    msgid = his_msgid(2)
    assert visit.settle(msgid=msgid)["infcode"] == 0
    other = Visit(running.his, LI)
    other.up_to_settlement()
    status, body = running.his_tcp.request("POST", "/", envelope.dumps(
        {"infno": "2207", "msgid": msgid, "input": other.settlement_input()}))
    assert status == 200 and body["fep_reason"] == "msgid_reused"
    assert body["infcode"] == -1 and f"msgid {msgid} was already used for a different trade" in body["err_msg"]
    assert len([s for s in running.ledger() if s["kind"] == "settle"]) == 1


def test_a_missing_or_malformed_msgid_is_replaced_by_a_unique_one_that_survives_a_restart(running: World) -> None:
    a = running.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}})
    b = running.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}},
                         msgid="not-a-msgid")
    running.kill_fep()
    running.start_fep()
    c = running.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}})
    ids = [x["fep_msgid"] for x in (a, b, c)]
    assert all(well_formed(m) and m.startswith("H43010000001") for m in ids)
    assert len(set(ids)) == 3 and sorted(ids) == ids  # never reused, never backwards


def test_an_his_that_hangs_up_before_the_answer_finds_it_by_msgid(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    running.fault(mode="late", infno="2207", seconds=1.0)  # the bureau is slow, still within 2207's timeout
    msgid = his_msgid(3)
    body = envelope.dumps({"infno": "2207", "msgid": msgid, "input": visit.settlement_input()})
    with socket.create_connection(("127.0.0.1", running.his_port)) as s:
        s.sendall(b"POST /fsi/api/rsfComIfsService/callService HTTP/1.1\r\nHost: fep\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: running.journal("msgid=?", (msgid,)), what="the trade to be journalled")
    # The HIS is gone; the bureau's answer still lands in the journal and is what a lookup returns.
    while_in_flight = running.his.lookup(msgid)
    assert while_in_flight["fep_state"] in ("SENT", "ANSWERED")
    answer = wait_for(lambda: (a := running.his.lookup(msgid))["fep_state"] == "ANSWERED" and a,
                      what="the answer")
    assert answer["infcode"] == 0 and answer["output"]["setlinfo"]["setl_id"]
    # The lookup shows the settlement's codes and amounts (issue 12); the same msgid and payload again, the whole.
    full = visit.settle(msgid=msgid)["output"]
    assert full["setlinfo"]["setl_id"] == answer["output"]["setlinfo"]["setl_id"] and full["setlinfo"]["psn_name"]
    assert {k: v for k, v in full["setlinfo"].items() if k in answer["output"]["setlinfo"]} == \
        answer["output"]["setlinfo"]
    running.assert_ledgers_agree()


def test_an_unknown_trade_number_is_refused_and_never_forwarded(running: World) -> None:
    status, body = running.post_raw(envelope.dumps({"infno": "8888", "input": {"data": {}}}))
    assert status == 200 and (body["fep_state"], body["fep_reason"]) == ("REFUSED", "invalid")
    assert "trade 8888 is not in the trade catalog" in body["err_msg"]
    assert "8888" not in {i for _, i in running.sim_answers()}


def test_bad_requests_get_a_clear_error_naming_what_is_wrong(running: World) -> None:
    status, body = running.post_raw(b'{"infno": "1101", "input": ')
    # Refused in the interface's own shape (HTTP 200, infcode -1), naming what is wrong.
    assert (status, body["infcode"], body["fep_reason"]) == (200, -1, "invalid") and "not valid JSON" in body["err_msg"]
    status, body = running.post_raw(envelope.dumps({"input": {}}))
    assert status == 200 and "missing infno" in body["err_msg"]
    status, body = running.post_raw(envelope.dumps({"infno": "2207", "input": {"data": {"psn_no": "1"}}}))
    assert status == 200 and "input is missing data.mdtrt_id" in body["err_msg"]
    status, body = running.post_raw(b"{" + b" " * (32 << 20) + b"}")  # over the default his.max_body
    assert status == 413 and "over the limit" in body["err_msg"]
    # None of it reached the journal.
    assert all(r["infno"] == "9001" for r in running.journal())


def test_any_post_path_is_a_trade_and_curl_works_on_both_sockets(running: World) -> None:
    for path in ("/fsi/api/rsfComIfsService/callService", "/hsa/hgs/1101", "/fsi/api/fsiPsnInfoService/queryPsnInfo"):
        status, body = running.post_raw(envelope.dumps(
            {"infno": "1101", "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}}), path)
        assert status == 200 and body["infcode"] == 0, (path, body)
    # Fields the box owns were filled by fep, whatever the HIS sent.
    status, body = running.post_raw(envelope.dumps(
        {"infno": "1101", "fixmedins_code": "FAKE", "sign_no": "forged",
         "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}}))
    sent = envelope.loads(running.trade(body["fep_msgid"])["request"])
    assert sent["fixmedins_code"] == "H43010000001" and sent["sign_no"] not in ("forged", "")
    assert body["infcode"] == 0


def test_the_bureau_refuses_a_client_certificate_from_another_ca(world: World) -> None:
    world.configure(fep={"bureau": {"tls": {"cert": str(world.pki / "foreign-hospital.pem"),
                                            "key": str(world.pki / "foreign-hospital.key")}}})
    world.start()
    answer = world.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}})
    assert answer["infcode"] == -1 and answer["fep_state"] == "NOT_SENT"
    assert "nothing was sent" in answer["err_msg"] and "TLS handshake failed" in answer["err_msg"]
    assert world.sim_answers() == []


def test_fep_refuses_to_start_without_a_usable_certificate(world: World) -> None:
    world.configure(fep={"bureau": {"tls": {"cert": str(world.dir / "missing.pem")}}})
    proc = world.start_fep(wait=False)
    assert proc.wait(20) == 2
    assert f"refusing to start: bureau TLS: certificate {world.dir / 'missing.pem'} does not exist" in world.log("run")

    loose = world.dir / "loose.key"
    loose.write_bytes((world.pki / "hospital.key").read_bytes())
    os.chmod(loose, 0o644)
    world.configure(fep={"bureau": {"tls": {"key": str(loose)}}})
    assert world.start_fep(wait=False).wait(20) == 2
    assert f"private key {loose} is readable by others (mode 644)" in world.log("run")

    world.configure(fep={"bureau": {"tls": {"ca": str(world.dir)}}})  # a directory: cannot be read
    assert world.start_fep(wait=False).wait(20) == 2
    assert f"CA certificate {world.dir} cannot be read" in world.log("run")


def test_the_journal_is_private_and_in_wal_mode(running: World) -> None:
    path = running.dir / "lib" / "journal.db"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert (running.dir / "lib" / "journal.db-wal").exists()
