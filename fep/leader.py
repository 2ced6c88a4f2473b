"""Which of the nodes sharing one PostgreSQL journal leads: a lease held by PostgreSQL's own locking.

The leader holds a session-level advisory lock on a connection of its own. PostgreSQL releases it the moment
that session ends: the node killed (its socket closes), its database session terminated, or its network gone
(the server's TCP keepalives end the session within seconds). A standby asks for the lock every `check`
seconds, so it takes over within `check` seconds of the release.

Each takeover adds one to the epoch in the journal's `leader` row, in the same session that holds the lock,
and names the node. The journal fences every move to SENT with the epoch (fep.journal `fence`): a node that
lost the lock cannot journal another send, even before it notices, so it sends nothing more to the bureau.

A leader that cannot confirm its session for `timeout` seconds (a probe hanging on a network that is gone)
counts the lease as lost. A leader that hangs (stopped, swapping) sends no probe, and its operating system
still answers the keepalives: the lease's session therefore has idle_session_timeout set to `timeout`, so
PostgreSQL ends it and a standby takes over; woken, the old leader finds its epoch fenced and its lease gone.
The thread below does every blocking call; the reactor hears what it found.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
from twisted.internet import task
from twisted.logger import Logger

from fep import journal_pg

log = Logger()
LOCK_KEY = 0x66657002  # pg_advisory_lock key of the lease: one per journal database
NO_EPOCH = -1  # a standby's fence: no epoch is ever -1, so a standby journals no send at all


@dataclass(frozen=True)
class Leader:
    """Who leads, as the journal's leader row says: the node's name and since when."""
    node: str | None
    epoch: int
    since: float | None


class Lease:
    def __init__(self, reactor: Any, url: str, node: str, check: float, timeout: float,
                 won: Callable[[int], None], lost: Callable[[str], None], seen: Callable[[Leader], None]) -> None:
        self.reactor = reactor
        self.url = url
        self.node = node
        self.check = check
        self.timeout = timeout
        self._won, self._lost, self._seen = won, lost, seen  # we lead; we lost it; a standby read who leads
        self.epoch: int | None = None  # ours, while we lead
        self.leader: Leader | None = None  # as last read (a standby reads it every check)
        self._confirmed = 0.0  # monotonic time the leader's session was last seen alive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._watch = task.LoopingCall(self._overdue)
        self._watch.clock = reactor

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    def start(self) -> None:
        self._thread.start()
        self._watch.start(self.check, now=False)

    def stop(self) -> None:
        self._stop.set()
        if self._watch.running:
            self._watch.stop()

    # --- the lease thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        leading = False
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = journal_pg.connect(self.url, application_name=f"fep lease {self.node}")
                    conn.execute("SELECT set_config('idle_session_timeout', %s, false)",
                                 (str(int(self.timeout * 1000)),))  # PostgreSQL 14 and later
                if leading:
                    conn.execute("SELECT 1")  # the session lives, so the lock it holds does
                    self.reactor.callFromThread(self._seen_alive, time.monotonic())
                elif conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:  # type: ignore[index]
                    epoch = conn.execute("UPDATE leader SET epoch = epoch + 1, node = %s, since = %s RETURNING epoch",
                                         (self.node, time.time())).fetchone()[0]  # type: ignore[index]
                    leading = True
                    self.reactor.callFromThread(self._took, int(epoch), time.monotonic())
                else:
                    node, epoch, since = conn.execute("SELECT node, epoch, since FROM leader").fetchone()  # type: ignore[misc]
                    self.reactor.callFromThread(self._saw, Leader(node, int(epoch), since))
            except psycopg.Error as e:
                if conn is not None:
                    conn.close()
                conn = None
                if leading:
                    leading = False
                    self.reactor.callFromThread(self._gone, f"the lease's database session is gone ({e})")
            self._stop.wait(self.check)
        if conn is not None:
            conn.close()  # the lock goes with the session: a standby takes over at once

    # --- on the reactor -------------------------------------------------------------------------------
    def _took(self, epoch: int, at: float) -> None:
        self.epoch, self._confirmed = epoch, at
        self.leader = Leader(self.node, epoch, time.time())
        log.info("this node ({node}) leads, epoch {epoch}", node=self.node, epoch=epoch)
        self._won(epoch)

    def _saw(self, leader: Leader) -> None:
        if leader != self.leader:
            log.info("standing by: the leader is {node} (epoch {epoch})", node=leader.node, epoch=leader.epoch)
        self.leader = leader
        self._seen(leader)

    def _seen_alive(self, at: float) -> None:
        self._confirmed = at

    def _overdue(self) -> None:
        if self.leading and time.monotonic() - self._confirmed > self.timeout:
            self._gone(f"the lease's database session gave no sign for {self.timeout:g} s")

    def _gone(self, why: str) -> None:
        if self.epoch is None:
            return
        self.epoch = None
        self.stop()
        log.error("this node ({node}) lost the lead: {why}", node=self.node, why=why)
        self._lost(why)
