"""One event a line on stderr, with systemd's <N> priority prefix so journald keeps the level."""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel, formatEvent, globalLogBeginner

# What is masked in every line (the message, a traceback, the bureau's own text quoted in it):
# - ID numbers, psn_no and card numbers: any run of 15 or more digits, an ID's final X included, written whole or
#   with single dashes or spaces between its groups, whatever is next to it (`ID430102...`, `...0011abc`);
# - names: the value of a name field (psn_name="...", 姓名：...), and a run of Chinese characters written just
#   before an ID number ("张三 430102...", "张三(430102...)");
# - psn_no and certificate fields by name, whatever their value looks like.
# A msgid (12 letters or digits of the institution, a yyyyMMddHHmmss stamp, 4 digits) stays whole, so every line
# can still be traced to its trade; masked digits keep their first 3 and last 4.
_MSGID = re.compile(r"(?<![0-9A-Za-z])[0-9A-Z]{12}20\d{2}[01]\d[0-3]\d[0-2]\d[0-5]\d[0-5]\d\d{4}(?![0-9A-Za-z])")
_DIGITS = re.compile(r"\d(?:[ \-]?\d){14,}(?:[ \-]?[Xx](?![A-Za-z]))?")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\u00b7"
# A name written just before an ID number, with the words the bureau puts between them (身份证号 ...).
_ID_WORDS = "身份证号码|身份证号|身份证|证件号码|证件号"
_NAME_BEFORE_ID = re.compile(rf"[{_CJK}]{{2,4}}(?<![号码证])(?=(?:{_ID_WORDS})?[\s(（\[【,，:：]{{0,2}}"
                             rf"(?:{_ID_WORDS})?[\s(（\[【,，:：]{{0,2}}\d{{3}}\*)")
# Field names as snake_case or camelCase (psn_name, psnName); a value quoted whole (spaces and all), or bare up
# to the next separator and any further capitalised words (Zhang San).
_FIELDS = "psn_?name|patn_?name|insu_?name|name|psn_?no|cert_?no|mdtrt_?cert_?no|card_?sn"
_BY_FIELD = re.compile(rf"(?i)(?<![A-Za-z])((?:\w+_)?(?:{_FIELDS})\b\s*[\"']?\s*[:=]\s*[\"']?|(?:姓名|参保人|患者|病人)\s*[:：=]\s*)"
                       rf"((?<=\")[^\"]+|(?<=')[^']+|[^\s\"',;|)}}\]]+(?:\s+(?-i:[A-Z][a-z]+))*)")


def _stars(match: re.Match[str]) -> str:
    digits = re.sub(r"[ \-]", "", match.group(0))
    return digits[:3] + "*" * max(len(digits) - 7, 1) + digits[-4:]


def _field(match: re.Match[str]) -> str:
    value = match.group(2)
    return match.group(1) + (value[:1] + "*" * (len(value) - 1) if len(value) > 1 else "*")


def mask(text: str) -> str:
    """`text` with every ID number, psn_no and name masked (see above); msgids untouched."""
    kept: list[str] = []

    def keep(m: re.Match[str]) -> str:
        kept.append(m.group(0))
        return f"\x00{len(kept) - 1}\x00"

    text = _MSGID.sub(keep, text)
    text = _BY_FIELD.sub(_field, text)
    text = _DIGITS.sub(_stars, text)
    text = _NAME_BEFORE_ID.sub(lambda m: m.group(0)[:1] + "*" * (len(m.group(0)) - 1), text)
    return re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)


PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}


def observer(event: dict[str, Any]) -> None:
    level = event.get("log_level", LogLevel.info)
    text = formatEvent(event) or ""
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()} | " + failure.getTraceback().replace("\n", " | ")
    ns = event.get("log_namespace", "")
    text = mask(text.replace("\n", " | "))
    sys.stderr.write(f"<{PRIORITY.get(level, 6)}>{ns}: {text}\n")
    sys.stderr.flush()


def start() -> None:
    Factory.noisy = False  # "Starting factory" on every bureau connection drowns what matters
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# --- event lines: what an operator reading the log must see, one line each, with the msgid --------------------
events = Logger(namespace="fep.events")
# Transitions that end a resolution, or park a trade for a person; the others are in the trade's history.
ENDINGS = {"undone": "REVERSED", "not_needed": "NOT_NEEDED"}


def transition(event: str, row: Any) -> None:
    """A durable transition of a journal row (fep.journal.Journal.observers)."""
    whose = f" (resolving {row.related})" if row.related else ""
    if event in ENDINGS:
        events.info("{infno} {msgid}{whose}: resolution ended {state}: {why}", infno=row.infno, msgid=row.msgid,
                    whose=whose, state=ENDINGS[event], why=row.note or "")
    elif event == "give_up":
        ended = "resolution ended NEEDS_ATTENTION, parked" if row.resolver or row.attempts else "parked NEEDS_ATTENTION"
        events.warn("{infno} {msgid}{whose}: {ended} for a person: {why}", infno=row.infno, msgid=row.msgid,
                    whose=whose, ended=ended, why=row.note or "")


def link(name: str, url: str, up: bool, why: str = "") -> None:
    """A bureau endpoint went down or came up (fep.bureau)."""
    if up:
        events.info("bureau link {name} up ({url})", name=name, url=url)
    else:
        events.warn("bureau link {name} down ({url}){why}", name=name, url=url, why=f": {why}" if why else "")
