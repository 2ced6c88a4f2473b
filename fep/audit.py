"""The audit trail: every operator action through the admin socket, who asked (the caller's uid, from the
socket's peer credentials) and with what, journalled (the audit table) and logged. The office's console adds
every page a signed-in person views, and every sign-in, under its user's name (fep.console).

An action is journalled before it runs and its result added when it ends: one that a crash cut short is
still there, without a result. Reads (status, trades, show, audit itself) change nothing and are not kept.
"""

from __future__ import annotations

import functools
import pwd
from datetime import datetime
from typing import Any

from twisted.logger import Logger

from fep import envelope
from fep.journal import AUDIT_COLUMNS, Journal, audit_begin, audit_between, audit_end

log = Logger()


@functools.lru_cache(maxsize=256)  # a name service (LDAP, say) is not asked on the reactor for every action
def user_name(uid: int | None) -> str:
    if uid is None:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class AuditTrail:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def begin(self, uid: int | None, action: str, args: dict[str, Any]) -> int:
        return await self.journal.run(audit_begin(uid, action, args))

    async def end(self, entry: int, uid: int | None, action: str, args: dict[str, Any], result: str) -> None:
        await self.journal.run(audit_end(entry, result))
        log.info("audit: uid {uid} ({user}) {action} {args}: {result}", uid=uid, user=user_name(uid), action=action,
                 args=envelope.dumps(args).decode("utf-8"), result=result)

    async def viewed(self, user: str, action: str, args: dict[str, Any], result: str = "ok") -> None:
        """A console user's page view or sign-in: done when it is kept, so kept whole in one write."""
        args = {"console_user": user, **args}
        await self.journal.run(lambda conn: audit_end(audit_begin(None, action, args)(conn), result)(conn))

    async def between(self, since: float, until: float, limit: int) -> list[dict[str, Any]]:
        rows = await self.journal.read(audit_between(since, until, limit))
        return [_entry(dict(zip(AUDIT_COLUMNS, r))) for r in rows]


def _entry(row: dict[str, Any]) -> dict[str, Any]:
    stamp = datetime.fromtimestamp
    args = envelope.loads(row["args"])
    who = f"console:{args['console_user']}" if isinstance(args, dict) and "console_user" in args else \
        user_name(row["uid"])
    return {"at": stamp(row["at"]).strftime("%Y-%m-%d %H:%M:%S"), "uid": row["uid"], "user": who,
            "action": row["action"], "args": args,
            "result": row["result"] if row["result"] is not None else "(none yet: under way, or fep stopped during it)",
            "done": stamp(row["done"]).strftime("%Y-%m-%d %H:%M:%S") if row["done"] else None}
