"""The national request/response envelope (nhsa-interface.md §1), decimal-exact both ways.

Pure data: no sockets, no SQLite. The HIS listener, the bureau link and the simulator all use it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import simplejson

from fep.http11 import Response

REQUIRED_FROM_HIS = ("infno", "input")
# Never shown outside the journal (may carry card or e-certificate password material); never logged.
SECRET_FIELDS = ("cainfo",)


class BadEnvelope(ValueError):
    """The HIS sent something that is not a usable request; the message names what is wrong."""


def loads(data: bytes | str) -> Any:
    return simplejson.loads(data, use_decimal=True)


def dumps(obj: Any) -> bytes:
    return simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def payload_hash(envelope: dict[str, Any]) -> str:
    """What makes two submissions of one msgid "the same": the trade and its input, not the clock."""
    core = {"infno": envelope.get("infno"), "input": envelope.get("input"),
            "insuplc_admdvs": envelope.get("insuplc_admdvs", "")}
    return hashlib.sha256(simplejson.dumps(core, use_decimal=True, sort_keys=True).encode()).hexdigest()


@dataclass
class HisRequest:
    infno: str
    msgid: str | None  # as sent by the HIS; None when absent
    envelope: dict[str, Any]

    @property
    def input(self) -> dict[str, Any]:
        return self.envelope["input"]


def parse_his_request(body: bytes) -> HisRequest:
    if not body.strip():
        raise BadEnvelope("empty request body: expected a JSON object holding the national envelope")
    try:
        env = loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadEnvelope(f"request body is not valid JSON: {e}") from None
    if not isinstance(env, dict):
        raise BadEnvelope("request body must be a JSON object (the national envelope)")
    missing = [f for f in REQUIRED_FROM_HIS if f not in env]
    if missing:
        raise BadEnvelope(f"envelope is missing {', '.join(missing)}")
    infno = env["infno"]
    if isinstance(infno, int):
        infno = str(infno)
    if not isinstance(infno, str) or not re.fullmatch(r"[0-9A-Za-z]{4,6}", infno):
        raise BadEnvelope(f"infno must be a trade number such as \"2207\", got {env['infno']!r}")
    if not isinstance(env["input"], dict):
        raise BadEnvelope("input must be a JSON object")
    env["infno"] = infno
    msgid = env.get("msgid")
    return HisRequest(infno=infno, msgid=msgid if isinstance(msgid, str) and msgid else None, envelope=env)


def find_psn_no(input_: dict[str, Any]) -> str | None:
    """psn_no sits in the input's root node (`data`, `mdtrtinfo`, `feedetail[0]`, ...)."""
    for node in input_.values():
        if isinstance(node, list) and node:
            node = node[0]
        if isinstance(node, dict) and node.get("psn_no"):
            return str(node["psn_no"])
    return None


def inf_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class BureauAnswer:
    infcode: int
    err_msg: str
    output: Any
    raw: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.infcode == 0


def succeeded(answer: dict[str, Any]) -> bool:
    """infcode 0, whether the bureau (or fep, per config) writes it as a number or a string."""
    return str(answer.get("infcode")).strip() == "0"


class BadAnswer(ValueError):
    """The bureau's bytes are not an envelope: the outcome of the trade is unknown."""


def parse_bureau_answer(body: bytes) -> BureauAnswer:
    """Lenient as the real answers need: infcode as number or string, null err_msg, no inf_refmsgid."""
    try:
        env = loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadAnswer(f"bureau answer is not JSON: {e}") from None
    if not isinstance(env, dict) or "infcode" not in env:
        raise BadAnswer("bureau answer has no infcode")
    try:
        code = int(str(env["infcode"]).strip())
    except ValueError:
        raise BadAnswer(f"bureau answer has a non-numeric infcode {env['infcode']!r}") from None
    env["infcode"] = code  # fep's own readers of the parsed answer compare numbers; the stored bytes stay as sent
    return BureauAnswer(infcode=code, err_msg=env.get("err_msg") or "", output=env.get("output"), raw=env)


def file_answer(content: bytes, disposition: str) -> bytes:
    """9102 (and 13xx downloads) answer with the file itself; fep keeps it as an envelope like any other."""
    import base64

    m = re.search(r'filename="?([^";]+)', disposition)
    return dumps({"infcode": 0, "err_msg": None, "output": {"file": {
        "filename": m.group(1) if m else "", "size": len(content),
        "content_base64": base64.b64encode(content).decode("ascii")}}})


def file_content(output: Any) -> bytes:
    import base64

    return base64.b64decode(output["file"]["content_base64"])


def answer(envelope: dict[str, Any], *, msgid: str, state: str, note: str = "", **extra: Any) -> dict[str, Any]:
    """The national response envelope plus fep's own fields, all prefixed `fep_`."""
    out = dict(envelope)
    out["fep_msgid"] = msgid
    out["fep_state"] = state
    if note:
        out["fep_note"] = note
    out.update({f"fep_{k}": v for k, v in extra.items() if v is not None})
    return out


def splice(raw: bytes, fields: dict[str, Any]) -> bytes:
    """fep's fields added to the bureau's answer as it came, without decoding and encoding it again.
    `raw` is an answer parse_bureau_answer accepted: a JSON object with at least infcode in it."""
    return raw.rstrip()[:-1] + b"," + dumps(fields)[1:]


def local_failure(message: str, when: datetime, output: str = "data") -> dict[str, Any]:
    """An envelope for an answer fep gives itself (the bureau said nothing). `output`: the trade's output
    node ("setlinfo", or "result[]" for a list), there but empty, so a strict HIS parser accepts it."""
    stamp = when.strftime("%Y%m%d%H%M%S%f")[:17]
    node = {output[:-2]: []} if output.endswith("[]") else {output: {}}
    return {"infcode": -1, "inf_refmsgid": "", "refmsg_time": stamp, "respond_time": stamp,
            "err_msg": message, "output": node, "warn_msg": ""}


# Why fep refused, for programs that branch on it; the HIS hears every refusal as HTTP 200, infcode -1,
# because HIS clients turn any other status into a transport error and lose the message.
REASONS = {400: "invalid", 403: "not_for_the_his", 404: "not_found", 409: "conflict", 413: "too_large",
           422: "msgid_reused", 503: "journal_cannot_write"}


def refusal(status: int, message: str, **fields: Any) -> Response:
    """fep refuses a request before accepting it: nothing was journalled or sent. `status` is the HTTP
    status: only for what is not a trade at all (bad HTTP, a body over the limit)."""
    env = local_failure(message, datetime.now())
    env["fep_state"] = "REFUSED"
    env.update({f"fep_{k}": v for k, v in fields.items()})
    return Response(status, dumps(env))


def his_refusal(status: int, message: str, infcode_type: str = "number", output: str = "data") -> Response:
    """A trade fep will not take, answered in the national interface's own shape (HTTP 200, infcode -1)."""
    env = typed(local_failure(message, datetime.now(), output), infcode_type)
    env.update(fep_state="REFUSED", fep_reason=REASONS.get(status, "refused"))
    return Response(200, dumps(env))


def typed(env: dict[str, Any], infcode_type: str) -> dict[str, Any]:
    """fep's own envelopes write infcode as the bureau does: a number, or a string ("0", "-1")."""
    if infcode_type == "string":
        env["infcode"] = str(env["infcode"])
    return env


def mask_id(value: str) -> str:
    """ID numbers and person numbers in logs: keep enough to find the row, not to identify anyone."""
    if len(value) <= 6:
        return "*" * len(value)
    return value[:3] + "*" * (len(value) - 7) + value[-4:]
