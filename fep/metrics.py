"""Prometheus metrics, `fep_` prefix. No personal data in labels: trade numbers, states, endpoints only."""

from __future__ import annotations

import functools
import platform
from importlib.metadata import version
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

# Sub-millisecond buckets: a journal commit is ~0.2 ms, a trade's overhead target is < 1 ms.
FINE = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

BUILD = Info("fep_build", "The running fep: its version and Python's")
BUILD.info({"version": version("fep"), "python": platform.python_version()})
TRADES = Counter("fep_trades", "Trades answered to the HIS, by trade number and result: success, "
                 "refused (the bureau's business refusal), queued, transport_failure (no valid answer)",
                 ["infno", "result"])
TRADE_SECONDS = Histogram("fep_trade_seconds", "HIS request to HIS answer", ["infno"], buckets=FINE)
BUREAU_SECONDS = Histogram("fep_bureau_seconds", "Request written to answer read, bureau link",
                           ["endpoint"], buckets=FINE)
JOURNAL_COMMIT = Histogram("fep_journal_commit_seconds", "One group commit of the journal", buckets=FINE)
JOURNAL_BATCH = Histogram("fep_journal_batch_size", "Operations sharing one journal commit",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
LINK_UP = Gauge("fep_bureau_link_up", "1 while the last attempt to reach the endpoint succeeded", ["endpoint"])
LINK_SECURITY = Gauge("fep_bureau_link_security", "1 for how the bureau link is secured: mutual_tls (the "
                      "default), server_tls or plain_http (each only when set explicitly)", ["mode"])
SIGNED_IN = Gauge("fep_bureau_signed_in", "1 while fep holds a sign_no from 9001")
UNKNOWN_OUTCOMES = Counter("fep_unknown_outcomes", "Trades sent that got no valid answer", ["infno"])
LATE_SUCCESSES = Counter("fep_late_successes", "Late successes of money fep had judged not at the bureau: "
                         "reopened and reversed again (each deserves a look)", ["infno"])
JOURNAL_CANNOT_WRITE = Gauge("fep_journal_cannot_write", "1 while the journal's disk refuses writes")
LATE_ANSWERS = Counter("fep_late_answers", "Answers that came after fep had given up waiting", ["infno"])
TRADES_IN_STATE = Gauge("fep_trades_in_state", "Trades in the journal by state (refreshed every few seconds)",
                        ["state"])
REPLAY_DEPTH = Gauge("fep_replay_queue_depth", "Deferred trades waiting for the bureau")
REPLAY_OLDEST = Gauge("fep_replay_queue_oldest_seconds", "Age of the oldest deferred trade still waiting")
UNKNOWN_OLDEST = Gauge("fep_unknown_oldest_seconds", "Age of the oldest trade whose outcome is not yet resolved")
RESOLUTIONS = Counter("fep_resolutions", "Unknown outcomes resolved, by how they ended", ["result"])
CERT_EXPIRY = Gauge("fep_certificate_expiry_seconds", "Seconds until a configured certificate expires", ["cert"])
RELOADS = Counter("fep_config_reloads", "Configuration reloads, by result", ["result"])
RECONCILED_GROUPS = Gauge("fep_reconciliation_groups", "Groups of the latest run of each of the last 31 statement "
                          "days, by result",
                          ["result"])
for _result in ("balanced", "unbalanced"):  # exported from the start, 0 until a reconciliation has run
    RECONCILED_GROUPS.labels(_result)
RECONCILED_AT = Gauge("fep_reconciliation_last_run_timestamp_seconds", "When the last reconciliation ran (0: never)")
RECONCILE_DAILY = Gauge("fep_reconciliation_scheduled", "1 when a reconciliation is due every day "
                        "(schedule.reconcile_daily_at)")


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """metric.labels(*labels), looked up once: labels() takes a lock and builds a key each time, 6 us, and the
    per-trade metrics would pay it twice a trade. Labels here are trade numbers and results: a few hundred."""
    return metric.labels(*labels)
