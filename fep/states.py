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
    RESOLVING = "RESOLVING"            # a resolving trade (2601, cancel, resend) is under way
    REVERSED = "REVERSED"              # undone at the bureau (acknowledged)
    NOT_NEEDED = "NOT_NEEDED"          # the bureau never had it, or the resend got the first answer
    NEEDS_ATTENTION = "NEEDS_ATTENTION"  # tries exhausted or policy says a person decides
    AWAITING_CONFIRM = "AWAITING_CONFIRM"  # answered; the HIS must confirm it recorded the result
    CONFIRMED = "CONFIRMED"


S = State

# event: (sources, target)
TRANSITIONS: dict[str, tuple[frozenset[State], State]] = {
    "dequeue":     (frozenset({S.QUEUED}), S.SENT),
    "retry":       (frozenset({S.NOT_SENT}), S.SENT),      # same msgid again: it never left the box
    "answer":      (frozenset({S.SENT}), S.ANSWERED),
    "answer_held": (frozenset({S.SENT}), S.AWAITING_CONFIRM),
    "not_sent":    (frozenset({S.SENT}), S.NOT_SENT),
    "requeue":     (frozenset({S.SENT}), S.QUEUED),
    "lost":        (frozenset({S.SENT}), S.UNKNOWN),
    "resend":      (frozenset({S.UNKNOWN}), S.SENT),
    "resolve":     (frozenset({S.UNKNOWN, S.AWAITING_CONFIRM}), S.RESOLVING),
    "reattempt":   (frozenset({S.RESOLVING}), S.RESOLVING),  # the bureau refused the resolving trade
    "undone":      (frozenset({S.RESOLVING}), S.REVERSED),
    "not_needed":  (frozenset({S.RESOLVING}), S.NOT_NEEDED),
    "give_up":     (frozenset({S.UNKNOWN, S.RESOLVING, S.QUEUED, S.SENT}), S.NEEDS_ATTENTION),
    "release":     (frozenset({S.NEEDS_ATTENTION}), S.QUEUED),  # a person sends a parked item again
    "reopen":      (frozenset({S.NEEDS_ATTENTION}), S.UNKNOWN),  # a person has fep resolve it again
    "confirm":     (frozenset({S.AWAITING_CONFIRM}), S.CONFIRMED),
}

# The bureau may hold a trade in these states: they count for "is this person settled?".
IN_FORCE = frozenset({S.ANSWERED, S.AWAITING_CONFIRM, S.CONFIRMED})
# Nothing more will happen to a trade in these states.
FINAL = frozenset({S.ANSWERED, S.NOT_SENT, S.REVERSED, S.NOT_NEEDED, S.CONFIRMED})
# What recovery must pick up on start.
OPEN = frozenset(State) - FINAL - {S.NEEDS_ATTENTION}


def sources(event: str) -> frozenset[State]:
    return TRANSITIONS[event][0]


def target(event: str) -> State:
    return TRANSITIONS[event][1]
