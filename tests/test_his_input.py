"""Issue 12: input fep must refuse rather than fail on or forward: a lone surrogate, deep nesting, a key twice,
and amounts that are not exact decimals of their places within a sane bound. Each is refused in the shape
issue 9 sets (HTTP 200, infcode -1, fep_state REFUSED, fep_reason), naming the problem; nothing is sent."""

from __future__ import annotations

import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer

from fep import envelope
from fep.his import HisService
from fep.http11 import Request
from fep.sim.world import ROOT, Visit, ZHANG
from fep.trades import TradeBook

BOOK = TradeBook.load(ROOT / "conf" / "trades.yaml")


class _Engine:
    """What HisService needs of the engine; a trade that gets through is recorded, not sent."""

    trades = BOOK
    cfg = SimpleNamespace(his=SimpleNamespace(infcode_type="number", file_answers="file"))

    def __init__(self) -> None:
        self.submitted: list[envelope.HisRequest] = []

    async def submit(self, req: envelope.HisRequest) -> Any:
        self.submitted.append(req)
        from fep.replies import Reply
        return Reply({"infcode": 0, "fep_state": "ANSWERED"})


def post(body: bytes, charset: str | None = None) -> tuple[int, dict[str, Any], _Engine]:
    engine = _Engine()
    ctype = "application/json" + (f"; charset={charset}" if charset else "")
    d = defer.ensureDeferred(HisService(engine).handle(Request("POST", "/x", {"content-type": ctype}, body)))
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the HIS service did not answer at once"
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    resp = box[0]
    return resp.status, envelope.loads(resp.body), engine


def refused(body: bytes, *words: str, charset: str | None = None) -> str:
    status, doc, engine = post(body, charset)
    assert status == 200, (status, doc)
    assert doc["infcode"] == -1 and doc["fep_state"] == "REFUSED" and doc["fep_reason"] == "invalid", doc
    assert not engine.submitted
    for word in words:
        assert word in doc["err_msg"], doc["err_msg"]
    return doc["err_msg"]


def trade(infno: str, input_text: str) -> bytes:
    return ('{"infno":"%s","input":%s}' % (infno, input_text)).encode("utf-8")


@pytest.mark.parametrize("charset", [None, "gbk"])
@pytest.mark.parametrize("escape", [r"\ud800", r"\udbff", r"\udc00", r"\ud800\u0041", "x\\udfffy"])
def test_lone_surrogate_is_refused_naming_it(escape: str, charset: str | None) -> None:
    refused(trade("1101", '{"data":{"psn_no":"%s"}}' % escape), "lone UTF-16 surrogate", charset=charset)


def test_a_surrogate_pair_is_a_character() -> None:
    status, doc, engine = post(trade("1101", r'{"data":{"psn_name":"\ud83d\ude00","mdtrt_cert_type":"02"}}'))
    assert engine.submitted and engine.submitted[0].input["data"]["psn_name"] == "\U0001F600"


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    refused(trade("1101", "[" * depth + "]" * depth), "nested", "32")


def test_nesting_as_deep_as_any_trade_goes_through() -> None:
    _, _, engine = post(trade("1101", '{"data":{"a":[[[[{"b":[1]}]]]]}}'))
    assert engine.submitted


@pytest.mark.parametrize("text", ['{"data":{"psn_no":"1","psn_no":"2"}}', '{"data":{},"data":{}}',
                                  '{"data":{"x":[{"k":1,"k":1}]}}', '{"data":[{"a":"1"},{"b":{"k":"1","k":"2"}}]}',
                                  '{"data":[{"k":":","k":" :"}]}'])
def test_a_key_twice_is_refused_naming_it(text: str) -> None:
    refused(trade("1101", text), "twice")


def test_a_key_twice_at_the_top() -> None:
    refused(b'{"infno":"1101","infno":"2207","input":{}}', "'infno' twice")


def test_colons_and_quotes_inside_strings_are_not_keys() -> None:
    _, _, engine = post(trade("1101", r'{"data":{"memo":"a:b \":\" c\\","x":"::"}}'))
    assert engine.submitted


@pytest.mark.parametrize("text", ['{"data":{"memo":":x","y":" : z"}}', '{"data":[{"memo":":"},{"memo":"x:"}]}',
                                  '{"data":{":":1,"a":{"\\u0022":":"}}}'])
def test_a_text_that_begins_with_a_colon_is_not_a_key(text: str) -> None:
    _, _, engine = post(trade("1101", text))
    assert engine.submitted


@pytest.mark.parametrize("value,words", [
    ("1E+999999999", ("medfee_sumamt", "below")), ("1e10", ("below",)), ("-10000000000", ("below",)),
    ('"100.005"', ("more than 2 decimal places",)), ("100.005", ("more than 2",)), ('"1e5"', ("plain decimal",)),
    ("true", ("must be a number",)), ('"abc"', ("plain decimal",)), ("[1]", ("must be a number",)),
    ('"NaN"', ("plain decimal",)), ('"Infinity"', ("plain decimal",)),
    ('"１００.００"', ("plain decimal",)), ('"١٠٠"', ("plain decimal",)),  # full-width and Arabic-Indic digits
])
def test_amounts_are_exact_decimals_within_bound(value: str, words: tuple[str, ...]) -> None:
    text = '{"data":{"psn_no":"P1","mdtrt_id":"M1","chrg_bchno":"C1","medfee_sumamt":%s}}' % value
    refused(trade("2207", text), *words)


