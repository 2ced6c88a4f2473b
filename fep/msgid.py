"""Packet numbers (msgid): fixmedins_code(12) + yyyyMMddHHmmss(14) + sequence(4) = 30 characters.

The msgid is the idempotency key towards the HIS and the key 2601 reverses by, so the box's own
numbers are never random and never reused: the counter's last value is stored in the journal in the
same transaction as the trade that uses it, and it never goes backwards, even if the clock does.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

# ASCII digits only (\d takes a full-width ２ too), the stamp in its fields for datetime to judge
MSGID_RE = re.compile(r"^[0-9A-Z]{12}([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})[0-9]{4}$")
STAMP = "%Y%m%d%H%M%S"
SEQ_MAX = 9999


def well_formed(msgid: str) -> bool:
    m = MSGID_RE.match(msgid)
    if not m:
        return False
    try:  # (the fields to datetime itself: strptime is a tenth of a millisecond, asked of every HIS msgid)
        datetime(*map(int, m.groups()))
    except ValueError:
        return False
    return True


class MsgidCounter:
    """At most 9,999 numbers a second; past that it borrows the next second rather than wrap."""

    def __init__(self, fixmedins_code: str, last: str | None = None) -> None:
        if not re.fullmatch(r"[0-9A-Z]{12}", fixmedins_code):
            raise ValueError(f"fixmedins_code must be 12 upper-case letters or digits, got {fixmedins_code!r}")
        self.code = fixmedins_code
        self._stamp, self._seq = ("", 0)
        if last:
            self._stamp, self._seq = last[:14], int(last[14:])

    @property
    def state(self) -> str:
        """What the journal stores: the stamp and sequence of the last number given out."""
        return f"{self._stamp}{self._seq:04d}"

    def next(self, now: datetime) -> str:
        stamp = now.strftime(STAMP)
        if stamp > self._stamp:
            self._stamp, self._seq = stamp, 1
        elif self._seq < SEQ_MAX:
            self._seq += 1
        else:
            later = datetime.strptime(self._stamp, STAMP) + timedelta(seconds=1)
            self._stamp, self._seq = later.strftime(STAMP), 1
        return f"{self.code}{self._stamp}{self._seq:04d}"
