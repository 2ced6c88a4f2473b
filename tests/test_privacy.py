"""Issue 12, privacy: a lookup on the HIS side shows state and codes only (the full answer goes to a
resubmission of the same msgid and payload, and to the admin socket); the two sockets have separate groups;
the log mask catches every ID-number shape, psn_no and names, on every log path."""

from __future__ import annotations

import json
from typing import Any

from fep import envelope
from fep.sim.world import Visit, World, ZHANG, his_msgid

PERSONAL = ("psn_name", "certno", "brdy", "balc", "psn_no", "gend", "age")


def _keys(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in _keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in _keys(v)}
    return set()


def test_a_lookup_shows_state_and_codes_never_the_person(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    msgid = his_msgid(1)
    status, full = visit.post("1101", visit.identity_input(), msgid=msgid)
    assert status == 200 and full["infcode"] == 0 and full["output"]["baseinfo"]["psn_name"]
    looked = running.his.lookup(msgid)
    assert looked["infcode"] == 0 and looked["fep_state"] == "ANSWERED" and looked["fep_msgid"]
    assert not _keys(looked["output"]) & set(PERSONAL), looked
    text = json.dumps(looked, ensure_ascii=False)
    for value in (ZHANG["certno"], ZHANG["psn_no"], full["output"]["baseinfo"]["psn_name"]):
        assert value not in text, (value, looked)
    # The same msgid and payload again: the HIS that sent it hears the whole answer.
    again = visit.post("1101", visit.identity_input(), msgid=msgid)[1]
    assert again["output"] == full["output"]
    # The admin socket keeps the full view.
    shown = json.loads(running.cli("show", looked["fep_msgid"], "--json").stdout)
    assert shown["answer"]["output"]["baseinfo"]["certno"] == ZHANG["certno"]


def test_a_settlements_lookup_keeps_what_the_his_acts_on(running: World) -> None:
    visit = Visit(running.his, ZHANG)
    visit.up_to_settlement()
    msgid = his_msgid(2)
    settled = visit.settle(msgid=msgid)
    assert settled["infcode"] == 0 and settled["output"]["setlinfo"]["psn_name"]
    looked = running.his.lookup(msgid)
    setl = looked["output"]["setlinfo"]
    assert setl["setl_id"] == settled["output"]["setlinfo"]["setl_id"]
    assert setl["mdtrt_id"] == settled["output"]["setlinfo"]["mdtrt_id"]
    assert envelope.loads(envelope.dumps(setl["medfee_sumamt"])) == settled["output"]["setlinfo"]["medfee_sumamt"]
    assert not _keys(looked) & set(PERSONAL), looked


# ---- the log mask -------------------------------------------------------------------------------------------
import pytest  # noqa: E402
from twisted.internet import defer  # noqa: E402
from twisted.logger import Logger, globalLogPublisher  # noqa: E402

from fep import logs  # noqa: E402
from fep.session import Session  # noqa: E402

CERTNO, PSN_NO, NAME = "430102198001010011", "43010000000000000001", "张三"
# The shapes the bureau's text and fep's own lines carry them in (issue 12).
SHAPES = [f"ID{CERTNO}", f"{CERTNO}abc", "430102-19800101-0011", "430102 19800101 0011", "4301 0219 8001 0100 11",
          "43010219800101001X", "43010219800101001x", f"psn_no={PSN_NO}", f"人员编号[{PSN_NO}]不存在",
          f'"psn_name": "{NAME}"', f"psn_name={NAME}", f"姓名：{NAME}", f"{NAME}({CERTNO})", f"参保人{NAME} {CERTNO}",
          "130102800101001", f"certno:{CERTNO}"]
SECRETS = [CERTNO, PSN_NO, NAME, "19800101", "800101001", "0219 8001"]


def _lines(emit: Any) -> str:
    """What the daemon's log observer writes while `emit` runs, every line."""
    import io
    import sys
    out, saved = io.StringIO(), sys.stderr
    sys.stderr = out
    globalLogPublisher.addObserver(logs.observer)
    try:
        emit()
    finally:
        globalLogPublisher.removeObserver(logs.observer)
        sys.stderr = saved
    return out.getvalue()


def _clean(text: str) -> None:
    assert text.strip(), "nothing was logged"
    for secret in SECRETS:
        assert secret not in text, (secret, text)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_masked_in_a_message(shape: str) -> None:
    _clean(_lines(lambda: Logger().warn("{infno} {msgid} refused by the bureau: {err}; trying again",
                                         infno="2601", msgid="H43010000099202612010925170002", err=shape)))


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_masked_in_a_traceback(shape: str) -> None:
    def fail() -> None:
        try:
            raise RuntimeError(f"bureau said: {shape}")
        except RuntimeError:
            Logger().failure("a resolution step failed; it is tried again")
    _clean(_lines(fail))


def test_the_sign_in_failed_path_masks_the_bureaus_text() -> None:
    async def refused() -> str:
        raise RuntimeError("签到失败: " + "; ".join(SHAPES))
    session = Session(lambda: 1.7e9, refused, ())
    text = _lines(lambda: defer.ensureDeferred(session.ensure()))
    assert "sign-in (9001) failed" in text
    _clean(text)


def test_msgids_and_times_stay_whole() -> None:
    line = logs.mask("2207 H43010000099202612010925170002 at 2026-11-23 09:30:00 medfee 123.45 setl_id S0001")
    assert line == "2207 H43010000099202612010925170002 at 2026-11-23 09:30:00 medfee 123.45 setl_id S0001"


# ---- the admin socket: a malformed call is a 4xx naming the problem ------------------------------------------
from types import SimpleNamespace  # noqa: E402

from fep.admin import AdminService  # noqa: E402
from fep.http11 import Request  # noqa: E402


class _Journal:
    async def find(self, flt: Any) -> list[Any]:
        if flt.limit > 2 ** 63 - 1:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return []


class _AdminEngine:
    journal = _Journal()

    async def reverse(self, *args: Any) -> Any:
        return SimpleNamespace(body={"reversed": args})

    async def replay(self, msgid: str) -> Any:
        return SimpleNamespace(body={"replayed": msgid})

    async def drop(self, msgid: str, reason: str) -> Any:
        return SimpleNamespace(body={"dropped": msgid, "reason": reason})


def _admin(method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    async def reload() -> str:
        return "applied"
    service = AdminService(_AdminEngine(), reload)  # type: ignore[arg-type]
    box: list[Any] = []
    defer.ensureDeferred(service.handle(Request(method, path, {}, body))).addBoth(box.append)
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0].status, envelope.loads(box[0].body)


@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/reverse", b"", 400, "MSGID"), ("POST", "/replay", b"", 400, "MSGID"), ("POST", "/drop", b"", 400, "MSGID"),
    ("POST", "/reverse/M1", b"[1, 2]", 400, "JSON object"), ("POST", "/reverse/M1", b"{bad", 400, "not JSON"),
    ("POST", "/drop/M1", b'"why"', 400, "JSON object"), ("POST", "/reverse/M1", b'{"psn_no": [1]}', 400, "psn_no"),
    ("GET", "/trades?limit=99999999999999999999", b"", 400, "limit"), ("GET", "/trades?limit=-1", b"", 400, "limit"),
    ("GET", "/trades?limit=x", b"", 400, "limit"), ("GET", "/trades?since=0001-01-01", b"", 400, "0001-01-01"),
    ("GET", "/trades?since=yesterday", b"", 400, "yesterday"), ("GET", "/trades/a/b", b"", 404, "MSGID"),
    ("DELETE", "/trades", b"", 404, "no admin call"), ("GET", "/nothing", b"", 404, "no admin call"),
])
def test_a_malformed_admin_call_is_a_4xx_naming_the_problem(method: str, path: str, body: bytes, status: int,
                                                              words: str) -> None:
    got, doc = _admin(method, path, body)
    assert got == status and words in doc["error"], (got, doc)