@pytest.mark.parametrize("field,value", [("pric", "0.1234567"), ("cnt", "1.23456"), ("det_item_fee_sumamt", "1.001"),
                                         ("fulamt_ownpay_amt", "9999999999.999")])
def test_fee_lines_are_checked_wherever_they_are(field: str, value: str) -> None:
    line = {"feedetl_sn": "1", "psn_no": "P1", "cnt": "1", "pric": "1.00", "det_item_fee_sumamt": "1.00"}
    line[field] = value
    text = envelope.dumps({"feedetail": [{"feedetl_sn": "0"}, line]}).decode()
    refused(trade("2204", text), f"input.feedetail[1].{field}")


def ward_lines(n: int) -> list[dict[str, Any]]:
    """Fee lines whose numbers are JSON numbers, as most HIS programs write them."""
    return [{"feedetl_sn": str(i), "psn_no": "P1", "cnt": 2, "pric": Decimal("12.50"),
             "det_item_fee_sumamt": Decimal("25.00")} for i in range(n)]


@pytest.mark.parametrize("field,value", [("pric", "0.1234567"), ("cnt", "10000000000"), ("cnt", "1.00001"),
                                         ("det_item_fee_sumamt", "1.001"), ("det_item_fee_sumamt", "1E+999999999"),
                                         ("det_item_fee_sumamt", "-10000000000.00")])
def test_one_bad_number_among_a_wards_good_ones_is_named(field: str, value: str) -> None:
    lines = ward_lines(50)
    lines[37][field] = Decimal(value)
    refused(trade("2204", envelope.dumps({"feedetail": lines}).decode()), f"input.feedetail[37].{field}")


def test_numbers_with_trailing_zeros_or_ints_among_decimals_go_through() -> None:
    lines = ward_lines(50)
    lines[3].update(cnt=Decimal("2.50000"), pric=Decimal("12.500000000"), det_item_fee_sumamt=31)
    lines[4].update(cnt=Decimal("-1"), det_item_fee_sumamt=Decimal("9999999999.99"))
    _, _, engine = post(trade("2204", envelope.dumps({"feedetail": lines}).decode()))
    assert engine.submitted


def test_only_the_inputs_numbers_are_the_trades_amounts() -> None:
    body = b'{"infno":"2207","memo_amt":"not a number","input":{"data":{"psn_no":"P1","medfee_sumamt":"1.00"}}}'
    _, _, engine = post(body)
    assert engine.submitted


def test_an_input_sent_as_a_json_string_has_its_amounts_checked() -> None:
    inner = envelope.dumps({"feedetail": ward_lines(3)[:2] + [{"feedetl_sn": "2", "pric": Decimal("1.0000001")}]})
    refused(envelope.dumps({"infno": "2204", "input": inner.decode()}), "input.feedetail[2].pric")


def test_an_amount_inside_an_object_of_a_fee_line_is_checked() -> None:
    lines = [{"feedetl_sn": "0", "cnt": 1}, {"feedetl_sn": "1", "extra": {"memo": "x", "ownpay_amt": "1.001"}}]
    refused(trade("2204", envelope.dumps({"feedetail": lines}).decode()), "input.feedetail[1].extra.ownpay_amt")


@pytest.mark.parametrize("value", ['"100.00"', "100.00", "100", "9999999999.99", '"-0.50"', '""', "null", "0.1E1",
                                   '"100.000"'])
def test_good_amounts_go_through(value: str) -> None:
    text = '{"data":{"psn_no":"P1","mdtrt_id":"M1","chrg_bchno":"C1","medfee_sumamt":%s}}' % value
    _, _, engine = post(trade("2207", text))
    assert engine.submitted


def test_prices_and_quantities_have_their_own_places() -> None:
    line = {"feedetl_sn": "1", "cnt": Decimal("0.3333"), "pric": Decimal("0.034567"), "det_item_fee_sumamt": "0.01"}
    _, _, engine = post(trade("2204", envelope.dumps({"feedetail": [line]}).decode()))
    assert engine.submitted


def test_the_worlds_uploads_go_through_and_a_big_one_is_read_quickly() -> None:
    visit = Visit(None, ZHANG)  # type: ignore[arg-type]
    body = envelope.dumps({"infno": "2301", "input": visit.inpatient_fees(5000)})
    started = time.perf_counter()
    envelope.parse_his_request(body)
    assert time.perf_counter() - started < 1.0


def test_the_input_goes_on_in_the_his_own_bytes_when_fep_read_it_as_it_is() -> None:
    """The journal keeps, and the bureau is sent, the input as the HIS wrote it (its spacing, escapes and
    trailing zeros), not encoded again; an input fep rewrote as it read it is encoded from what fep holds."""
    written = b'{ "feedetail" : [ {"cnt": 1.50, "bilg_dr_name": "\\u738b", "pric": 2.0} ] }'
    req = envelope.parse_his_request(b'\xef\xbb\xbf{"infno": "2301", "msgid": "M1", "input": ' + written + b"}")
    assert bytes(req.input_json) == written  # type: ignore[arg-type]
    assert envelope.loads(envelope.dumps({**req.envelope, "input": req.input_json})) == req.envelope

    as_string = envelope.parse_his_request(b'{"infno": "2207", "input": "{\\"data\\": {}}"}')
    as_bytes = envelope.parse_his_request(b'{"infno": "9101", "input": {"fsUploadIn": {"in": [1, -1]}}}')
    in_gbk = envelope.parse_his_request('{"infno": "2301", "input": {"x": "王"}}'.encode("gbk"), "gbk")
    assert as_string.input_json is None and as_bytes.input_json is None and in_gbk.input_json is None
