"""`fep status --check`: the admin status judged OK, WARNING or CRITICAL in one line, for Nagios and Zabbix.

CRITICAL is what loses or risks money now and needs someone at once; WARNING is what needs a person today.
The thresholds are the alert rules' (conf/alerts.yml), so a check and an alert never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Any

UNKNOWN_CRITICAL = 600         # s: a trade's outcome unknown this long (FepUnknownOutcomeOld)
UNKNOWN_WARNING = 120          # s: resolutions normally end in seconds; this long is a backlog building
QUEUE_WARNING = 1800           # s: deferred uploads waiting this long (FepReplayQueueStuck)
CERT_WARNING = 30 * 86400      # s (FepCertificateExpiring)
CERT_CRITICAL = 7 * 86400
RECONCILE_DUE = 26 * 3600      # s since the last reconciliation, when one runs daily (FepReconciliationNotRun)


class Level(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2


@dataclass
class Verdict:
    problems: list[tuple[Level, str]] = field(default_factory=list)

    def add(self, level: Level, text: str) -> None:
        self.problems.append((level, text))

    @property
    def level(self) -> Level:
        return max((lvl for lvl, _ in self.problems), default=Level.OK)

    def line(self, summary: str) -> str:
        worst_first = sorted(self.problems, key=lambda p: -p[0])
        return f"FEP {self.level.name} - " + ("; ".join(text for _, text in worst_first) or summary)


def check(status: dict[str, Any], now: datetime) -> Verdict:
    """`status`: GET /status of the admin socket."""
    v = Verdict()
    if status.get("journal_cannot_write"):
        v.add(Level.CRITICAL, "the journal cannot write: trades are refused")
    _link(v, status)
    _trades(v, status)
    _certificates(v, status.get("certificates") or {})
    _reconciliation(v, status, now)
    return v


def role(status: dict[str, Any], wanted: str) -> Verdict:
    """`--role leader`: only whether this node leads (a single box leads itself), for keepalived's check script:
    a standby is CRITICAL whatever its health, a leader OK whatever its warnings (those are check's business)."""
    v = Verdict()
    current = status.get("role", "single")
    if wanted == "leader" and current not in ("leader", "single"):
        v.add(Level.CRITICAL, f"this node does not lead ({current}); the leader is {status.get('leader') or 'unknown'}")
    return v


def _link(v: Verdict, status: dict[str, Any]) -> None:
    down = [e["name"] for e in status["endpoints"] if e["up"] is False]
    if down and len(down) == len(status["endpoints"]):
        v.add(Level.CRITICAL, "bureau link down")
    elif down:
        v.add(Level.WARNING, f"bureau endpoint {', '.join(down)} down")
    if not status["signed_in"] and not down:
        v.add(Level.WARNING, "not signed in (9001)")


def _trades(v: Verdict, status: dict[str, Any]) -> None:
    unknown = status.get("oldest_unresolved_seconds") or 0
    if unknown > UNKNOWN_WARNING:
        v.add(Level.CRITICAL if unknown > UNKNOWN_CRITICAL else Level.WARNING,
              f"a trade's outcome unknown for {unknown:.0f} s")
    if status["needs_attention"]:
        v.add(Level.WARNING, f"{len(status['needs_attention'])} trade(s) need attention")
    if (status.get("oldest_queued_seconds") or 0) > QUEUE_WARNING:
        v.add(Level.WARNING, f"{status['queued']} queued for the bureau, oldest {status['oldest_queued_seconds']:.0f} s")


def _certificates(v: Verdict, certificates: dict[str, float]) -> None:
    for name, seconds in sorted(certificates.items()):
        if seconds < CERT_WARNING:
            v.add(Level.CRITICAL if seconds < CERT_CRITICAL else Level.WARNING,
                  f"certificate {name} {'expired' if seconds <= 0 else f'expires in {seconds // 86400:.0f} days'}")


def _reconciliation(v: Verdict, status: dict[str, Any], now: datetime) -> None:
    last = status.get("last_reconciliation")
    days = status.get("days_not_balanced")
    if days is None:  # a fep of before the window: its last run only
        days = [last] if last and (last["unbalanced"] or last.get("unresolved")) else []
    for day in days:
        v.add(Level.WARNING, f"reconciliation of {day['stmt_date']}: {day['unbalanced']} group(s) not balanced"
                             + (f", {day['unresolved']} trade(s) unresolved" if day.get("unresolved") else ""))
    if not status.get("reconcile_daily_at"):
        return
    if last:
        age = (now - datetime.strptime(last["run_at"], "%Y-%m-%d %H:%M:%S")).total_seconds()
        if age > RECONCILE_DUE:
            v.add(Level.WARNING, f"no reconciliation since {last['run_at']}")
    elif (status.get("up_seconds") or 0) > RECONCILE_DUE:  # a new install is given a day to make its first
        v.add(Level.WARNING, "no reconciliation has run")


def summary(status: dict[str, Any]) -> str:
    """The OK line: what an operator glances at."""
    last = status.get("last_reconciliation")
    return (f"bureau link up, signed in, {status['queued']} queued, 0 need attention"
            + (f", {last['stmt_date']} reconciled" if last else ""))
