"""The pure pieces, without processes: msgid numbering, lenient answers, config and catalog errors."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import yaml

from fep import config, envelope
from fep.trades import TradeBook, TradesError
from fep.msgid import MsgidCounter, well_formed
from fep.sim.world import ROOT
from fep.states import FINAL, TRANSITIONS, State

SAMPLES = ROOT.parent / "shared" / "reference" / "samples"


def test_the_msgid_counter_never_repeats_a_number_not_after_9999_nor_when_the_clock_goes_back() -> None:
    c = MsgidCounter("H43010000001")
    t = datetime(2026, 11, 23, 9, 0, 0)
    ids = [c.next(t) for _ in range(10001)]
    assert len(set(ids)) == 10001 and all(well_formed(i) for i in ids)
    assert ids[9998].endswith("202611230900009999") and ids[9999].endswith("202611230900010001")
    restarted = MsgidCounter("H43010000001", c.state)  # after a restart, from what the journal stored
    earlier = restarted.next(datetime(2026, 11, 23, 8, 59, 0))  # the clock went back
    assert earlier not in ids and earlier > ids[-1]
    assert not well_formed("H4301000000120261399250000001") and not well_formed("not-a-msgid")
    assert not well_formed("H43010000001202602300900000001")  # 30 February
    assert not well_formed("H43010000001２０26112309000000001"[:30])  # full-width digits: not the bureau's form


@pytest.mark.skipif(not SAMPLES.exists(), reason="shared/reference/samples is not beside the checkout")
def test_every_real_bureau_answer_parses_with_exact_decimals() -> None:
    answers = {}
    for path in sorted(SAMPLES.glob("*-resp_*.json")):
        message = json.loads(path.read_text())["message"]
        answers[path.name[:4]] = answer = envelope.parse_bureau_answer(json.dumps(message).encode())
        assert answer.infcode in (0, 1, -1), path.name
        assert not any(isinstance(v, float) for v in _leaves(answer.raw)), path.name
    assert answers["2207"].ok and answers["2207"].output["setlinfo"]["medfee_sumamt"] == Decimal("4.52")
    assert answers["5203"].ok  # infcode "0" as a string, as that bureau sends it
    string_code = envelope.parse_bureau_answer(b'{"infcode": "0", "err_msg": null, "output": {}}')
    assert string_code.ok and string_code.err_msg == ""
    with pytest.raises(envelope.BadAnswer, match="no infcode"):
        envelope.parse_bureau_answer(b'{"output": {}}')


@pytest.mark.parametrize("body,reason", [
    (b'{"infcode":0,"output":{"a":"\xff"}}', "not JSON"), (rb'{"infcode":0,"output":{"a":"\ud800"}}', "surrogate"),
    (b'{"infcode":0,"output":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"infcode":0,"output":{"a":[1,]}}', "trailing comma"), (b'[{"infcode":0}]', "no infcode"),
    (b'{"infcode":0} x', "trailing characters"), (b'{"infcode":"0a"}', "non-numeric infcode"),
])
def test_a_bureau_answer_read_for_its_head_is_refused_for_what_is_wrong_anywhere_in_it(body: bytes, reason: str) -> None:
    with pytest.raises(envelope.BadAnswer, match=reason):
        envelope.parse_bureau_answer(body)


def test_a_bureau_answer_is_parsed_in_full_only_when_read() -> None:
    answer = envelope.parse_bureau_answer('\ufeff{"infcode":"0","err_msg":null,"output":{"结果":[1.10]}}'.encode())
    assert answer.ok and answer.err_msg == "" and "raw" not in vars(answer)
    assert answer.output == {"结果": [Decimal("1.10")]} and answer.raw["infcode"] == 0  # compared as a number


def _leaves(obj: object) -> list[object]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


def write(tmp: Path, change: dict) -> Path:
    doc = yaml.safe_load((ROOT / "conf" / "fep.yaml").read_text())
    doc["trades"] = str(ROOT / "conf" / "trades.yaml")
    for key, value in change.items():
        node = doc
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    (tmp / "fep.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    return tmp / "fep.yaml"


@pytest.mark.parametrize("change, message", [
    ({"institution.fixmedins_code": "H1"}, "institution.fixmedins_code must be 12 upper-case letters or digits"),
    ({"his.answer_within": 0.5}, "his.answer_within must be at least 1 s"),
    ({"his.infcode_type": "text"}, "his.infcode_type must be number or string"),
    ({"bureau.url_style": "soap"}, "bureau.url_style must be dispatcher, infno_path or per_trade"),
    ({"bureau.endpoints": [{"url": "http://bureau/"}]}, "bureau.endpoints[0].url must be https://host:port/path"),
    ({"bureau.tls.min_version": "1.0"}, "bureau.tls.min_version must be 1.2 or 1.3"),
    ({"journal": {}}, "journal.path is required"),
    ({"schedule.reconcile_daily_at": "25:00"}, "schedule.reconcile_daily_at must be a time of day HH:MM"),
    ({"his.allowed_networks": ["10.0.0.300/8"]}, "his.allowed_networks"),
])
def test_a_bad_config_is_refused_naming_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        config.load(write(tmp_path, change))


def test_a_bad_trade_catalog_is_refused_naming_the_trade(tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "conf" / "trades.yaml").read_text())
    for change, message in (({"2207": {"deferrable": True}}, "trade 2207: a money trade cannot be deferred"),
                            ({"2204": {"cancel": {"infno": "7777", "input": {}}}}, "cancelled by 7777"),
                            ({"2207": {"on_unknown": "pray"}}, "trades.2207.on_unknown must be one of reverse, resend, cancel, person, got 'pray'"),
                            ({"2206": {"timeout": 0}}, "trade 2206: timeout must be positive")):
        doc = json.loads(json.dumps(base))
        for infno, spec in change.items():
            doc["trades"][infno].update(spec)
        (tmp_path / "trades.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
        with pytest.raises(TradesError, match=message):
            TradeBook.load(tmp_path / "trades.yaml")


def test_every_state_is_reachable_and_every_open_state_can_end() -> None:
    reachable = {State.SENT, State.QUEUED} | {t for _, t in TRANSITIONS.values()}
    assert reachable == set(State)
    for state in set(State) - FINAL:
        assert any(state in sources for sources, _ in TRANSITIONS.values()), state


def test_a_body_is_read_back_as_it_was_sent_whether_stored_compressed_or_not() -> None:
    from fep.journal import COMPRESS_FROM, body_text, stored_body

    real = [json.dumps(json.loads(p.read_text())["message"], ensure_ascii=False, separators=(",", ":"))
            for p in sorted(SAMPLES.glob("*.json"))] if SAMPLES.exists() else []
    short = '{"infcode":0,"output":{}}'
    for text in [short, "结算" * 400, '{"input":{"data":{"psn_name":"张三"}}}' * 40, *real]:
        stored = stored_body(text)
        assert body_text(stored) == text  # every character, so every byte of its UTF-8
        if isinstance(stored, bytes):
            assert len(stored) <= len(text.encode()) * 3 // 4  # compressed only where it pays
    assert len(short) < COMPRESS_FROM and stored_body(short) == short
    assert isinstance(stored_body("结算" * 400), bytes)
    assert all(isinstance(stored_body(t), bytes) for t in real if len(t.encode()) > 1000)


def test_a_request_with_the_his_own_input_bytes_is_stored_as_it_is_sent() -> None:
    """The input compressed while fep checks it, the envelope around it after: one zlib stream of the very
    bytes the bureau is sent, as when the whole request is compressed at once."""
    from fep.journal import _request, body_bytes, pack, stored_body

    written = msgspec.Raw(b'{"feedetail": [' + b", ".join(b'{"feedetl_sn": "%d", "memo": "\\u738b"}' % i
                                                          for i in range(5000)) + b"]}")
    env = {"infno": "2301", "msgid": "M1", "input": {"not": "these"}, "sign_no": "S1"}
    request, stored = _request(env, written, pack(written))
    assert request == b'{"infno":"2301","msgid":"M1","input":' + bytes(written) + b',"sign_no":"S1"}'
    assert isinstance(stored, bytes) and body_bytes(stored) == request
    assert _request(env, written, None) == (request, stored_body(request))
    assert _request(env, None, None)[0] == envelope.dumps(env)
