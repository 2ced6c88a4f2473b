"""Files as the bureaus send them: the catalogs in their real layouts (1301–1327 through 9102, the paged
1312/1316–1319 to the last page), 9101 as JSON or as the baseline's multipart form, 9102 as a stream, and
the 3202 result file."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import zipfile
from contextlib import closing

import pytest

from fep import catalogs, envelope
from fep.sim.world import World
from tests.test_catalog import fep as fep_cli


def catalog_rows(world: World, infno: str) -> list[dict]:
    with closing(sqlite3.connect(f"file:{world.journal_path}?mode=ro", uri=True)) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute(f"SELECT * FROM catalog_{infno}")]


def sync(world: World) -> dict:
    run = fep_cli(world, "catalog", "sync", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_every_catalog_arrives_in_its_real_layout_and_is_kept_by_code_and_version(running: World) -> None:
    doc = sync(running)
    assert doc["failed"] == []
    assert set(doc["downloads"]) == set(catalogs.LAYOUTS) | set(catalogs.PAGED)
    # 1301 as the bureau lays it out: 97 columns, every version of a code kept, the newest in force.
    drugs = catalog_rows(running, "1301")
    assert len(drugs[0]) == 97 and list(drugs[0])[:4] == ["医疗目录编码", "药品商品名", "通用名编号", "药品通用名"]
    cold = sorted((r["版本号"], r["有效标志"]) for r in drugs if r["医疗目录编码"] == "XC03CCC003C003030300003")
    assert cold == [("1", "1"), ("3", "0")]
    assert doc["downloads"]["1307"] == {"from_version": "v0000", "rows": 7, "to_version": "2"}
    assert {r["诊断代码"] for r in catalog_rows(running, "1307")} >= {"J06.900", "I10.x00"}
    # The catalog files came with 9102 from the bureau's policy store (fixmedins_code "plc"), as files.
    downloads = running.journal("infno = '9102'")
    assert {envelope.loads(r["request"])["input"]["fsDownloadIn"]["fixmedins_code"] for r in downloads} == {"plc"}
    assert all(set(envelope.loads(r["answer"])["output"]) == {"file"} for r in downloads)
    # The paged queries: 1312 lists the catalog's codes, 1319 the self-pay shares of its 乙类 items.
    assert doc["downloads"]["1312"] == {"from_update": "2000-01-01", "pages": 1, "rows": 8}
    assert {r["hilist_code"] for r in catalog_rows(running, "1319")} == {"XB02BBB002B002020200002",
                                                                         "XC03CCC003C003030300003"}
    again = sync(running)
    assert again["downloads"]["1301"] == {"from_version": "3", "rows": 0, "to_version": "3"}
    assert len(catalog_rows(running, "1312")) == 8  # asked again from the last update: upserted, not doubled


def test_a_national_size_catalog_and_a_long_paged_query_are_read_to_the_end(world: World) -> None:
    world.configure(sim={"catalog_bulk": {"1301": 20000, "1312": 250}})
    world.start()
    doc = sync(world)
    assert doc["downloads"]["1301"]["rows"] == 20005 and doc["codes"] == 20006
    assert doc["downloads"]["1312"] == {"from_update": "2000-01-01", "pages": 3, "rows": 258}
    assert len(world.journal("infno = '1312'")) == 3  # every page a trade of its own, journalled


def upload(world: World, content: bytes, name: str = "detail.zip") -> dict:
    return world.his.call("9101", {"fsUploadIn": {"in": base64.b64encode(content).decode(), "filename": name,
                                                  "fixmedins_code": "H43010000001"}})


@pytest.mark.parametrize("form", ["json", "multipart"])
def test_9101_goes_to_the_bureau_in_the_form_it_takes_and_9102_brings_the_same_bytes_back(world: World,
                                                                                         form: str) -> None:
    world.configure(fep={"bureau": {"file_upload": form}}, sim={"file_upload": form})
    world.start()
    content = catalogs.pack("20261201.txt", [["S1", "M1", "P1", "10.00", "8.00", "0.00", "0"]])
    up = upload(world, content)
    assert up["infcode"] == 0, up
    arrived = world.bureau_request(up["fep_msgid"])["input"]["fsUploadIn"]
    assert base64.b64decode(arrived["in"]) == content and arrived["filename"] == "detail.zip"
    down = world.his.call("9102", {"fsDownloadIn": {"file_qury_no": up["output"]["file_qury_no"],
                                                    "filename": "detail.zip", "fixmedins_code": "H43010000001"}})
    assert envelope.file_content(down["output"]) == content and down["output"]["file"]["filename"] == "detail.zip"


def test_a_bureau_that_takes_only_the_form_refuses_the_json_upload(world: World) -> None:
    world.configure(sim={"file_upload": "multipart"})  # fep left at its default, bureau.file_upload: json
    world.start()
    refused = upload(world, catalogs.pack("x.txt", [["a"]]))
    assert refused["infcode"] != 0 and "multipart/form-data" in refused["err_msg"]


def test_a_9102_the_bureau_cannot_serve_comes_back_as_its_json_error(running: World) -> None:
    answer = running.his.call("9102", {"fsDownloadIn": {"file_qury_no": "F99999999", "filename": "none.zip",
                                                        "fixmedins_code": "H43010000001"}})
    assert answer["infcode"] != 0 and "F99999999" in answer["err_msg"]
    # A catalog file is in the policy centre's store: asked for with the hospital's own code, it is not there.
    catalog = running.his.call("1301", {"data": {"ver": "v0000"}})["output"]
    elsewhere = running.his.call("9102", {"fsDownloadIn": {"file_qury_no": catalog["file_qury_no"],
                                                           "filename": catalog["filename"],
                                                           "fixmedins_code": "H43010000001"}})
    assert elsewhere["infcode"] != 0 and "不存在" in elsewhere["err_msg"]


def test_the_3202_result_file_is_read_in_its_real_layout(running: World) -> None:
    from tests.test_reconcile import reconcile, settled, settled_behind_fep
    from fep.sim.world import ZHANG

    settled(running, ZHANG)
    rogue = settled_behind_fep(running, ZHANG, 9995)
    doc = json.loads(reconcile(running, "--json").stdout)
    assert [d["msgid"] for g in doc["groups"] for d in g["differences"]] == [rogue]
    result = envelope.file_content(envelope.loads(running.journal("infno = '9102'")[-1]["answer"])["output"])
    with zipfile.ZipFile(io.BytesIO(result)) as z:
        lines = z.read("result.txt").decode("utf-8").splitlines()
    rows = [dict(zip(catalogs.STATEMENT_RESULT, line.split("\t"))) for line in lines]
    assert all(len(line.split("\t")) == 10 for line in lines)
    assert {r["msgid"]: r["stmt_rslt"] for r in rows}[rogue] == "1"
    assert {r["stmt_rslt"] for r in rows if r["msgid"] != rogue} == {"0"}


def zipped(text: str, name: str = "1305.txt") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, text.encode("utf-8"))
    return buf.getvalue()


def test_a_file_is_read_as_its_layout_says_even_from_an_older_bureau_or_a_windows_tool() -> None:
    """1305 before V1.1.23 had no 生效时间 (18 columns, not 19); a BOM and CRLF as Windows tools write them."""
    layout = catalogs.LAYOUTS["1305"]
    old = ["001102000010000", "次", "null", "null", "null", "null", "1", "null", "null", "普通门诊诊查费", "null",
           "2024-01-01", "null", "R1", "1.0.9", "null", "1", "T1"]
    [row] = catalogs.unpack(zipped("\ufeff" + "\t".join(old) + "\r\n"), layout.fields, (layout.code, "版本号"), "1305")
    assert row["医疗目录编码"] == "001102000010000" and row["医疗服务项目名称"] == "普通门诊诊查费"
    assert row["生效时间"] is None and row["诊疗项目说明"] is None and len(row) == 19
    no_version = "\t".join(old[:14])
    with pytest.raises(catalogs.FileLayoutError, match="1305: line 2 has 14 field.s. and lacks 版本号"):
        catalogs.unpack(zipped("\t".join(old) + "\n" + no_version), layout.fields, (layout.code, "版本号"), "1305")


def test_a_bureau_upload_form_fep_does_not_know_is_refused_naming_the_key(tmp_path) -> None:
    from fep import config
    from tests.test_units import write

    with pytest.raises(config.ConfigError, match="bureau.file_upload must be json or multipart, got 'ftp'"):
        config.load(write(tmp_path, {"bureau.file_upload": "ftp"}))
