"""One event a line on stderr, with systemd's <N> priority prefix so journald keeps the level."""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, formatEvent, globalLogBeginner

PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}


def observer(event: dict[str, Any]) -> None:
    level = event.get("log_level", LogLevel.info)
    text = formatEvent(event) or ""
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}: {failure.getErrorMessage()} | " + failure.getTraceback().replace("\n", " | ")
    ns = event.get("log_namespace", "")
    text = text.replace("\n", " | ")
    sys.stderr.write(f"<{PRIORITY.get(level, 6)}>{ns}: {text}\n")
    sys.stderr.flush()


def start() -> None:
    Factory.noisy = False  # "Starting factory" on every bureau connection drowns what matters
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