def test_well_formed_admin_calls_still_work() -> None:
    assert _admin("POST", "/reverse/M1", b'{"infno": "2207", "psn_no": "P1"}') == (200, {"reversed": ["M1", "2207", "P1"]})
    assert _admin("POST", "/drop/M1", b'{"reason": "duplicate"}')[1]["reason"] == "duplicate"
    assert _admin("GET", "/trades?limit=5&since=2026-11-23")[0] == 200


# ---- the two sockets have separate groups -------------------------------------------------------------------
import grp as _grp  # noqa: E402
import os  # noqa: E402
import socket as _socket  # noqa: E402
import stat  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from fep import config, sockets  # noqa: E402
from fep.sim.world import ROOT  # noqa: E402


def _config(tmp_path: Path, **changes: dict[str, Any]) -> config.Config:
    doc = yaml.safe_load((ROOT / "conf" / "fep.yaml").read_text())
    doc["trades"] = str(ROOT / "conf" / "trades.yaml")
    for key, value in changes.items():
        doc.setdefault(key, {}).update(value)
    path = tmp_path / "fep.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return config.load(path)


def test_the_sockets_have_separate_groups_by_default(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert (cfg.his.unix_group, cfg.admin.unix_group) == ("fep-his", "fep")
    for name in ("fep.production.yaml", "fep.yaml"):
        text = (ROOT / "conf" / name).read_text()
        assert "unix_group" in text, name
    assert "fep-his" in (ROOT / "scripts" / "install").read_text()
    assert "SupplementaryGroups=fep-his" in (ROOT / "systemd" / "fep.service").read_text()


def test_one_group_for_both_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="different groups"):
        _config(tmp_path, his={"unix_group": "fep"})


def test_a_socket_is_given_its_group(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    s = _socket.socket(_socket.AF_UNIX)
    s.bind(str(path))
    try:
        mine = _grp.getgrgid(os.getgid()).gr_name
        assert sockets.chown_group(path, mine)
        assert path.stat().st_gid == os.getgid() and stat.S_IMODE(path.stat().st_mode) == 0o660
        assert not sockets.chown_group(path, "no-such-group-fep")
    finally:
        s.close()
