"""One event a line on stderr, with systemd's <N> priority prefix so journald keeps the level."""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, formatEvent, globalLogBeginner

# Runs of 15+ digits (ID numbers, psn_no, card numbers) standing alone are masked; a msgid starts with the
# institution code's letter, so it stays whole and every line can still be traced to its trade.
PERSONAL = re.compile(r"(?<![0-9A-Za-z])(\d{3})\d{8,}(\d{3}[0-9Xx]?)(?![0-9A-Za-z])")

PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}


def observer(event: dict[str, Any]) -> None:
    level = event.get("log_level", LogLevel.info)
    text = formatEvent(event) or ""
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()} | " + failure.getTraceback().replace("\n", " | ")
    ns = event.get("log_namespace", "")
    text = PERSONAL.sub(lambda m: m.group(1) + "*" * (len(m.group(0)) - len(m.group(1)) - len(m.group(2)))
                        + m.group(2), text.replace("\n", " | "))
    sys.stderr.write(f"<{PRIORITY.get(level, 6)}>{ns}: {text}\n")
    sys.stderr.flush()


def start() -> None:
    Factory.noisy = False  # "Starting factory" on every bureau connection drowns what matters
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
