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
(Its writer, frozen inside a transaction that holds the leader row FOR SHARE, is ended by PostgreSQL too:
fep.journal_pg sets idle_in_transaction_session_timeout, so the taker's epoch bump does not wait on it.)

A node leads only a journal of a schema it knows: a journal a newer fep migrated is refused at takeover as at
start, and the node goes on standing by, saying why. While the journal cannot be reached a standby cannot tell
who leads: it says so rather than name the leader it last read.
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
LOCK_KEY = int(journal_pg.Lock.LEASE)
NO_EPOCH = -1  # a standby's fence: no epoch is ever -1, so a standby journals no send at all
FAILURE_LOG_EVERY = 60.0  # seconds between log lines of a standby's failing tries (the first is logged at once)
IDLE_SESSION_TIMEOUT_SINCE = 140000  # server_version_num of PostgreSQL 14, the first with idle_session_timeout


@dataclass(frozen=True)
class Leader:
    """Who leads, as the journal's leader row says: the node's name and since when."""
    node: str | None
    epoch: int
    since: float | None


class Lease:
    def __init__(self, reactor: Any, url: str, node: str, check: float, timeout: float, schema: int,
                 won: Callable[[int], None], lost: Callable[[str], None], resigned: Callable[[str], None],
                 seen: Callable[[Leader | None, str | None], None]) -> None:
        self.reactor = reactor
        self.url = url
        self.node = node
        self.check = check
        self.timeout = timeout
        self.schema = schema  # the newest journal schema this fep knows: it leads none newer
        # we lead; we lost it; we let it go (a journal too new); a standby read who leads (None: it cannot tell)
        # and why it does not lead itself
        self._won, self._lost, self._resigned, self._seen = won, lost, resigned, seen
        self.epoch: int | None = None  # ours, while we lead
        self.leader: Leader | None = None  # as last read (a standby reads it every check); None: cannot tell
        self.why: str | None = None  # why this node does not lead, besides another leading (shown in status)
        self._failing_since: float | None = None  # monotonic time a standby's tries began failing
        self._failure_logged = 0.0
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
                    conn = self._connect()
                if leading:
                    leading = self._probe(conn)
                else:
                    leading = self._try(conn)
            except psycopg.Error as e:
                if conn is not None:
                    conn.close()
                conn = None
                if leading:
                    leading = False
                    self.reactor.callFromThread(self._gone, f"the lease's database session is gone ({e})")
                else:
                    self.reactor.callFromThread(self._blind, str(e).strip() or type(e).__name__)
            self._stop.wait(self.check)
        if conn is not None:
            conn.close()  # the lock goes with the session: a standby takes over at once

    def _connect(self) -> psycopg.Connection[Any]:
        conn = journal_pg.connect(self.url, application_name=f"fep lease {self.node}")
        # The epoch bump is the fence: durable before this node acts on it, whatever the server's default
        conn.execute("SET synchronous_commit = on")
        if conn.info.server_version >= IDLE_SESSION_TIMEOUT_SINCE:
            conn.execute("SELECT set_config('idle_session_timeout', %s, false)", (str(int(self.timeout * 1000)),))
        else:
            self.reactor.callFromThread(self._old_server, conn.info.server_version)
        return conn

    def _try(self, conn: psycopg.Connection[Any]) -> bool:
        """A standby's try for the lease: True when this node leads now. A journal of a newer schema than this
        fep's is not led: the lock is let go at once, for a node that knows the schema."""
        why = None
        if conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:  # type: ignore[index]
            why = self._too_new(conn)
            if why is None:
                epoch = conn.execute("UPDATE leader SET epoch = epoch + 1, node = %s, since = %s RETURNING epoch",
                                     (self.node, time.time())).fetchone()[0]  # type: ignore[index]
                self.reactor.callFromThread(self._took, int(epoch), time.monotonic())
                return True
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        node, epoch, since = conn.execute("SELECT node, epoch, since FROM leader").fetchone()  # type: ignore[misc]
        if why is not None:  # this node held the lock a moment: whoever the row names does not lead now
            node, since = None, None
        self.reactor.callFromThread(self._saw, Leader(node, int(epoch), since), why)
        return False

    def _probe(self, conn: psycopg.Connection[Any]) -> bool:
        """A leader's check: True while it still leads. The session lives, so the lock it holds does; a journal
        a newer fep migrated meanwhile (a rolling upgrade) is led no more: the lock is let go."""
        why = self._too_new(conn)
        if why is None:
            self.reactor.callFromThread(self._seen_alive, time.monotonic())
            return True
        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        self.reactor.callFromThread(self._resign, why)
        return False

    def _too_new(self, conn: psycopg.Connection[Any]) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        version = int(row[0]) if row else 0
        if version > self.schema:
            return (f"the journal is of schema {version}, newer than this fep ({self.schema}): this node will not "
                    f"lead it; install the newer fep here")
        return None

    # --- on the reactor -------------------------------------------------------------------------------
    def _took(self, epoch: int, at: float) -> None:
        self.epoch, self._confirmed, self.why = epoch, at, None
        self.leader = Leader(self.node, epoch, time.time())
        log.info("this node ({node}) leads, epoch {epoch}", node=self.node, epoch=epoch)
        self._won(epoch)

    def _saw(self, leader: Leader, why: str | None) -> None:
        if self._failing_since is not None:
            log.info("the journal answers the lease's tries again (they failed for {s:.0f} s)",
                     s=time.monotonic() - self._failing_since)
            self._failing_since = None
        if leader != self.leader:
            log.info("standing by: {who} (epoch {epoch})", epoch=leader.epoch,
                     who=f"the leader is {leader.node}" if leader.node else "no node leads")
        if why is not None and why != self.why:
            log.error("refusing to lead: {why}", why=why)
        self.leader, self.why = leader, why
        self._seen(leader, why)

    def _blind(self, error: str) -> None:
        """A standby's try failed (the journal unreachable): who leads cannot be told, so nobody is named."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since, self._failure_logged = now, 0.0
        if now - self._failure_logged >= FAILURE_LOG_EVERY:
            self._failure_logged = now
            log.warn("standing by, the lease cannot be tried: {error} (failing for {s:.0f} s; said again every "
                     "{every:g} s while it fails)", error=error, s=now - self._failing_since, every=FAILURE_LOG_EVERY)
        self.leader, self.why = None, f"the journal cannot be reached ({error})"
        self._seen(None, self.why)

    def _old_server(self, version: int) -> None:
        log.warn("PostgreSQL {v} has no idle_session_timeout (14 and later): a leader that hangs without dying "
                 "keeps its lease until it wakes or its box is stopped", v=version)

    def _seen_alive(self, at: float) -> None:
        self._confirmed = at

    def _overdue(self) -> None:
        if self.leading and time.monotonic() - self._confirmed > self.timeout:
            self._gone(f"the lease's database session gave no sign for {self.timeout:g} s")

    def _resign(self, why: str) -> None:
        if self.epoch is None:
            return
        self.epoch, self.why = None, why
        self.leader = Leader(None, self.leader.epoch if self.leader else NO_EPOCH, None)
        log.error("this node ({node}) leads no more and stands by: {why}", node=self.node, why=why)
        self._resigned(why)

    def _gone(self, why: str) -> None:
        if self.epoch is None:
            return
        self.epoch = None
        self.stop()
        log.error("this node ({node}) lost the lead: {why}", node=self.node, why=why)
        self._lost(why)
