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


@dataclass(frozen=True)
class Problem:
    level: Level
    text: str
    rule: str  # which rule found it: the console says what to do by it
    about: Any = None  # what it is about, where the rule names one thing: an endpoint, a certificate, a day's run


@dataclass
class Verdict:
    problems: list[Problem] = field(default_factory=list)

    def add(self, level: Level, text: str, rule: str, about: Any = None) -> None:
        self.problems.append(Problem(level, text, rule, about))

    @property
    def level(self) -> Level:
        return max((p.level for p in self.problems), default=Level.OK)

    def line(self, summary: str) -> str:
        worst_first = sorted(self.problems, key=lambda p: -p.level)
        return f"FEP {self.level.name} - " + ("; ".join(p.text for p in worst_first) or summary)


def check(status: dict[str, Any], now: datetime) -> Verdict:
    """`status`: GET /status of the admin socket."""
    v = Verdict()
    if status.get("journal_cannot_write"):
        v.add(Level.CRITICAL, "the journal cannot write: trades are refused", "journal")
    if status.get("role") == "standby":
        _standby(v, status)
    else:
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
        v.add(Level.CRITICAL, f"this node does not lead ({current}); the leader is {status.get('leader') or 'unknown'}",
              "role")
    return v


def _standby(v: Verdict, status: dict[str, Any]) -> None:
    """A standby neither signs in nor talks to the bureau (the leader does): what it is judged on is whether it
    knows a leader and could take over."""
    if status.get("standby_note"):
        leader = f"the leader is {status['leader']}" if status.get("leader") else "no leader known"
        v.add(Level.WARNING, f"standing by, {leader}; this node does not lead: {status['standby_note']}", "standby")
    elif not status.get("leader"):
        v.add(Level.WARNING, "standing by, no node leads yet", "standby")


def _link(v: Verdict, status: dict[str, Any]) -> None:
    down = [e for e in status["endpoints"] if e["up"] is False]
    if down and len(down) == len(status["endpoints"]):
        v.add(Level.CRITICAL, "bureau link down", "link", down)
    elif down:
        v.add(Level.WARNING, f"bureau endpoint {', '.join(e['name'] for e in down)} down", "link", down)
    if not status["signed_in"] and not down:
        v.add(Level.WARNING, "not signed in (9001)", "signin")


def _trades(v: Verdict, status: dict[str, Any]) -> None:
    unknown = status.get("oldest_unresolved_seconds") or 0
    if unknown > UNKNOWN_WARNING:
        v.add(Level.CRITICAL if unknown > UNKNOWN_CRITICAL else Level.WARNING,
              f"a trade's outcome unknown for {unknown:.0f} s", "unknown")
    if status["needs_attention"]:
        v.add(Level.WARNING, f"{len(status['needs_attention'])} trade(s) need attention", "parked",
              status["needs_attention"])
    if (status.get("oldest_queued_seconds") or 0) > QUEUE_WARNING:
        v.add(Level.WARNING, f"{status['queued']} queued for the bureau, oldest {status['oldest_queued_seconds']:.0f} s",
              "queue")


def _certificates(v: Verdict, certificates: dict[str, float]) -> None:
    for name, seconds in sorted(certificates.items()):
        if seconds < CERT_WARNING:
            v.add(Level.CRITICAL if seconds < CERT_CRITICAL else Level.WARNING,
                  f"certificate {name} {'expired' if seconds <= 0 else f'expires in {seconds // 86400:.0f} days'}",
                  "certificate", name)


def _reconciliation(v: Verdict, status: dict[str, Any], now: datetime) -> None:
    last = status.get("last_reconciliation")
    days = status.get("days_not_balanced")
    if days is None:  # a fep of before the window: its last run only
        days = [last] if last and (last["unbalanced"] or last.get("unresolved")) else []
    for day in days:
        v.add(Level.WARNING, f"reconciliation of {day['stmt_date']}: {day['unbalanced']} group(s) not balanced"
                             + (f", {day['unresolved']} trade(s) unresolved" if day.get("unresolved") else ""),
              "reconciliation", day)
    if not status.get("reconcile_daily_at"):
        return
    if last:
        age = (now - datetime.strptime(last["run_at"], "%Y-%m-%d %H:%M:%S")).total_seconds()
        if age > RECONCILE_DUE:
            v.add(Level.WARNING, f"no reconciliation since {last['run_at']}", "reconcile_due")
    elif (status.get("up_seconds") or 0) > RECONCILE_DUE:  # a new install is given a day to make its first
        v.add(Level.WARNING, "no reconciliation has run", "reconcile_due")


def summary(status: dict[str, Any]) -> str:
    """The OK line: what an operator glances at."""
    last = status.get("last_reconciliation")
    node = (f"standby, the leader is {status.get('leader')}" if status.get("role") == "standby" else
            "bureau link up, signed in")
    return (f"{node}, {status['queued']} queued, 0 need attention"
            + (f", {last['stmt_date']} reconciled" if last else ""))
