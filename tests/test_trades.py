"""The trade book (conf/trades.yaml, fep/trades.py): every trade of the national interface is known, each with
a kind and an unknown-outcome policy that hold together; a province's variant is its base trade; anything
else is refused. No processes: the catalog and the book alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fep import envelope
from fep.trades import InvalidInput, Kind, OnUnknown, TradeBook, TradesError, UnknownTrade

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "conf" / "trades.yaml"


@pytest.fixture(scope="module")
def book() -> TradeBook:
    return TradeBook.load(CATALOG)


def numbers(*spans: str) -> list[str]:
    """"2101-2103" -> 2101, 2102, 2103; "2203A" as it is."""
    out = []
    for s in spans:
        first, _, last = s.partition("-")
        out += [str(n) for n in range(int(first), int(last) + 1)] if last else [first]
    return out


# The trades issue 11 names as called by HIS programs daily, as they are in the Hunan V1.1.27 list (a range
# there means the numbers of that list inside it) and in the other provinces' sources.
DAILY = numbers("1201", "1304", "1312-1319", "1901", "2001", "2101-2103", "2203A", "2207A", "2501-2507",
                "3101-3103", "3203", "3204", "3260-3262", "3301", "3302", "3401-3403", "3501-3513", "4101-4105",
                "4201", "4261-4263", "4301", "4302", "4401", "4402", "4501-4512", "4601", "4602", "4701", "5101",
                "5102", "5201-5206", "5301-5304", "5401", "5402", "5461", "7101-7109", "7201-7211")
HN_REVERSIBLE = {"2102", "2207", "2304", "2401"}  # "可被冲正的交易包括" (HN 2601)
MONEY_PARKED_FOR_A_PERSON = {"6202"}  # its undo (6203) needs amounts from the answer fep did not get


def test_the_book_knows_every_trade_of_the_hunan_list_and_the_daily_ones(book: TradeBook) -> None:
    assert len(book.defs) >= 206
    missing = [n for n in DAILY if n not in book.defs]
    assert not missing, missing
    for t in book.defs.values():
        assert t.name and t.name.strip() == t.name, t.infno
        assert t.timeout < 60, t.infno  # his.answer_budget (conf/fep.yaml) must outwait every trade
    kinds = Counter(t.kind for t in book.defs.values())
    assert kinds[Kind.QUERY] > 90 and kinds[Kind.STATE] > 90 and kinds[Kind.MONEY] >= 4


def test_every_kind_and_policy_rule_holds(book: TradeBook) -> None:
    for t in book.defs.values():
        base = t.infno.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        paths = {p.partition(".")[2] for p in t.required}
        if t.kind is Kind.MONEY:  # reversible or cancelled, or (no automatic undo exists) a person decides
            assert t.on_unknown in (OnUnknown.REVERSE, OnUnknown.CANCEL) or (
                t.on_unknown is OnUnknown.PERSON and t.infno in MONEY_PARKED_FOR_A_PERSON), t.infno
            assert t.on_unknown is not OnUnknown.RESEND, t.infno
        if t.on_unknown is OnUnknown.REVERSE:  # only what the bureau's 2601 undoes, and with its psn_no
            assert base in HN_REVERSIBLE and "psn_no" in paths, t.infno
        if t.on_unknown is OnUnknown.CANCEL or t.cancel:
            assert t.cancel and t.cancel.infno in book.defs, t.infno
        if t.kind is Kind.UNDO_MONEY:  # a cancel is a settlement of its own: never erased by fep's 2601
            assert t.on_unknown is not OnUnknown.REVERSE, t.infno
            if "psn_no" in paths:  # the bureau's cancels: refund order needs the person and the settlement
                assert {"setl_id", "psn_no"} <= paths, t.infno
        if t.deferrable:  # an upload the bureau takes later, queued per person
            assert t.kind is Kind.STATE and "psn_no" in paths, t.infno
        if t.kind in (Kind.QUERY, Kind.COMPUTE):  # nothing changed at the bureau: ask again
            assert t.on_unknown is OnUnknown.RESEND and not t.deferrable, t.infno
        if t.moves_money and "psn_no" in paths:
            assert not t.deferrable and t.timeout >= 20, t.infno
    assert {t.infno for t in book.defs.values() if t.from_his.value == "session"} == {"9001", "9002"}
    assert {t.infno for t in book.defs.values() if t.from_his.value == "reversal"} == {"2601"}
    settling = {t.infno for t in book.defs.values() if t.kind is Kind.MONEY and t.on_unknown is OnUnknown.REVERSE}
    assert settling == {"2102", "2207", "2207A", "2304"}
    assert {t.infno for t in book.defs.values() if t.deferrable} >= {"2203", "2204", "2301", "2302", "2402"}


def test_a_cancel_is_built_from_the_original_it_undoes(book: TradeBook) -> None:
    lines = [{"feedetl_sn": "1", "mdtrt_id": "300170001", "psn_no": "P1", "chrg_bchno": "B1",
              "medins_list_codg": "H-1"}]
    assert book.get("2204").cancel_input({"feedetail": lines}) == {
        "data": {"mdtrt_id": "300170001", "chrg_bchno": "B1", "psn_no": "P1"}}
    assert book.get("2301").cancel_input({"feedetail": lines}) == {
        "data": {"feedetl_sn": "0000", "mdtrt_id": "300170001", "psn_no": "P1"}}


def test_a_variant_takes_its_base_definition(book: TradeBook) -> None:
    listed, base = book.get("2207A"), book.get("2207")
    assert listed.infno == "2207A" and listed.kind is Kind.MONEY and listed.moves_money
    assert (listed.on_unknown, listed.required, listed.timeout) == (base.on_unknown, base.required, base.timeout)
    assert "2207A" in book.defs  # money: known from the start, so refund order and reconciliation see it
    assert book.get("2203A").deferrable and book.get("2203A").name == "药店门诊就诊信息上传"

    derived = book.get("5203B")  # nobody named it: derived from 5203 on first use
    assert (derived.infno, derived.name, derived.kind) == ("5203B", "结算信息查询(5203B)", Kind.QUERY)
    assert book.get("5203B") is derived and "5203B" not in book.defs
    upload = book.get("2204B")
    assert upload.deferrable and upload.map_codes == "feedetail" and upload.cancel.infno == "2205"

    with pytest.raises(UnknownTrade, match="is not in the trade catalog.*would move money.*define 2207B"):
        book.get("2207B")  # an unnamed money variant could be missed by refund order: refused until listed
    with pytest.raises(UnknownTrade, match="define 2208C"):
        book.get("2208C")


def test_the_config_names_a_variant_and_overrides_it() -> None:
    b = TradeBook.load(CATALOG, {"3203B": {"timeout": 25}, "2102A": {}, "2207": {"timeout": 5}})
    assert b.defs["3203B"].timeout == 25 and b.defs["3203B"].name == "清算申请(3203B)"
    assert b.defs["2102A"].moves_money and b.defs["2102A"].on_unknown is OnUnknown.REVERSE  # known from the start
    assert b.defs["2207A"].timeout == 5  # the base's override holds for its variant too
    b = TradeBook.load(CATALOG, {"2207": {"timeout": 5}, "2207A": {"timeout": 7}})
    assert (b.defs["2207"].timeout, b.defs["2207A"].timeout) == (5, 7)
    with pytest.raises(TradesError, match="trade_overrides names trade 2270, which is not in the trade catalog"):
        TradeBook.load(CATALOG, {"2270": {"on_unknown": "reverse"}})  # a typo is not silently ignored


@pytest.mark.parametrize("infno", ["8888", "99999", "8888A", "3205B", "2207AB", "22O7", "2207a"])
def test_a_trade_number_nobody_has_heard_of_is_still_refused(book: TradeBook, infno: str) -> None:
    with pytest.raises(UnknownTrade, match=f"trade {infno} is not in the trade catalog"):
        book.get(infno)


BASELINE_1101 = """{
  "infno": "1101", "msgid": "H00000000001202001041235391234", "insuplc_admdvs": "100000",
  "mdtrtarea_admvs": "100000", "recer_sys_code": "MBS_LOCAL", "dev_no": "", "dev_safe_info": "", "cainfo": "",
  "infver": "V1.0", "opter_type": "1", "opter": "01", "opter_name": "张三", "inf_time": "2020-01-04 12:35:39",
  "fixmedins_code": "100001", "fixmedins_name": "第一人民医院", "sign_no": "79faf82271944fe38c4f1d99be71bc9c",
  "input": {"data": {"psn_cert_type": "2", "certno": "510000202001010000", "psn_name": "李四",
                     "begntime": "2020-01-01"}}
}"""  # HN 附录B B.1, verbatim but for the line breaks


def test_the_baseline_s_own_1101_example_validates(book: TradeBook) -> None:
    req = envelope.parse_his_request(BASELINE_1101.encode("utf-8"))
    book.get(req.infno).validate(req.input)
    # What fep's guarantees need is still checked: a settlement without its visit is refused before it is journalled.
    with pytest.raises(InvalidInput, match="2207 门诊结算: input is missing data.mdtrt_id"):
        book.get("2207").validate({"data": {"psn_no": "P1"}})
    with pytest.raises(InvalidInput, match="data.setl_id"):
        book.get("2305").validate({"data": {"psn_no": "P1", "mdtrt_id": "M1"}})
    with pytest.raises(InvalidInput, match="data.omsgid"):
        book.get("2601").validate({"data": {"psn_no": "P1", "oinfno": "2304"}})


@pytest.mark.parametrize("lines", [
    [{"mdtrt_id": "M1", "psn_no": "P1", "medins_list_codg": "H-CBC"}, {"mdtrt_id": "M1", "psn_no": "P1"}],
    [{"mdtrt_id": "M1", "psn_no": "P1", "medins_list_codg": "H-CBC"},
     {"mdtrt_id": "M1", "psn_no": None, "medins_list_codg": "H-CBC"}],
    [{"mdtrt_id": "M1", "psn_no": "", "medins_list_codg": "H-CBC"}],
    [{"mdtrt_id": "M1", "psn_no": 7, "medins_list_codg": "H-CBC"}, {"mdtrt_id": "M1", "psn_no": "", "medins_list_codg": "H-CBC"}],
    [{"mdtrt_id": "M1", "psn_no": "P1", "medins_list_codg": "H-CBC"}, "not a line"],
    [{"mdtrt_id": "M1", "psn_no": "P1", "medins_list_codg": "H-CBC"}, None],
    [{"mdtrt_id": "M1", "psn_no": "P1", "medins_list_codg": "H-CBC"}, ["a", "list"]],
    [],
])
def test_an_upload_with_one_line_short_of_a_required_field_is_refused_naming_it(book: TradeBook, lines) -> None:
    with pytest.raises(InvalidInput, match="2301 住院费用明细上传: input is missing feedetail"):
        book.get("2301").validate({"feedetail": lines})
    book.get("2301").validate({"feedetail": [{"mdtrt_id": "M1", "psn_no": 0, "medins_list_codg": "H-CBC"}] * 3})


@pytest.mark.parametrize("change, message", [
    ({"2205": {"required": []}}, "trade 2205: deferred work waits in its insured person's queue"),
    ({"2304": {"on_unknown": "resend"}}, "trade 2304: the unknown outcome of a money trade is never resolved by "
                                         "sending it again"),
    ({"2401": {"required": []}}, "trade 2401: its 2601 reversal carries the original's psn_no"),
    ({"2204": {"required": ["feedetail.psn_no"]}}, "trade 2204: its cancel 2205 is built from feedetail.chrg_bchno, "
                                                    "feedetail.mdtrt_id, which the trade does not require"),
    ({"5203": {"deferrable": True}}, "trade 5203: a query trade cannot be deferred"),
    ({"2207A": {"deferrable": True}}, "trade 2207A: a money trade cannot be deferred"),
])
def test_the_catalog_refuses_a_rule_fep_cannot_keep(tmp_path: Path, change: dict, message: str) -> None:
    doc = yaml.safe_load(CATALOG.read_text(encoding="utf-8"))
    for infno, spec in json.loads(json.dumps(change)).items():
        doc["trades"][infno].update(spec)
    (tmp_path / "trades.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(TradesError, match=message):
        TradeBook.load(tmp_path / "trades.yaml")
