"""The bureau's catalog kept current by version, the hospital's mapping, and fee lines mapped before upload."""

from __future__ import annotations

import json
import subprocess
import sys

from fep import envelope
from fep.sim.world import ZHANG, Visit, World

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


def visit_with_hospital_codes(world: World, codes: list[str]) -> tuple[Visit, dict]:
    visit = Visit(world.his, ZHANG, fees=[("", "1", "10.00")] * len(codes))
    visit.open()
    lines = [{"feedetl_sn": f"{visit.chrg_bchno}{i}", "mdtrt_id": visit.mdtrt_id, "psn_no": ZHANG["psn_no"],
              "chrg_bchno": visit.chrg_bchno, "fee_ocur_time": "2026-11-23 09:30:00", "medins_list_codg": code,
              "cnt": 1, "pric": "10.00", "det_item_fee_sumamt": "10.00"} for i, code in enumerate(codes)]
    return visit, {"feedetail": lines}


def test_fee_lines_with_hospital_codes_are_mapped_to_national_codes_before_upload(running: World, tmp_path) -> None:
    fep(running, "catalog", "sync")
    (tmp_path / "map.csv").write_text("hosp_code,national_code\nH-AMOX,XA01AAA001A001010100001\nH-CBC,250101001\n")
    fep(running, "catalog", "map", "import", str(tmp_path / "map.csv"))
    visit, input_ = visit_with_hospital_codes(running, ["H-AMOX", "H-CBC"])
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
    _, input_ = visit_with_hospital_codes(running, ["H-AMOX", "H-COLD", "H-UNKNOWN"])
    before = len(running.journal())
    status, body = running.his_tcp.request("POST", "/", envelope.dumps({"infno": "2204", "input": input_}))
    assert status == 200 and body["fep_reason"] == "invalid"  # refused in the interface's own shape
    assert "2 fee item(s) cannot be uploaded" in body["err_msg"]
    assert "(H-COLD): national code XC03CCC003C003030300003 (复方感冒灵颗粒) is retired" in body["err_msg"]
    assert "(H-UNKNOWN): no mapping to a national code" in body["err_msg"]
    assert len(running.journal()) == before and "2204" not in {i for _, i in running.sim_answers()}
