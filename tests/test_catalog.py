"""The bureau's catalog kept current by version, the hospital's mapping, and fee lines mapped before upload."""

from __future__ import annotations

import json
import subprocess
import sys

from fep import envelope
from fep.client import Client
from fep.sim.world import ZHANG, Stay, Visit, World

RETIRED = "XC03CCC003C003030300003"


def fep(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fep.cli", *args, "--admin", str(world.dir / "run" / "admin.sock")],
                          capture_output=True, text=True, timeout=120)


def test_the_catalog_is_downloaded_incrementally_by_version(running: World) -> None:
    first = json.loads(fep(running, "catalog", "sync", "--json").stdout)
    assert first["downloads"]["1301"] == {"from_version": "v0000", "rows": 5, "to_version": "3"}
    assert first["downloads"]["1305"]["rows"] == 2 and first["codes"] == 6 and first["retired"] == 1
    again = json.loads(fep(running, "catalog", "sync", "--json").stdout)
    assert again["downloads"]["1301"] == {"from_version": "3", "rows": 0, "to_version": "3"}
    # Through the journal like any trade: the downloads are there with their answers.
    assert {r["infno"] for r in running.journal("infno IN ('1301','1305','1306','9102')")} == {
        "1301", "1305", "1306", "9102"}


def test_mapping_import_and_check(running: World, tmp_path) -> None:
    fep(running, "catalog", "sync")
    csv = tmp_path / "map.csv"
    csv.write_text("hosp_code,national_code,hosp_name\nH-AMOX,XA01AAA001A001010100001,阿莫西林\n"
                   f"H-COLD,{RETIRED},感冒灵\nH-NEW,,新药\nH-TYPO,XA0000000,错码\n", encoding="utf-8")
    imported = fep(running, "catalog", "map", "import", str(csv))
    assert imported.returncode == 0 and "4 mapping(s) imported; 3 problem(s)" in imported.stdout
    check = fep(running, "catalog", "map", "check")
    assert check.returncode == 1
    assert "H-NEW" in check.stdout and "no mapping to a national code" in check.stdout
    assert "H-COLD" in check.stdout and "is retired since catalog version 3" in check.stdout
    assert "H-TYPO" in check.stdout and "not in the bureau's catalog" in check.stdout
    assert "H-AMOX" not in check.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("code,national\nX,Y\n")
    refused = fep(running, "catalog", "map", "import", str(bad))
    assert refused.returncode != 0 and "needs the columns hosp_code and national_code" in refused.stderr


def visit_with_hospital_codes(his: Client, codes: list[str]) -> tuple[Visit, dict]:
    """A visit opened through `his`, and a 2204 input whose fee lines carry only the hospital's own codes."""
    visit = Visit(his, ZHANG, fees=[("", "1", "10.00")] * len(codes))
    visit.open()
    lines = [{"feedetl_sn": f"{visit.chrg_bchno}{i}", "mdtrt_id": visit.mdtrt_id, "psn_no": ZHANG["psn_no"],
              "chrg_bchno": visit.chrg_bchno, "fee_ocur_time": "2026-11-23 09:30:00", "medins_list_codg": code,
              "cnt": 1, "pric": "10.00", "det_item_fee_sumamt": "10.00"} for i, code in enumerate(codes)]
    return visit, {"feedetail": lines}


def test_fee_lines_with_hospital_codes_are_mapped_to_national_codes_before_upload(running: World, tmp_path) -> None:
    fep(running, "catalog", "sync")
    (tmp_path / "map.csv").write_text("hosp_code,national_code\nH-AMOX,XA01AAA001A001010100001\nH-CBC,250101001\n")
    fep(running, "catalog", "map", "import", str(tmp_path / "map.csv"))
    visit, input_ = visit_with_hospital_codes(running.his, ["H-AMOX", "H-CBC"])
    answer = running.his.call("2204", input_)
    assert answer["infcode"] == 0, answer
    sent = envelope.loads(running.trade(answer["fep_msgid"])["request"])["input"]["feedetail"]
    assert [(l["medins_list_codg"], l["med_list_codg"]) for l in sent] == [("H-AMOX", "XA01AAA001A001010100001"),
                                                                          ("H-CBC", "250101001")]
    assert visit.presettle()["infcode"] == 0


