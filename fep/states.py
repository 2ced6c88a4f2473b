"""The life of a trade: every state it can be in and every event that moves it (docs/trade-life.md).

The journal applies an event as `UPDATE ... SET state=<target> WHERE state IN (<sources>)`, so an
illegal move is refused by the store itself, and recovery only has to read states.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "QUEUED"                  # deferrable, link down: acknowledged to the HIS, waits in order
    SENT = "SENT"                      # journalled BEFORE the first byte: from here it may have arrived
    ANSWERED = "ANSWERED"              # the bureau's answer is durable (success or business error)
    NOT_SENT = "NOT_SENT"              # provably never left the box; failed cleanly
    UNKNOWN = "UNKNOWN"                # sent, no valid answer: the fate is to be resolved
    RESOLVING = "RESOLVING"            # a resolving trade (2601, cancel) is under way
    REVOKING = "REVOKING"              # answered, and a reversal asked for by the HIS or a person is under way
    REVERSED = "REVERSED"              # undone at the bureau (acknowledged)
    NOT_NEEDED = "NOT_NEEDED"          # the bureau never had it
    NEEDS_ATTENTION = "NEEDS_ATTENTION"  # tries exhausted, a business refusal of a promise, or policy: a person decides
    DROPPED = "DROPPED"                # a person gave a parked trade up, with the reason recorded
    AWAITING_CONFIRM = "AWAITING_CONFIRM"  # answered; the HIS must confirm it recorded the result
    CONFIRMED = "CONFIRMED"


S = State

# event: (sources, target)
TRANSITIONS: dict[str, tuple[frozenset[State], State]] = {
    "dequeue":      (frozenset({S.QUEUED}), S.SENT),
    "retry":        (frozenset({S.NOT_SENT}), S.SENT),      # same msgid again: it never left the box
    "resign":       (frozenset({S.SENT}), S.SENT),          # "sign in again": sent again under the new sign_no
    "answer":       (frozenset({S.SENT}), S.ANSWERED),
    "answer_held":  (frozenset({S.SENT}), S.AWAITING_CONFIRM),
    "not_sent":     (frozenset({S.SENT}), S.NOT_SENT),
    "requeue":      (frozenset({S.SENT}), S.QUEUED),
    "lost":         (frozenset({S.SENT}), S.UNKNOWN),       # a try spent: no answer, or a transient one
    "unsent":       (frozenset({S.SENT}), S.UNKNOWN),       # a resend not taken (never left, or "busy"): no try spent
    "resend":       (frozenset({S.UNKNOWN}), S.SENT),
    "resolve":      (frozenset({S.UNKNOWN, S.AWAITING_CONFIRM}), S.RESOLVING),
    "reattempt":    (frozenset({S.RESOLVING}), S.RESOLVING),  # the bureau refused the resolving trade
    "revoke":       (frozenset({S.ANSWERED, S.AWAITING_CONFIRM, S.CONFIRMED}), S.REVOKING),
    "stands":       (frozenset({S.REVOKING}), S.ANSWERED),   # the bureau refused the asked-for reversal
    "undone":       (frozenset({S.RESOLVING, S.REVOKING}), S.REVERSED),
    "not_needed":   (frozenset({S.RESOLVING}), S.NOT_NEEDED),
    "late_success": (frozenset({S.NOT_NEEDED}), S.UNKNOWN),  # "no record", yet it settled: undo it
    "give_up":      (frozenset({S.UNKNOWN, S.RESOLVING, S.REVOKING, S.QUEUED, S.SENT}), S.NEEDS_ATTENTION),
    "release":      (frozenset({S.NEEDS_ATTENTION}), S.QUEUED),  # a person sends a parked upload again
    # A person has fep resolve it again: parked, or judged not at the bureau (or given up) when
    # reconciliation finds the bureau holds it after all.
    "reopen":       (frozenset({S.NEEDS_ATTENTION, S.NOT_NEEDED, S.DROPPED}), S.UNKNOWN),
    "drop":         (frozenset({S.NEEDS_ATTENTION}), S.DROPPED),
    "confirm":      (frozenset({S.AWAITING_CONFIRM}), S.CONFIRMED),
}

# The bureau holds the money of a settlement in these states: they count for refund order and reconciliation.
IN_FORCE = frozenset({S.ANSWERED, S.AWAITING_CONFIRM, S.CONFIRMED, S.REVOKING})
# Nothing more happens to a trade in these states by itself.
FINAL = frozenset({S.ANSWERED, S.NOT_SENT, S.REVERSED, S.NOT_NEEDED, S.CONFIRMED, S.DROPPED})
# What recovery must pick up on start.
OPEN = frozenset(State) - FINAL - {S.NEEDS_ATTENTION}
# An outcome fep is still finding out.
UNRESOLVED = frozenset({S.SENT, S.UNKNOWN, S.RESOLVING, S.REVOKING})


def sources(event: str) -> frozenset[State]:
    return TRANSITIONS[event][0]


def target(event: str) -> State:
    return TRANSITIONS[event][1]