def test_an_unmapped_or_retired_item_refuses_the_upload_with_one_clear_error(running: World, tmp_path) -> None:
    fep(running, "catalog", "sync")
    (tmp_path / "map.csv").write_text(f"hosp_code,national_code\nH-AMOX,XA01AAA001A001010100001\nH-COLD,{RETIRED}\n")
    fep(running, "catalog", "map", "import", str(tmp_path / "map.csv"))
    _, input_ = visit_with_hospital_codes(running.his, ["H-AMOX", "H-COLD", "H-UNKNOWN"])
    before = len(running.journal())
    status, body = running.his_tcp.request("POST", "/", envelope.dumps({"infno": "2204", "input": input_}))
    assert status == 200 and body["fep_reason"] == "invalid"  # refused in the interface's own shape
    assert "2 fee item(s) cannot be uploaded" in body["err_msg"]
    assert "(H-COLD): national code XC03CCC003C003030300003 (复方感冒灵颗粒) is retired" in body["err_msg"]
    assert "(H-UNKNOWN): no mapping to a national code" in body["err_msg"]
    assert len(running.journal()) == before and "2204" not in {i for _, i in running.sim_answers()}


def diagnosis(world: World, visit: Visit, *lines: tuple[str, str, str, str]) -> tuple[int, dict]:
    """A 2203 with diagnosis lines (code, name, diag_time, vali_flag), as the HIS posts it."""
    diseinfo = [{"diag_type": "1", "diag_srt_no": str(n), "diag_code": code, "diag_name": name, "diag_dept": "内科",
                 "dise_dor_no": "D001", "dise_dor_name": "医生", "diag_time": at, "vali_flag": flag}
                for n, (code, name, at, flag) in enumerate(lines, start=1)]
    return world.his_tcp.request("POST", "/", envelope.dumps({"infno": "2203", "input": {
        "mdtrtinfo": {"mdtrt_id": visit.mdtrt_id, "psn_no": ZHANG["psn_no"], "med_type": "11",
                      "begntime": "2026-11-23 09:00:00"}, "diseinfo": diseinfo}}))


def test_a_diagnosis_unknown_or_retired_by_its_date_refuses_the_trade_with_one_error(running: World) -> None:
    fep(running, "catalog", "sync")
    visit = Visit(running.his, ZHANG)
    visit.open()  # its 2203 diagnoses J06.900, in the catalog
    before = len(running.journal())
    status, body = diagnosis(running, visit, ("J11.100", "流行性感冒", "2026-11-23 09:10:00", "1"),
                             ("X99.999", "笔误", "2026-11-23 09:10:00", "1"),
                             ("I10.x00", "高血压", "2026-11-23 09:10:00", "1"))
    assert status == 200 and body["fep_reason"] == "invalid"
    assert "2 diagnosis code(s) cannot be used" in body["err_msg"]
    assert "J11.100 (流行性感冒): retired in catalog 1307 since 2024-01-02" in body["err_msg"]
    assert "X99.999 (笔误): not in the bureau's catalog 1307" in body["err_msg"]
    assert "I10.x00" not in body["err_msg"] and len(running.journal()) == before
    # Diagnosed before it was retired, or withdrawn (vali_flag 0): the code may still go.
    assert diagnosis(running, visit, ("J11.100", "流行性感冒", "2024-01-01 10:00:00", "1"))[1]["infcode"] == 0
    assert diagnosis(running, visit, ("J11.100", "流行性感冒", "2026-11-23 09:10:00", "0"))[1]["infcode"] == 0


def test_the_diagnosis_check_is_switched_off_per_trade(world: World) -> None:
    world.configure(trades={"2203": {"check_diagnoses": None}})
    world.start()
    fep(world, "catalog", "sync")
    visit = Visit(world.his, ZHANG)
    visit.open()
    _, body = diagnosis(world, visit, ("X99.999", "笔误", "2026-11-23 09:10:00", "1"))
    assert body["infcode"] == 0 and world.bureau_request(body["fep_msgid"])["infno"] == "2203"  # the bureau judges
    stay = Stay(world.his, ZHANG)
    assert stay.admit()["infcode"] == 0
    _, changed = world.his_tcp.request("POST", "/", envelope.dumps({"infno": "2403", "input": {
        "adminfo": {"mdtrt_id": stay.mdtrt_id, "psn_no": ZHANG["psn_no"]},
        "diseinfo": [{"diag_type": "1", "diag_srt_no": "2", "diag_code": "X99.999", "diag_name": "笔误",
                      "diag_time": "2026-11-23 10:00:00", "vali_flag": "1"}]}}))
    assert changed["fep_reason"] == "invalid" and "X99.999" in changed["err_msg"]  # 2403 is still checked
